"""Histograms and counters for the Score hot path, cheaper than prometheus_client's.

prometheus_client takes a lock per value update and finds a histogram's bucket with a
Python loop over the bounds: about 2.5 µs per observation, and Score makes about ten
of them per request (RPC time, two stage times, the batcher's size, queue wait and
backend time, the answer count). These keep plain Python numbers per label set: one
``bisect`` and two additions per observation (about 0.3 µs). They are collected at
scrape time into the same metric families, so names, labels and buckets are
unchanged for Prometheus and for ``REGISTRY.get_sample_value``. Observations of a
fixed value (the batcher's batch of one, with no queue wait, on most requests) are
one integer increment, a ``Tally``, read into its histograms at scrape time.

Not thread-safe by design: every observation comes from the serving event loop's
thread (the Score path and the batcher run there; model worker threads never
observe). A scrape runs in the HTTP server's thread and reads the numbers without a
lock: it may see one observation in the count and not yet in the sum, which the next
scrape corrects; Prometheus tolerates that, and nothing is ever lost.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

ChildT = TypeVar("ChildT")


class Tally:
    """A count of observations of fixed values, kept as one plain integer: the hot
    path adds to ``count`` (no call), the histograms it was given to
    (``HistogramChild.add_tally``) read it at scrape time, each as that many
    observations of its value."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class HistogramChild:
    __slots__ = ("_bounds", "_tallies", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        # counts[i]: observations in (bounds[i-1], bounds[i]]; the last one is +Inf.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._tallies: list[tuple[Tally, int, float]] = []  # (tally, bucket, value)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def add_tally(self, tally: Tally, value: float) -> None:
        """Count ``tally.count`` observations of ``value`` here, now and as it grows
        (for good: a histogram's counts never go down, so a tally outlives its user,
        e.g. a batcher replaced under the same name, whose calls stay counted)."""
        self._tallies.append((tally, bisect_left(self._bounds, value), value))

    def snapshot(self) -> tuple[list[int], float]:
        """Bucket counts (not cumulative) and sum, the tallies' observations in."""
        counts, total = list(self.counts), self.sum
        for tally, bucket, value in self._tallies:
            n = tally.count
            counts[bucket] += n
            total += n * value
        return counts, total


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Family(Collector, Generic[ChildT]):
    """Children by label values, created on first use, registered for scrapes."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> ChildT:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        """Drop the child of ``values`` (absent: nothing to do); a later ``labels``
        starts a new one."""
        self._children.pop(values, None)

    def _new_child(self) -> ChildT:
        raise NotImplementedError


class FastHistogram(_Family[HistogramChild]):
    """Like ``prometheus_client.Histogram`` (``labels(...).observe(v)``), lock-free."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("buckets must be strictly increasing")
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in dict(self._children).items():  # a copy made in C
            counts, total = child.snapshot()
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_bound_label(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        yield family


class FastCounter(_Family[CounterChild]):
    """Like ``prometheus_client.Counter`` (``labels(...).inc()``), lock-free."""

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def collect(self) -> Iterator[CounterMetricFamily]:
        # prometheus_client appends "_total" to a counter family's samples.
        name = self.name.removesuffix("_total")
        family = CounterMetricFamily(name, self.documentation, labels=self.labelnames)
        for values, child in dict(self._children).items():  # a copy made in C
            family.add_metric(list(values), child.value)
        yield family


def _bound_label(bound: float) -> str:
    """The ``le`` label exactly as prometheus_client writes it ("0.005", "+Inf")."""
    return str(floatToGoString(bound))

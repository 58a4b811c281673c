"""Sparse time tiles: per-bucket aggregates of one entity at one resolution.

Semantics (DESIGN.md, "Feature semantics"): with buckets ``b(x) = floor(x / r)``, the
value as of time ``t`` over a window ``W`` aggregates the events with
``b(t) - W/r < b(e) <= b(t)``: the current bucket plus the ``W/r - 1`` before it.

Only non-empty buckets are stored. Sums are exact integers (Python ints here, 128- and
192-bit ones in the compiled ``Tiles``), so sums and sums of squares of int64 amounts
are exact; mean and population std are derived from them correctly rounded,
which keeps them bit-reproducible between online and offline paths.

Two implementations with one behaviour: ``PyTiles`` below, and the compiled ``Tiles``
(``_windows.c``: the buckets in compact arrays), which the store uses where it was
built; the property tests hold the two to each other.

Serving cost. A busy entity (a large merchant) has a bucket in most of a long
window, and its distinct sets are large: scanning 168 hourly buckets and uniting
their sets on every request dominated Score. So a window over many buckets is split
into its closed part (every bucket before the current one), aggregated once and kept
per window length, and the current bucket, added on every call. Events arrive almost
always in the newest bucket, which is outside every cached closed part; an event
that lands in or before a cached closed part (late, or into the bucket a cached
window already closed), and every expiry, invalidates the cache (``_version``). The
result is the same integers and sets, so values stay exact.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

# A bucket is a plain list, the cheapest mutable record in CPython (fold is the hot
# path: about eleven bucket updates per event for the default pack):
# [count, declined, amount_sum, amount_sumsq, amount_max, *one set per distinct field].
COUNT, DECLINED, SUM, SUMSQ, MAX = range(5)
DISTINCT0 = 5


# Bits of the integer square root taken before the one rounding to a float:
# 2 * 53 + 3, enough for round-to-odd to round like the exact value.
_SQRT_BITS = 2 * sys.float_info.mant_dig + 3


def sqrt_of_ratio(n: int, m: int) -> float:
    """sqrt(n / m) for integers n >= 0, m > 0, correctly rounded to a float.

    ``math.sqrt(n / m)`` rounds twice (the division, then the root) and is one ulp off
    for about one window in ten. Instead: the integer root of n / m scaled by 4**q to
    carry 109 bits, its last bit set when inexact (round-to-odd), then one correctly
    rounded int / int division. It is the algorithm of ``statistics.pstdev``
    (Python 3.11+; https://bugs.python.org/msg407078); the compiled kernel's fallback
    (``_windows.c``, ``exact_sqrt_of_ratio``) is the same."""
    q = (n.bit_length() - m.bit_length() - _SQRT_BITS) // 2
    if q >= 0:
        return float(_isqrt_rto(n, m << 2 * q) << q)
    return _isqrt_rto(n << -2 * q, m) / (1 << -q)


def _isqrt_rto(n: int, m: int) -> int:
    """The integer square root of n / m, its last bit set when not exact."""
    root = math.isqrt(n // m)
    return root | (root * root * m != n)


class WindowAgg(NamedTuple):
    """Aggregates over a window of buckets; empty windows give zeros.

    A NamedTuple, not a frozen dataclass: eleven are built per Score request, and a
    frozen dataclass's ``__init__`` costs several times more."""

    events: int = 0
    declined: int = 0
    amount_sum: int = 0
    amount_sumsq: int = 0
    amount_max: int = 0
    distinct: tuple[int, ...] = ()

    @property
    def amount_mean(self) -> float:
        return self.amount_sum / self.events if self.events else 0.0

    @property
    def amount_std(self) -> float:
        """Population standard deviation, from exact integer moments, correctly
        rounded (what ``statistics.pstdev`` gives for the amounts)."""
        if not self.events:
            return 0.0
        # n^2 * var = n * sum(x^2) - (sum x)^2, exact in integers, never negative.
        numerator = self.events * self.amount_sumsq - self.amount_sum * self.amount_sum
        return sqrt_of_ratio(numerator, self.events * self.events)

    @property
    def decline_rate(self) -> float:
        return self.declined / self.events if self.events else 0.0


def _singleton(value: str) -> set[str]:
    return {value}


# Windows over fewer buckets than this are scanned on every call: caching them saves
# less than it costs (in time and memory, for the many small entities).
CACHE_MIN_BUCKETS = 8

# (count, declined, amount_sum, amount_sumsq, amount_max, distinct sets)
_Partial = tuple[int, int, int, int, int, list[set[str]]]


def _window_partial_py(
    buckets: dict[int, list[Any]], first: int, last: int, n_distinct: int
) -> _Partial:
    """Sums, max and (new) distinct unions of the stored buckets in ``[first, last]``."""
    # Visit whichever is smaller: the stored buckets, or the window's bucket range.
    if len(buckets) <= last - first + 1:
        selected = [b for i, b in buckets.items() if first <= i <= last]
    else:
        selected = [b for b in map(buckets.get, range(first, last + 1)) if b is not None]
    if not selected:
        return 0, 0, 0, 0, 0, [set() for _ in range(n_distinct)]
    # Column-wise over the buckets (zip transposes in C): one pass per field.
    columns = tuple(zip(*selected, strict=True))
    return (
        sum(columns[COUNT]),
        sum(columns[DECLINED]),
        sum(columns[SUM]),
        sum(columns[SUMSQ]),
        max(columns[MAX]),
        [set().union(*sets) for sets in columns[DISTINCT0:]],
    )


def _window_agg_py(
    result_type: type[WindowAgg],
    buckets: dict[int, list[Any]],
    first: int,
    last: int,
    n_distinct: int,
) -> WindowAgg:
    """The ``WindowAgg`` of the stored buckets in ``[first, last]``."""
    count, declined, amount_sum, amount_sumsq, amount_max, distinct = _window_partial_py(
        buckets, first, last, n_distinct
    )
    return result_type(
        count, declined, amount_sum, amount_sumsq, amount_max, tuple(map(len, distinct))
    )


# What a feature reads from its window's aggregate: ``windowed_values``'s read codes.
READ_COUNT, READ_DECLINED, READ_SUM, READ_MAX, READ_MEAN, READ_STD = range(6)
READ_DECLINE_RATE, READ_DISTINCT = 6, 7
# Each code's value of a WindowAgg (``slot``: which distinct count).
WINDOW_READS: tuple[Callable[[WindowAgg, int], float], ...] = (
    lambda agg, _slot: float(agg.events),
    lambda agg, _slot: float(agg.declined),
    lambda agg, _slot: float(agg.amount_sum),
    lambda agg, _slot: float(agg.amount_max),
    lambda agg, _slot: agg.amount_mean,
    lambda agg, _slot: agg.amount_std,
    lambda agg, _slot: agg.decline_rate,
    lambda agg, slot: float(agg.distinct[slot]),
)

# One window of an entity's reads: (index of its tiles among the entity's, one per
# resolution; window_ms; ((feature name, read code, distinct slot), ...)).
WindowPlan = tuple[int, int, tuple[tuple[str, int, int], ...]]


def _windowed_values_py(
    values: dict[str, float],
    tiles: tuple[PyTiles, ...],
    t_ms: int,
    plan: tuple[WindowPlan, ...],
) -> None:
    """Set ``values[name]`` for every read of ``plan``, from the windows as of ``t_ms``."""
    for index, window_ms, reads in plan:
        agg = tiles[index].window(t_ms, window_ms)
        for name, code, slot in reads:
            values[name] = WINDOW_READS[code](agg, slot)


class PyTiles:
    """Non-empty buckets of one entity at resolution ``resolution_ms`` (the Python twin
    of the compiled ``Tiles``; see the end of this module)."""

    __slots__ = (
        "_cache",
        "_closed_upto",
        "_oldest",
        "_version",
        "buckets",
        "n_distinct",
        "resolution_ms",
    )

    def __init__(self, resolution_ms: int, n_distinct: int = 0) -> None:
        if resolution_ms <= 0:
            raise ValueError("resolution_ms must be positive")
        self.resolution_ms = resolution_ms
        self.n_distinct = n_distinct
        self.buckets: dict[int, list[Any]] = {}
        # Lowest stored bucket index (or None): lets ``expire`` return at once mostly.
        self._oldest: int | None = None
        # Closed-part cache: window_ms -> (first, last, version, partial aggregate).
        self._cache: dict[int, tuple[int, int, int, _Partial]] | None = None
        # Highest bucket index inside any cached closed part; bumped version on change.
        self._closed_upto: int | None = None
        self._version = 0

    def add(
        self, time_ms: int, amount: int, declined: bool, distinct_values: tuple[str, ...] = ()
    ) -> bool:
        """Fold one event in; returns True when it opened a new bucket."""
        index = time_ms // self.resolution_ms
        if self._closed_upto is not None and index <= self._closed_upto:
            self._version += 1  # a cached closed part changes
        bucket = self.buckets.get(index)
        if bucket is not None and len(bucket) == DISTINCT0 + len(distinct_values):
            bucket[0] += 1
            bucket[1] += declined
            bucket[2] += amount
            bucket[3] += amount * amount
            if amount > bucket[4]:
                bucket[4] = amount
            if distinct_values:
                for i, value in enumerate(distinct_values, DISTINCT0):
                    bucket[i].add(value)
            return False
        if len(distinct_values) != self.n_distinct:
            raise ValueError(f"expected {self.n_distinct} distinct values, got {distinct_values!r}")
        self.buckets[index] = [
            1,
            int(declined),
            amount,
            amount * amount,
            amount,
            *map(_singleton, distinct_values),
        ]
        if self._oldest is None or index < self._oldest:
            self._oldest = index
        return True

    def window(self, t_ms: int, window_ms: int) -> WindowAgg:
        """Aggregate the buckets in ``(b(t) - W/r, b(t)]``."""
        r = self.resolution_ms
        if window_ms <= 0 or window_ms % r:
            raise ValueError(f"window {window_ms} ms is not a positive multiple of {r} ms")
        last = t_ms // r
        first = last - window_ms // r + 1
        if last - first < CACHE_MIN_BUCKETS or len(self.buckets) < CACHE_MIN_BUCKETS:
            return _window_agg_py(WindowAgg, self.buckets, first, last, self.n_distinct)
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        entry = cache.get(window_ms)
        if entry is None or entry[0] != first or entry[1] != last or entry[2] != self._version:
            closed = _window_partial_py(self.buckets, first, last - 1, self.n_distinct)
            entry = (first, last, self._version, closed)
            cache[window_ms] = entry
            if self._closed_upto is None or last - 1 > self._closed_upto:
                self._closed_upto = last - 1
        count, declined, amount_sum, amount_sumsq, amount_max, closed_sets = entry[3]
        current = self.buckets.get(last)
        if current is None:
            distinct = tuple(map(len, closed_sets))
            return WindowAgg(count, declined, amount_sum, amount_sumsq, amount_max, distinct)
        distinct_counts = tuple(
            len(closed) + sum(1 for value in values if value not in closed)
            for closed, values in zip(closed_sets, current[DISTINCT0:], strict=True)
        )
        return WindowAgg(
            count + current[0],
            declined + current[1],
            amount_sum + current[2],
            amount_sumsq + current[3],
            max(amount_max, current[4]),
            distinct_counts,
        )

    def aggregate(
        self, t_ms: int, window_ms: int
    ) -> tuple[int, int, int, int, int, tuple[int, ...]]:
        """``window`` as a plain tuple, as the compiled tiles give it."""
        return tuple(self.window(t_ms, window_ms))  # type: ignore[return-value]

    def expire(self, keep_from_ms: int) -> int:
        """Drop buckets wholly before ``keep_from_ms``; returns how many were dropped."""
        keep_from = keep_from_ms // self.resolution_ms
        if self._oldest is None or self._oldest >= keep_from:
            return 0
        stale = [index for index in self.buckets if index < keep_from]
        for index in stale:
            del self.buckets[index]
        self._oldest = min(self.buckets, default=None)
        if stale and self._cache:
            self._version += 1
        return len(stale)

    def __len__(self) -> int:
        return len(self.buckets)


# The compiled tiles (streamscore/kernels/_windows.c, built by `pip install`): the same
# buckets in compact arrays, no Python object per bucket or number, and the window
# reads over them in one call per entity (``windowed_values``). The property tests
# hold them to the Python above. A checkout that was not built (or a machine without a
# C compiler) keeps its state in ``PyTiles`` and reads it with the Python readers.
try:
    from streamscore.kernels import _windows
except ImportError:  # pragma: no cover - exercised where no compiler was found
    Tiles: type[PyTiles] = PyTiles
    windowed_values = _windowed_values_py
else:
    # The C type itself, not a Python subclass: a subclass would be tracked by the
    # cyclic GC (16 bytes more each, and one more object every collection visits),
    # and its buckets hold nothing that can refer back to it.
    Tiles = _windows.Tiles  # type: ignore[assignment]
    windowed_values = _windows.windowed_values  # type: ignore[assignment]


def window(tiles: Any, t_ms: int, window_ms: int) -> WindowAgg:
    """Either tiles' aggregate over the buckets in ``(b(t) - W/r, b(t)]``."""
    return WindowAgg._make(tiles.aggregate(t_ms, window_ms))

"""Sparse time tiles: per-bucket aggregates of one entity at one resolution.

Semantics (DESIGN.md, "Feature semantics"): with buckets ``b(x) = floor(x / r)``, the
value as of time ``t`` over a window ``W`` aggregates the events with
``b(t) - W/r < b(e) <= b(t)``: the current bucket plus the ``W/r - 1`` before it.

Only non-empty buckets are stored. Sums are Python ints, so sums and sums of squares
of int64 amounts are exact; mean and population std are derived from them with a
single rounding, which keeps them bit-reproducible between online and offline paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class Bucket:
    """Aggregates of the events that fell into one bucket."""

    count: int = 0
    declined: int = 0
    amount_sum: int = 0
    amount_sumsq: int = 0
    amount_max: int = 0
    # One set of values per distinct-count field (e.g. merchant ids), in field order.
    distinct: tuple[set[str], ...] = ()


@dataclass(slots=True, frozen=True)
class WindowAgg:
    """Aggregates over a window of buckets; empty windows give zeros."""

    count: int = 0
    declined: int = 0
    amount_sum: int = 0
    amount_sumsq: int = 0
    amount_max: int = 0
    distinct: tuple[int, ...] = field(default=())

    @property
    def amount_mean(self) -> float:
        return self.amount_sum / self.count if self.count else 0.0

    @property
    def amount_std(self) -> float:
        """Population standard deviation, from exact integer moments."""
        if not self.count:
            return 0.0
        # n^2 * var = n * sum(x^2) - (sum x)^2, exact in integers, never negative.
        numerator = self.count * self.amount_sumsq - self.amount_sum * self.amount_sum
        return math.sqrt(numerator / (self.count * self.count))

    @property
    def decline_rate(self) -> float:
        return self.declined / self.count if self.count else 0.0


class Tiles:
    """Non-empty buckets of one entity at resolution ``resolution_ms``."""

    __slots__ = ("_oldest", "buckets", "n_distinct", "resolution_ms")

    def __init__(self, resolution_ms: int, n_distinct: int = 0) -> None:
        if resolution_ms <= 0:
            raise ValueError("resolution_ms must be positive")
        self.resolution_ms = resolution_ms
        self.n_distinct = n_distinct
        self.buckets: dict[int, Bucket] = {}
        # Lowest stored bucket index (or None): lets ``expire`` return at once mostly.
        self._oldest: int | None = None

    def add(
        self, time_ms: int, amount: int, declined: bool, distinct_values: tuple[str, ...] = ()
    ) -> bool:
        """Fold one event in; returns True when it opened a new bucket."""
        index = time_ms // self.resolution_ms
        bucket = self.buckets.get(index)
        created = bucket is None
        if bucket is None:
            bucket = Bucket(distinct=tuple(set() for _ in range(self.n_distinct)))
            self.buckets[index] = bucket
            if self._oldest is None or index < self._oldest:
                self._oldest = index
        bucket.count += 1
        bucket.declined += declined
        bucket.amount_sum += amount
        bucket.amount_sumsq += amount * amount
        if amount > bucket.amount_max:
            bucket.amount_max = amount
        for values, value in zip(bucket.distinct, distinct_values, strict=True):
            values.add(value)
        return created

    def window(self, t_ms: int, window_ms: int) -> WindowAgg:
        """Aggregate the buckets in ``(b(t) - W/r, b(t)]``."""
        r = self.resolution_ms
        if window_ms <= 0 or window_ms % r:
            raise ValueError(f"window {window_ms} ms is not a positive multiple of {r} ms")
        last = t_ms // r
        first = last - window_ms // r + 1
        count = declined = amount_sum = amount_sumsq = amount_max = 0
        distinct: list[set[str]] = [set() for _ in range(self.n_distinct)]
        buckets = self.buckets
        # Visit whichever is smaller: the stored buckets, or the window's bucket range.
        if len(buckets) <= last - first + 1:
            selected = [b for i, b in buckets.items() if first <= i <= last]
        else:
            selected = [b for b in map(buckets.get, range(first, last + 1)) if b is not None]
        for bucket in selected:
            count += bucket.count
            declined += bucket.declined
            amount_sum += bucket.amount_sum
            amount_sumsq += bucket.amount_sumsq
            if bucket.amount_max > amount_max:
                amount_max = bucket.amount_max
            for union, values in zip(distinct, bucket.distinct, strict=True):
                union |= values
        return WindowAgg(
            count, declined, amount_sum, amount_sumsq, amount_max, tuple(len(s) for s in distinct)
        )

    def expire(self, keep_from_ms: int) -> int:
        """Drop buckets wholly before ``keep_from_ms``; returns how many were dropped."""
        keep_from = keep_from_ms // self.resolution_ms
        if self._oldest is None or self._oldest >= keep_from:
            return 0
        stale = [index for index in self.buckets if index < keep_from]
        for index in stale:
            del self.buckets[index]
        self._oldest = min(self.buckets, default=None)
        return len(stale)

    def __len__(self) -> int:
        return len(self.buckets)

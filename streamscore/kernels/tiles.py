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
from typing import Any

# A bucket is a plain list, the cheapest mutable record in CPython (fold is the hot
# path: about eleven bucket updates per event for the default pack):
# [count, declined, amount_sum, amount_sumsq, amount_max, *one set per distinct field].
COUNT, DECLINED, SUM, SUMSQ, MAX = range(5)
DISTINCT0 = 5


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


def _singleton(value: str) -> set[str]:
    return {value}


class Tiles:
    """Non-empty buckets of one entity at resolution ``resolution_ms``."""

    __slots__ = ("_oldest", "buckets", "n_distinct", "resolution_ms")

    def __init__(self, resolution_ms: int, n_distinct: int = 0) -> None:
        if resolution_ms <= 0:
            raise ValueError("resolution_ms must be positive")
        self.resolution_ms = resolution_ms
        self.n_distinct = n_distinct
        self.buckets: dict[int, list[Any]] = {}
        # Lowest stored bucket index (or None): lets ``expire`` return at once mostly.
        self._oldest: int | None = None

    def add(
        self, time_ms: int, amount: int, declined: bool, distinct_values: tuple[str, ...] = ()
    ) -> bool:
        """Fold one event in; returns True when it opened a new bucket."""
        index = time_ms // self.resolution_ms
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
        count = declined = amount_sum = amount_sumsq = amount_max = 0
        distinct: list[set[str]] = [set() for _ in range(self.n_distinct)]
        buckets = self.buckets
        # Visit whichever is smaller: the stored buckets, or the window's bucket range.
        if len(buckets) <= last - first + 1:
            selected = [b for i, b in buckets.items() if first <= i <= last]
        else:
            selected = [b for b in map(buckets.get, range(first, last + 1)) if b is not None]
        for bucket in selected:
            count += bucket[0]
            declined += bucket[1]
            amount_sum += bucket[2]
            amount_sumsq += bucket[3]
            if bucket[4] > amount_max:
                amount_max = bucket[4]
            for union, values in zip(distinct, bucket[DISTINCT0:], strict=True):
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

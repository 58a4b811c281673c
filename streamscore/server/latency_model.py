"""The batcher's prediction of a backend's time per batch size, from its recent calls
(see :class:`LatencyModel`; the batcher's dispatch rule in server/batcher.py)."""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np

from streamscore.server.backends.base import Infer
from streamscore.server.errors import BackendFailed


class LatencyModel:
    """Predicted backend seconds per batch size, from recent measured batches.

    Observations go to power-of-two buckets by the floor of the size (bucket 4 holds
    sizes 4..7), each a ring buffer of the last ``window`` durations; a bucket's
    estimate is their ``quantile`` (while few, the second slowest: one slow call alone
    refuses nothing, see ``_rank``; the max with ``quantile`` 1). A prediction interpolates
    linearly between the nearest measured buckets below and above, over the running
    max of the estimates (so it never decreases with size; a size above every
    measured bucket gets the largest estimate below it, one below all of them the
    smallest above), then applies ``* margin + extra_s``. ``default_s`` stands in
    before any observation. Floor buckets make it conservative (a bucket's estimate
    includes its larger sizes). Set the parameters at construction: predictions are
    cached until the next observation changes an estimate.

    Observations older than ``max_age_s`` are dropped by :meth:`expire`, which the
    batcher calls when a prediction is about to refuse a request outright. Without it
    one slow call (a cold start, a pause) could predict "too slow for the budget"
    forever: nothing would be dispatched, so nothing would ever be measured again. A
    bucket whose observations all expired falls back to its warm-up measurement
    (:meth:`seed`), if it had one, but never above what the nearest bucket below with
    observations of its own gives scaled linearly to its size: a warm-up that was slow
    (a pause at start) must not outlive the evidence that the backend is fast.
    """

    def __init__(
        self,
        max_batch_size: int,
        *,
        window: int = 64,
        quantile: float = 0.95,
        margin: float = 1.25,
        extra_s: float = 0.0,
        default_s: float = 0.0,
        max_age_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or window < 1 or not 0.0 < quantile <= 1.0:
            raise ValueError("max_batch_size >= 1, window >= 1 and 0 < quantile <= 1")
        self.max_batch_size = max_batch_size
        self.window = window
        self.quantile = quantile
        self.margin = margin
        self.extra_s = extra_s
        self.default_s = default_s
        self.max_age_s = max_age_s
        self.clock = clock
        n_buckets = max_batch_size.bit_length()
        self._observations: list[deque[float]] = [deque(maxlen=window) for _ in range(n_buckets)]
        self._times: list[deque[float]] = [deque(maxlen=window) for _ in range(n_buckets)]
        self._sorted: list[list[float]] = [[] for _ in range(n_buckets)]  # same, in order
        self._estimates: list[float | None] = [None] * n_buckets
        self._seeds: list[float | None] = [None] * n_buckets  # see ``seed``
        self._standing_in = [False] * n_buckets  # the estimate is the seed's
        # Index of the quantile in a sorted window, by the window's length: computed
        # once, not per observation. Below a high quantile, never the slowest of them
        # alone: with few measurements (under 20 at the 95th) the quantile's rank is
        # the slowest, and one cold call (a version's first real input down a path its
        # warm-up rows never took: 396 ms, then 24-35 ms; audit AR, F4) predicted every
        # request too slow and refused it until a probe or its expiry, rolling back a
        # canary that fit its budget. Two slow calls are a slow backend.
        self._rank = [
            max(0, min(n - 2 if quantile < 1.0 and n >= 2 else n - 1, math.ceil(quantile * n) - 1))
            for n in range(window + 1)
        ]
        # Per bucket: (anchor size, seconds at the anchor, seconds per extra request).
        self._lines: list[tuple[int, float, float]] = []
        self._cache: dict[int, float] = {}  # predictions by size, until the next change
        self._rebuild()

    def observe(self, batch_size: int, seconds: float) -> None:
        """Record one measured backend call."""
        b = self._bucket(batch_size)
        window, ordered = self._observations[b], self._sorted[b]
        if len(window) == self.window:
            del ordered[bisect.bisect_left(ordered, window[0])]
        window.append(seconds)
        self._times[b].append(self.clock())
        bisect.insort(ordered, seconds)
        self._update(b)

    def seed(self, batch_size: int, seconds: float) -> None:
        """Record a warm-up measurement: observed like any other, and kept as its
        bucket's stand-in once the bucket's observations have all expired. A batch
        size not run lately is still predicted by what it cost, not from smaller
        batches' estimates, which would let batches that cannot make their deadlines
        reach the backend."""
        b = self._bucket(batch_size)
        seeded = self._seeds[b]
        self._seeds[b] = seconds if seeded is None else max(seeded, seconds)
        self.observe(batch_size, seconds)

    def _update(self, b: int) -> bool:
        ordered = self._sorted[b]
        estimate = ordered[self._rank[len(ordered)]] if ordered else self._seeds[b]
        standing_in = not ordered and estimate is not None
        if estimate == self._estimates[b] and standing_in == self._standing_in[b]:
            return False
        self._estimates[b] = estimate
        self._standing_in[b] = standing_in
        self._rebuild()
        return True

    def expire(self) -> bool:
        """Drop observations older than ``max_age_s``; True if a prediction changed."""
        cutoff = self.clock() - self.max_age_s
        changed = False
        for b, times in enumerate(self._times):
            if not times or times[0] >= cutoff:
                continue
            window, ordered = self._observations[b], self._sorted[b]
            while times and times[0] < cutoff:
                times.popleft()
                del ordered[bisect.bisect_left(ordered, window.popleft())]
            changed |= self._update(b)
        return changed

    def predict(self, batch_size: int) -> float:
        """Seconds a batch of this size is expected to take (high quantile, with margin)."""
        cached = self._cache.get(batch_size)
        if cached is not None:
            return cached
        anchor, seconds, slope = self._lines[self._bucket(batch_size)]
        predicted = (seconds + slope * (batch_size - anchor)) * self.margin + self.extra_s
        if 1 <= batch_size <= self.max_batch_size:
            self._cache[batch_size] = predicted
        return predicted

    def measured(self) -> dict[int, float]:
        """The raw estimate of each measured bucket, by bucket size (for logs)."""
        return {1 << b: e for b, e in enumerate(self._estimates) if e is not None}

    def _bucket(self, batch_size: int) -> int:
        return min(max(batch_size, 1).bit_length(), len(self._estimates)) - 1

    def _capped_estimates(self) -> list[float | None]:
        """The estimates, a seed standing in capped at linear scaling from the nearest
        bucket below with observations of its own."""
        capped: list[float | None] = []
        fresh: tuple[int, float] | None = None  # (bucket, estimate) measured lately
        for b, estimate in enumerate(self._estimates):
            if estimate is None:
                pass
            elif not self._standing_in[b]:
                fresh = (b, estimate)
            elif fresh is not None:
                estimate = min(estimate, fresh[1] * (1 << b) / (1 << fresh[0]))
            capped.append(estimate)
        return capped

    def _rebuild(self) -> None:
        known = [(b, e) for b, e in enumerate(self._capped_estimates()) if e is not None]
        lines: list[tuple[int, float, float]] = []
        low: float | None = None  # running max of the estimates at or below the bucket
        anchor = 0  # the highest measured bucket at or below
        k = 0  # index in known of the first measured bucket above
        for b in range(len(self._estimates)):
            while k < len(known) and known[k][0] <= b:
                anchor, estimate = known[k]
                low = estimate if low is None else max(low, estimate)
                k += 1
            if low is None:  # nothing measured at or below: flat at the next one up
                lines.append((1, known[k][1] if k < len(known) else self.default_s, 0.0))
            elif k == len(known):  # nothing measured above: flat
                lines.append((1 << anchor, low, 0.0))
            else:
                above, high = known[k]
                slope = (max(high, low) - low) / ((1 << above) - (1 << anchor))
                lines.append((1 << anchor, low, slope))
        self._lines = lines
        self._cache.clear()


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch_size``, then ``max_batch_size`` itself."""
    sizes = [1 << b for b in range(max_batch_size.bit_length()) if 1 << b < max_batch_size]
    return [*sizes, max_batch_size]


async def warm_up(
    infer: Infer,
    inputs: np.ndarray,
    model: LatencyModel,
    *,
    sizes: Iterable[int] | None = None,
    repeats: int = 3,
    untimed: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Run real batches of each size (rows of ``inputs`` repeated to fill them):
    ``untimed`` calls, then ``repeats`` timed ones fed to ``model``. Returns the
    predicted seconds per size. Call it before the batcher serves (it calls ``infer``
    directly)."""
    rows = np.atleast_2d(np.asarray(inputs, dtype=np.float32))
    predicted: dict[int, float] = {}
    for size in warm_up_sizes(model.max_batch_size) if sizes is None else sizes:
        batch = np.resize(rows, (size, rows.shape[1]))
        for _ in range(untimed):
            await infer(batch)
        for _ in range(repeats):
            started = clock()
            scores = await infer(batch)
            elapsed = clock() - started
            if np.shape(scores) != (size,):
                raise BackendFailed(f"warm-up: {np.shape(scores)} scores for a batch of {size}")
            model.seed(size, elapsed)
        predicted[size] = model.predict(size)
    return predicted

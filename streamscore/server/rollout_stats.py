"""Statistics behind rollouts: sticky canary slices, sliding latency/error windows,
candidate-vs-primary comparison, and the automatic rollback rule.

Definitions:

* ``in_canary(card_id, percent)``: blake2b(card_id) mapped to [0, 100); a card is in the
  canary when that point is below ``percent``. Stable across processes and restarts,
  and monotone: a card in the slice at 10 % stays in it at 20 %.
* PSI (population stability index) of two histograms over the same bins:
  ``sum((a - e) * ln(a / e))`` over bin proportions, each smoothed by ``eps`` so an
  empty bin does not give infinity. Usual reading: < 0.1 stable, 0.1-0.25 moderate
  shift, > 0.25 significant shift.
* Rollback: over at least ``min_requests`` candidate answers, roll back when
  ``candidate_error_rate > primary_error_rate + max_error_rate_margin`` (an empty
  primary window's rate is 0), or, when the primary's window also holds at least
  ``min_requests`` answers, when
  ``candidate_p99 > max(primary_p99 * max_p99_ratio, primary_p99 + max_p99_margin_s)``
  (both a ratio and an absolute margin: at sub-millisecond latencies a ratio alone
  fires on noise).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque

import numpy as np

from streamscore.server.model import Thresholds

SCORE_BINS = np.linspace(0.0, 1.0, 11)[1:-1]  # 10 equal bins on [0, 1]


def in_canary(card_id: str, percent: float) -> bool:
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    digest = hashlib.blake2b(card_id.encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64 * 100
    return point < percent


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """PSI of two count (or proportion) vectors over the same bins."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    e = e / e.sum() + eps
    a = a / a.sum() + eps
    return float(np.sum((a - e) * np.log(a / e)))


class LatencyErrorWindow:
    """The last ``size`` answers of one variant: latency (seconds) and success."""

    def __init__(self, size: int) -> None:
        self._latencies: deque[float] = deque(maxlen=size)
        self._failures: deque[bool] = deque(maxlen=size)
        self._failed = 0

    def add(self, latency_s: float, ok: bool) -> None:
        if len(self._failures) == self._failures.maxlen and self._failures[0]:
            self._failed -= 1
        self._latencies.append(latency_s)
        self._failures.append(not ok)
        self._failed += not ok

    def add_many(self, latency_s: float, ok: bool, count: int) -> None:
        """``count`` answers of the same call (a batch)."""
        for _ in range(count):
            self.add(latency_s, ok)

    @property
    def count(self) -> int:
        return len(self._latencies)

    def error_rate(self) -> float:
        return self._failed / len(self._failures) if self._failures else 0.0

    def p99(self) -> float:
        latencies = list(self._latencies)  # a copy made in C: see PairComparison.summary
        if not latencies:
            return 0.0
        return float(np.quantile(np.asarray(latencies, dtype=np.float64), 0.99))


class PairComparison:
    """A candidate's scores against the primary's on the same requests (sliding)."""

    def __init__(self, primary: Thresholds, candidate: Thresholds, window: int = 5000) -> None:
        self.primary = primary
        self.candidate = candidate
        self._pairs: deque[tuple[float, float]] = deque(maxlen=window)

    def observe(self, primary_score: float, candidate_score: float) -> None:
        self._pairs.append((primary_score, candidate_score))

    def summary(self) -> dict[str, float]:
        # A copy (made in C, so no append from the loop can come in the middle): a
        # scrape reads it on the metrics thread.
        recent = list(self._pairs)
        if not recent:
            return {"compared": 0.0}
        pairs = np.asarray(recent, dtype=np.float64)
        primary, candidate = pairs[:, 0], pairs[:, 1]
        diff = candidate - primary
        agree = sum(self.primary.decide(p) == self.candidate.decide(c) for p, c in recent)
        bins = np.concatenate(([-math.inf], SCORE_BINS, [math.inf]))
        return {
            "compared": float(len(pairs)),
            "agreement": agree / len(pairs),
            "score_diff_mean": float(diff.mean()),
            "score_diff_abs_p50": float(np.quantile(np.abs(diff), 0.5)),
            "score_diff_abs_p99": float(np.quantile(np.abs(diff), 0.99)),
            "score_psi": psi(np.histogram(primary, bins)[0], np.histogram(candidate, bins)[0]),
        }


class RollbackPolicy:
    def __init__(
        self,
        min_requests: int = 200,
        max_error_rate_margin: float = 0.02,
        max_p99_ratio: float = 2.0,
        max_p99_margin_s: float = 0.005,
    ) -> None:
        self.min_requests = min_requests
        self.max_error_rate_margin = max_error_rate_margin
        self.max_p99_ratio = max_p99_ratio
        self.max_p99_margin_s = max_p99_margin_s

    def should_roll_back(
        self, primary: LatencyErrorWindow, candidate: LatencyErrorWindow
    ) -> str | None:
        """Why the candidate must go, or None (never before ``min_requests``)."""
        if candidate.count < self.min_requests:
            return None
        c_err, p_err = candidate.error_rate(), primary.error_rate()
        if c_err > p_err + self.max_error_rate_margin:
            return (
                f"canary error rate {c_err:.3f} > primary {p_err:.3f} + "
                f"{self.max_error_rate_margin} over {candidate.count} requests"
            )
        c_p99, p_p99 = candidate.p99(), primary.p99()
        limit = max(p_p99 * self.max_p99_ratio, p_p99 + self.max_p99_margin_s)
        # A p99 of a few primary answers is noise: the latency rule needs as many of
        # them as of the candidate's.
        if primary.count >= self.min_requests and c_p99 > limit:
            return (
                f"canary p99 {c_p99 * 1e3:.2f} ms > {limit * 1e3:.2f} ms (primary p99 "
                f"{p_p99 * 1e3:.2f} ms) over {candidate.count} requests"
            )
        return None

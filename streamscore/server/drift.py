"""Drift: live feature and score distributions against the training baseline.

``Baseline`` (``baseline.json`` next to a model version, written by ``train``): per
input feature, bin edges at the training data's deciles (deduplicated, so a constant
or low-cardinality feature gets fewer bins) and the training counts per bin; for the
score, ten equal bins on [0, 1]. ``DriftMonitor`` keeps the last ``window``
(vector, score) pairs a version served (one deque append on the Score path) and
computes, on demand (a Prometheus scrape), the population stability index of every
feature and of the score against the baseline:

    PSI = sum over bins of (a - e) * ln(a / e)

with a and e the live and training proportions, each plus 1e-4 so an empty bin is
finite. Reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
"""

from __future__ import annotations

import json
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamscore.server.backends.base import Row
from streamscore.server.rollout_stats import psi

BASELINE_FILE = "baseline.json"
SCORE_EDGES = np.linspace(0.0, 1.0, 11)[1:-1]


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; bin i holds edges[i-1] < x <= edges[i] (len(edges) + 1 bins)."""
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


@dataclass(frozen=True)
class Baseline:
    names: tuple[str, ...]
    edges: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]
    score_counts: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray, names: tuple[str, ...], scores: np.ndarray) -> Baseline:
        edges, counts = [], []
        for j in range(rows.shape[1]):
            column = rows[:, j].astype(np.float64)
            cut = np.unique(np.quantile(column, np.linspace(0.1, 0.9, 9)))
            edges.append(cut)
            counts.append(_bin_counts(column, cut))
        return cls(names, tuple(edges), tuple(counts), _bin_counts(scores, SCORE_EDGES))

    def dump(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "features": {
                        name: {"edges": e.tolist(), "counts": c.tolist()}
                        for name, e, c in zip(self.names, self.edges, self.counts, strict=True)
                    },
                    "score_counts": self.score_counts.tolist(),
                }
            )
        )

    @classmethod
    def load(cls, path: Path) -> Baseline:
        data = json.loads(path.read_text())
        features = data["features"]
        names = tuple(features)
        return cls(
            names,
            tuple(np.asarray(features[n]["edges"], dtype=np.float64) for n in names),
            tuple(np.asarray(features[n]["counts"], dtype=np.int64) for n in names),
            np.asarray(data["score_counts"], dtype=np.int64),
        )


class DriftMonitor:
    def __init__(self, baseline: Baseline, window: int = 5000) -> None:
        self.baseline = baseline
        self._recent: deque[tuple[array[float], float]] = deque(maxlen=window)

    def observe(self, vector: Row, score: float) -> None:
        """Keep one answered request's features (as float32, like the model sees them)
        and score. An ``array.array``: cheaper to make from the scoring service's
        tuple than a numpy array (0.9 against 1.1 us, hot) and, unlike the tuple,
        compact (its float objects would take six times the memory)."""
        self._recent.append((array("f", vector), score))

    def __len__(self) -> int:
        return len(self._recent)

    def psi(self) -> dict[str, float]:
        """PSI per feature name, plus ``score``; empty before anything was observed.

        Called on the metrics thread while the event loop appends: it reads a copy.
        ``list()`` copies the deque in C, with no Python code run in between, so no
        append can come in the middle (iterating the deque itself in a generator let
        one in: "deque mutated during iteration", and the whole scrape failed)."""
        recent = list(self._recent)
        if not recent:
            return {}
        rows = np.frombuffer(b"".join(vector for vector, _ in recent), np.float32)
        rows = rows.reshape(len(recent), -1).astype(np.float64)
        scores = np.fromiter((score for _, score in recent), np.float64)
        base = self.baseline
        out = {
            name: psi(counts, _bin_counts(rows[:, j], edges))
            for j, (name, edges, counts) in enumerate(
                zip(base.names, base.edges, base.counts, strict=True)
            )
        }
        out["score"] = psi(base.score_counts, _bin_counts(scores, SCORE_EDGES))
        return out

"""The one interface every model backend implements.

A backend turns a float32 batch of feature vectors, shape (n, len(inputs)), in the
model's input order, into n float32 scores in 0..1. In-process backends run one call
at a time: inline on the event loop while a call is cheap (a small MLP takes
microseconds, far less than a thread hand-off), else on their one worker thread
(backends/offload.py); remote ones (Triton) await the network. The batcher in front
of a backend decides batch sizes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np


class BackendUnavailable(Exception):
    """The backend cannot run here (no GPU, no runtime) or its server is unreachable."""


# A backend's ``infer``: scores, shape (n,), for a float32 (n, k) batch.
Infer = Callable[[np.ndarray], Awaitable[np.ndarray]]

# In-process backends also have ``infer_inline(batch) -> scores | None``: the scores
# computed synchronously, right now, while a call is cheap enough to run on the event
# loop, or None (nothing run) when it belongs in a worker thread. The batcher uses it
# to run a cheap batch without a task, a timer and a coroutine per batch.
InferInline = Callable[[np.ndarray], "np.ndarray | None"]

# One request's features in the model's input order: a tuple of Python floats, as the
# scoring service assembles them, or a (k,) array.
Row = tuple[float, ...] | np.ndarray

# Some also have ``score_row_inline(row) -> score | None``: ``infer_inline`` for a batch
# of one, computed from the row as it is, with no numpy array on either side (on a
# server whose other work keeps evicting numpy from the caches, the arrays cost more
# than a small model's arithmetic); None (nothing run) where the backend has no such
# path or its calls belong in a worker thread.
ScoreRowInline = Callable[[Row], "float | None"]


class Backend(Protocol):
    # "onnxruntime", "torch", "triton" or "tensorrt".
    kind: str
    # Largest batch one infer() call accepts.
    max_batch_size: int

    async def start(self) -> None:
        """Load / connect; raises BackendUnavailable when it cannot run here."""

    async def stop(self) -> None:
        """Release what start() took; safe to call twice."""

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Scores, shape (n,), for a float32 (n, k) batch; raises on a wrong result count."""
        ...

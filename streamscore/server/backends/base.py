"""The one interface every model backend implements.

A backend turns a float32 batch of feature vectors, shape (n, len(inputs)), in the
model's input order, into n float32 scores in 0..1. In-process backends compute inline
(a small MLP takes microseconds, far less than a thread hand-off); remote ones
(Triton) await the network. The batcher in front of a backend decides batch sizes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendUnavailable(Exception):
    """The backend cannot run here (no GPU, no runtime) or its server is unreachable."""


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

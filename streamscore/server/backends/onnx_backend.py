"""onnxruntime in process, on the CPU: the default backend.

One intra-op thread and sequential execution: a small MLP gains nothing from more
threads at these batch sizes, and the gRPC loop needs the other core. A cheap call
runs inline on the event loop (microseconds; a thread hand-off would cost more), a
heavy one in a worker thread (``offload.InlineOrThread``); session creation in
``start`` always goes to a thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.backends.offload import InlineOrThread
from streamscore.server.model import INPUT_NAME, OUTPUT_NAME, check_batch, check_scores

__all__ = ["OnnxBackend"]


class OnnxBackend:
    kind = "onnxruntime"

    def __init__(
        self, onnx_path: Path, n_inputs: int, max_batch_size: int, *, output: str = OUTPUT_NAME
    ) -> None:
        if n_inputs < 1 or max_batch_size < 1:
            raise ValueError("n_inputs and max_batch_size must be >= 1")
        self.onnx_path = onnx_path
        self.n_inputs = n_inputs
        self.max_batch_size = max_batch_size
        self.output = output
        self._outputs = [output]
        self._where = f"onnxruntime model {onnx_path}"
        self._session: Any = None
        # The session's run, without the Python wrapper (set by ``load``).
        self._run: Any = None
        self._calls = InlineOrThread(f"{onnx_path.parent.parent.name}:{onnx_path.parent.name}")

    @property
    def started(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Create the session (blocking: ``start`` runs it in a thread)."""
        if self._session is not None:
            return
        import onnxruntime as ort

        if not self.onnx_path.is_file():
            raise BackendUnavailable(f"no ONNX model at {self.onnx_path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(
            str(self.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._check_signature(session)
        self._run = _bare_run(session)
        self._session = session

    def _check_signature(self, session: Any) -> None:
        inputs = session.get_inputs()
        outputs = [o.name for o in session.get_outputs()]
        problems = []
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            problems.append(f"inputs {[i.name for i in inputs]}, expected [{INPUT_NAME!r}]")
        elif inputs[0].type != "tensor(float)":
            problems.append(f"input {INPUT_NAME!r} is {inputs[0].type}, expected tensor(float)")
        elif len(inputs[0].shape) != 2 or inputs[0].shape[1] not in (self.n_inputs, None):
            problems.append(
                f"input {INPUT_NAME!r} has shape {inputs[0].shape}, "
                f"expected [batch, {self.n_inputs}]"
            )
        if self.output not in outputs:
            problems.append(f"no output {self.output!r} (has {outputs})")
        if problems:
            raise ValueError(f"{self._where} does not fit: " + "; ".join(problems))

    async def start(self) -> None:
        if self._session is None:
            await asyncio.to_thread(self.load)

    async def stop(self) -> None:
        self._session = None
        self._run = None
        self._calls.close()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Scores, shape (n,), synchronously."""
        run = self._run
        if run is None:
            raise BackendUnavailable(f"{self._where} is not started")
        batch = check_batch(batch, self.n_inputs, self.max_batch_size)
        (scores,) = run(self._outputs, {INPUT_NAME: batch}, None)
        return check_scores(scores, batch, self._where)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        return await self._calls.call(lambda: self.run(batch))

    def infer_inline(self, batch: np.ndarray) -> np.ndarray | None:
        """Scores now while the model is cheap enough for the event loop, else None."""
        return self._calls.call_inline(lambda: self.run(batch))


def _bare_run(session: Any) -> Any:
    """``session.run`` without its Python wrapper, which costs about 3 us a call (a
    fifth of this model's call) checking what never varies here: that the feed names
    the model's inputs (one, checked by ``_check_signature``), OrtValue ownership (we
    feed numpy arrays), WebGPU graph capture and EP fallback (CPU provider only). The
    wrapper's own run where an onnxruntime version lacks the pybind session."""
    bare = getattr(getattr(session, "_sess", None), "run", None)
    return bare if callable(bare) else session.run

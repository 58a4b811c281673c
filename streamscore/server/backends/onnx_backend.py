"""onnxruntime in process, on the CPU: the default backend.

One intra-op thread and sequential execution: a small MLP gains nothing from more
threads at these batch sizes, and the gRPC loop needs the other core. A cheap call
runs inline on the event loop (microseconds; a thread hand-off would cost more), a
heavy one in a worker thread (``offload.InlineOrThread``); session creation in
``start`` always goes to a thread.

Small batches of a small dense network skip onnxruntime: the compiled dense kernel
(kernels/dense.py) computes them in about a microsecond, where onnxruntime's fixed cost
per run is 10-20 (and more when the server's other work has evicted it from the
caches). It is used only when it translates the graph exactly and matches onnxruntime
on sample rows at load; otherwise, or with ``kernel="onnxruntime"``, onnxruntime runs
every batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from streamscore.config import ONNX_KERNELS as KERNELS
from streamscore.kernels import dense
from streamscore.server.backends.base import BackendUnavailable, Row
from streamscore.server.backends.offload import InlineOrThread
from streamscore.server.model import (
    INPUT_NAME,
    OUTPUT_NAME,
    check_batch,
    check_score,
    check_scores,
)
from streamscore.tasks import in_daemon_thread

__all__ = ["KERNELS", "OnnxBackend", "check_rows"]

log = logging.getLogger("streamscore.models")

# Batches up to this many rows go to the dense kernel. It has ~1 us of fixed cost
# against onnxruntime's 10-20, but computes row by row where onnxruntime's blocked
# GEMM takes many rows at once: they cross at about 32-40 rows of the demo
# model (BENCHMARKS.md, "The dense kernel").
DENSE_MAX_ROWS = 32
# How close the dense kernel must come to onnxruntime on the sample rows: the
# tolerance the ONNX export is held to against torch (training.py).
RTOL, ATOL = 1e-4, 1e-5


class OnnxBackend:
    kind = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        n_inputs: int,
        max_batch_size: int,
        *,
        output: str = OUTPUT_NAME,
        kernel: str = "auto",
        sample_rows: np.ndarray | None = None,
        role: str = "onnxruntime model",
    ) -> None:
        if n_inputs < 1 or max_batch_size < 1:
            raise ValueError("n_inputs and max_batch_size must be >= 1")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        # "auto": the compiled dense kernel for small batches where it fits the model;
        # "onnxruntime": onnxruntime for every batch.
        self.kernel = kernel
        # Rows the dense kernel is checked on besides generated ones (the warm-up's).
        self._sample_rows = sample_rows
        # The dense kernel's model, when it serves small batches (set by ``load``).
        self.dense: dense.DenseModel | None = None
        self.onnx_path = onnx_path
        self.n_inputs = n_inputs
        self.max_batch_size = max_batch_size
        self.output = output
        self._outputs = [output]
        self._where = f"{role} {onnx_path}"  # what its log lines name
        self._session: Any = None
        # The session's run, without the Python wrapper (set by ``load``).
        self._run: Any = None
        self._calls = InlineOrThread(
            f"{onnx_path.parent.parent.name}:{onnx_path.parent.name}", label=self._where
        )

    @property
    def compute(self) -> str:
        """What computes small batches: "dense" (the compiled dense kernel) or
        "onnxruntime" (exported as streamscore_model_compute_info)."""
        return "dense" if self.dense is not None else "onnxruntime"

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
        run = _bare_run(session)
        self.dense = self._dense_model(run) if self.kernel == "auto" else None
        self._run = run
        self._session = session

    def _dense_model(self, run: Any) -> dense.DenseModel | None:
        """The dense kernel's model when it translates the graph and matches
        onnxruntime on the check rows; None (and why, logged) otherwise."""
        rows = check_rows(self.n_inputs, self._sample_rows)
        try:
            model = dense.compile_onnx(self.onnx_path, INPUT_NAME, self.output, self.n_inputs)
            got = model(rows)
            (want,) = run(self._outputs, {INPUT_NAME: rows}, None)
            want = np.asarray(want, dtype=np.float32).reshape(-1)
            if want.shape != got.shape:
                raise ValueError(f"onnxruntime gave {want.size} scores for {len(rows)} rows")
        except dense.Unsupported as e:
            log.info("%s: onnxruntime runs every batch (dense kernel: %s)", self._where, e)
            return None
        except Exception:
            # The kernel is an optimisation: whatever goes wrong with it (a graph that
            # onnx cannot load but onnxruntime can, a fixed batch size the check rows
            # do not fit), the model still serves, on onnxruntime.
            log.warning(
                "%s: onnxruntime runs every batch: the dense kernel's check failed",
                self._where,
                exc_info=True,
            )
            return None
        if not np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
            log.warning(
                "%s: onnxruntime runs every batch: the dense kernel differs from it by up "
                "to %.3g on %d check rows",
                self._where,
                float(np.nanmax(np.abs(got - want))),
                len(rows),
            )
            return None
        log.info(
            "%s: the dense kernel runs batches of up to %d rows (within %.1g of onnxruntime "
            "on %d check rows)",
            self._where,
            DENSE_MAX_ROWS,
            float(np.nanmax(np.abs(got - want), initial=0.0)),
            len(rows),
        )
        return model

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
            await in_daemon_thread(self.load, name="model-load")

    async def stop(self) -> None:
        self._session = None
        self._run = None
        self.dense = None
        self._calls.close()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Scores, shape (n,), synchronously."""
        run = self._run
        if run is None:
            raise BackendUnavailable(f"{self._where} is not started")
        batch = check_batch(batch, self.n_inputs, self.max_batch_size)
        dense_model = self.dense
        if dense_model is not None and batch.shape[0] <= DENSE_MAX_ROWS:
            scores = dense_model(batch)
        else:
            (scores,) = run(self._outputs, {INPUT_NAME: batch}, None)
        return check_scores(scores, batch, self._where)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        return await self._calls.call(lambda: self.run(batch))

    def infer_inline(self, batch: np.ndarray) -> np.ndarray | None:
        """Scores now while the model is cheap enough for the event loop, else None."""
        return self._calls.call_inline(self.run, batch)

    def score_row_inline(self, row: Row) -> float | None:
        """One row's score now, from its values as they are (``base.ScoreRowInline``):
        where the dense kernel computes small batches and the model is cheap enough
        for the event loop; else None, nothing run. A tuple of floats, the scoring
        service's row, meets no numpy on the way, whose calls would cost many times
        the kernel's on a cold cache (BENCHMARKS.md, "Cold caches")."""
        dense_model = self.dense
        if dense_model is None:
            return None
        score = self._calls.call_inline(dense_model.score_row, row)
        return None if score is None else check_score(score, self._where)


def _bare_run(session: Any) -> Any:
    """``session.run`` without its Python wrapper, which costs about 3 us a call (a
    fifth of this model's call) checking what never varies here: that the feed names
    the model's inputs (one, checked by ``_check_signature``), OrtValue ownership (we
    feed numpy arrays), WebGPU graph capture and EP fallback (CPU provider only). The
    wrapper's own run where an onnxruntime version lacks the pybind session."""
    bare = getattr(getattr(session, "_sess", None), "run", None)
    return bare if callable(bare) else session.run


def check_rows(n_inputs: int, sample_rows: np.ndarray | None = None, n: int = 512) -> np.ndarray:
    """Rows to hold the dense kernel to onnxruntime on: the given samples, zeros, and
    ``n`` seeded random rows spanning the magnitudes features take (counts, amounts,
    ratios: 1e-3 to 1e6, a fifth of them zero, a fifth negative), so that every part
    of the graph is exercised well beyond one typical row."""
    rng = np.random.default_rng(0)
    magnitude = 10.0 ** rng.uniform(-3.0, 6.0, size=(n, n_inputs))
    sign = np.where(rng.random((n, n_inputs)) < 0.2, -1.0, 1.0)
    zero = rng.random((n, n_inputs)) < 0.2
    generated = np.where(zero, 0.0, sign * magnitude)
    parts = [np.zeros((1, n_inputs)), generated]
    if sample_rows is not None and len(sample_rows):
        parts.insert(0, np.asarray(sample_rows).reshape(-1, n_inputs))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

"""TensorRT: an engine built from the version's ONNX, run on a CUDA GPU.

Untested on the project's machines (no GPU, and the PyPI tensorrt packages fetch
their libraries from NVIDIA's index at install time). ``start`` checks the
capability first and raises BackendUnavailable with the reason, so a repository
that names this backend fails loudly at load, never at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.model import check_batch, check_scores
from streamscore.tasks import in_daemon_thread


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    try:
        import torch
    except ImportError:
        return "torch (used for CUDA buffers) is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


class TensorRTBackend:
    kind = "tensorrt"

    def __init__(self, onnx_path: Path, n_inputs: int, max_batch_size: int) -> None:
        self.onnx_path = onnx_path
        self.n_inputs = n_inputs
        self.max_batch_size = max_batch_size
        self._context: Any = None
        self._engine: Any = None

    async def start(self) -> None:
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"TensorRT backend unavailable: {reason}")
        if self._context is None:
            # Building an engine takes seconds: not on the event loop.
            await in_daemon_thread(self._build, name="tensorrt-build")

    def _build(self) -> None:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(self.onnx_path.read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendUnavailable(f"TensorRT could not parse {self.onnx_path}: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        k = self.n_inputs
        profile.set_shape(
            "features", (1, k), (min(8, self.max_batch_size), k), (self.max_batch_size, k)
        )
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailable("TensorRT failed to build an engine")
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self._context = self._engine.create_execution_context()

    async def stop(self) -> None:
        self._context = None
        self._engine = None

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self._context is None:
            raise BackendUnavailable("TensorRT backend is not started")
        batch = check_batch(batch, self.n_inputs, self.max_batch_size)
        inputs = torch.from_numpy(batch).cuda()
        outputs = torch.empty((batch.shape[0], 1), dtype=torch.float32, device="cuda")
        self._context.set_input_shape("features", tuple(inputs.shape))
        self._context.set_tensor_address("features", inputs.data_ptr())
        self._context.set_tensor_address("score", outputs.data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return check_scores(outputs.cpu().numpy(), batch, f"TensorRT engine of {self.onnx_path}")

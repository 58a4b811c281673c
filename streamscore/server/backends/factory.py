"""Pick and build the backend a model version's metadata names."""

from __future__ import annotations

from pathlib import Path

from streamscore.server.backends.base import Backend, BackendUnavailable
from streamscore.server.backends.onnx_backend import OnnxBackend
from streamscore.server.model import ModelMetadata


def create_backend(
    version_dir: Path,
    metadata: ModelMetadata,
    *,
    triton_url: str = "",
    torch_device: str = "auto",
    onnx_kernel: str = "auto",
) -> Backend:
    k, limit = len(metadata.inputs), metadata.max_batch_size
    if metadata.backend == "onnxruntime":
        return OnnxBackend(
            version_dir / "model.onnx",
            k,
            limit,
            kernel=onnx_kernel,
            sample_rows=metadata.warmup_rows(),
        )
    if metadata.backend == "torch":
        from streamscore.server.backends.torch_backend import TorchBackend

        return TorchBackend(version_dir / "model.pt", k, limit, device=torch_device)
    if metadata.backend == "triton":
        if not triton_url:
            raise BackendUnavailable(
                f"{metadata.name} v{metadata.version} uses Triton but no triton_url is set"
            )
        from streamscore.server.backends.triton_backend import TritonBackend

        return TritonBackend(triton_url, metadata.name, metadata.version, k, limit)
    if metadata.backend == "tensorrt":
        from streamscore.server.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(version_dir / "model.onnx", k, limit)
    raise BackendUnavailable(f"unknown backend {metadata.backend!r}")

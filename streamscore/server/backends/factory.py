"""Pick and build the backend a model version's metadata names."""

from __future__ import annotations

import importlib
import sys
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


# The modules of the backends imported on first use, and what they import: torch's
# takes about 2 s of CPU, which held a serving event loop that long when a torch
# version was first published or named by the rollout.
BACKEND_MODULES = {
    "torch": "streamscore.server.backends.torch_backend",
    "triton": "streamscore.server.backends.triton_backend",
    "tensorrt": "streamscore.server.backends.tensorrt_backend",
}


def import_backend_modules(backends: set[str]) -> None:
    """Import the modules of ``backends`` now (at a server's start, before it serves,
    for the versions its repository holds). One that cannot import is left to the
    version's own load, which says why."""
    for backend in sorted(backends & BACKEND_MODULES.keys()):
        try:
            importlib.import_module(BACKEND_MODULES[backend])
        except Exception:  # reported by the load that needs it
            continue


def backend_module_pending(backend: str) -> bool:
    """Whether ``backend``'s module (and the library it imports) is still to import."""
    module = BACKEND_MODULES.get(backend)
    return module is not None and module not in sys.modules

"""The in-process backends on the trained demo model: same scores, strict shapes.

Real models only: the trained one, and two tiny real models (ONNX and TorchScript)
that answer one score per batch, to check that a wrong result count is caught.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from streamscore.server.backends.base import Backend, BackendUnavailable
from streamscore.server.backends.factory import create_backend
from streamscore.server.backends.onnx_backend import OnnxBackend
from streamscore.server.backends.tensorrt_backend import TensorRTBackend
from streamscore.server.backends.torch_backend import TorchBackend
from streamscore.server.model import ModelMetadata, ModelOutputError

MODEL = "fraud_mlp"


@pytest.fixture
def version_dir(trained_model: Path) -> Path:
    return trained_model / MODEL / "1"


@pytest.fixture
def metadata(version_dir: Path) -> ModelMetadata:
    return ModelMetadata.load(version_dir / "metadata.json")


def feature_rows(metadata: ModelMetadata, n: int, seed: int = 3) -> np.ndarray:
    """The real warm-up rows, then heavy-tailed non-negative rows like counts and sums."""
    rng = np.random.default_rng(seed)
    k = len(metadata.inputs)
    synthetic = rng.lognormal(mean=2.0, sigma=2.5, size=(n, k)) * rng.integers(0, 2, (n, k))
    rows = np.concatenate([metadata.warmup_rows(), synthetic])[:n]
    return np.ascontiguousarray(rows, dtype=np.float32)


async def started(backend: Backend) -> Backend:
    await backend.start()
    return backend


async def test_onnxruntime_and_torch_score_the_same(
    version_dir: Path, metadata: ModelMetadata
) -> None:
    k, limit = len(metadata.inputs), metadata.max_batch_size
    onnx_backend = await started(OnnxBackend(version_dir / "model.onnx", k, limit))
    torch_backend = await started(TorchBackend(version_dir / "model.pt", k, limit))
    try:
        rows = feature_rows(metadata, limit)
        for n in (1, 7, limit):
            a = await onnx_backend.infer(rows[:n])
            b = await torch_backend.infer(rows[:n])
            assert a.shape == b.shape == (n,)
            assert a.dtype == b.dtype == np.float32
            assert np.all((a >= 0) & (a <= 1))
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        # A batch scores each row as it would alone.
        singles = [float((await onnx_backend.infer(rows[i : i + 1]))[0]) for i in range(8)]
        np.testing.assert_allclose(await onnx_backend.infer(rows[:8]), singles, atol=1e-6)
    finally:
        await onnx_backend.stop()
        await torch_backend.stop()


async def test_torch_on_the_cpu_uses_one_thread(version_dir: Path, metadata: ModelMetadata) -> None:
    backend = TorchBackend(version_dir / "model.pt", len(metadata.inputs), 8)
    await backend.start()
    try:
        if backend.device.type == "cpu":
            assert torch.get_num_threads() == 1
    finally:
        await backend.stop()


async def test_torch_device_setting_places_the_model(
    version_dir: Path, metadata: ModelMetadata
) -> None:
    """ "cpu" keeps a torch model on the CPU even where a GPU is seen (a small MLP is
    cheaper there); "cuda" runs it on the GPU, or refuses to start without one."""
    k = len(metadata.inputs)
    rows = feature_rows(metadata, 8)
    reference = await started(OnnxBackend(version_dir / "model.onnx", k, 8))
    torch_metadata = dataclasses.replace(metadata, backend="torch")
    try:
        on_cpu = create_backend(version_dir, torch_metadata, torch_device="cpu")
        assert isinstance(on_cpu, TorchBackend) and on_cpu.device.type == "cpu"
        await on_cpu.start()
        np.testing.assert_allclose(
            await on_cpu.infer(rows), await reference.infer(rows), rtol=0, atol=1e-5
        )
        await on_cpu.stop()
        on_cuda = TorchBackend(version_dir / "model.pt", k, 8, device="cuda")
        if torch.cuda.is_available():
            await on_cuda.start()
            np.testing.assert_allclose(
                await on_cuda.infer(rows), await reference.infer(rows), rtol=0, atol=1e-5
            )
            await on_cuda.stop()
        else:
            with pytest.raises(BackendUnavailable, match="torch sees no CUDA GPU"):
                await on_cuda.start()
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert TorchBackend(version_dir / "model.pt", k, 8).device.type == expected
        with pytest.raises(ValueError, match="auto, cpu or cuda"):
            TorchBackend(version_dir / "model.pt", k, 8, device="gpu")
    finally:
        await reference.stop()


async def test_the_factory_builds_the_backend_the_metadata_names(
    version_dir: Path, metadata: ModelMetadata
) -> None:
    for kind, cls in (("onnxruntime", OnnxBackend), ("torch", TorchBackend)):
        backend = create_backend(version_dir, dataclasses.replace(metadata, backend=kind))
        assert isinstance(backend, cls)
        assert backend.kind == kind
        assert backend.max_batch_size == metadata.max_batch_size
    tensorrt = create_backend(version_dir, dataclasses.replace(metadata, backend="tensorrt"))
    assert isinstance(tensorrt, TensorRTBackend)
    with pytest.raises(BackendUnavailable, match="triton_url"):
        create_backend(version_dir, dataclasses.replace(metadata, backend="triton"))


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
async def test_wrong_input_shapes_raise_a_clear_value_error(
    version_dir: Path, metadata: ModelMetadata, kind: str
) -> None:
    k = len(metadata.inputs)
    backend = create_backend(
        version_dir, dataclasses.replace(metadata, backend=kind, max_batch_size=8)
    )
    await backend.start()
    try:
        bad = {
            "too few features": np.zeros((2, k - 1), np.float32),
            "too many features": np.zeros((2, k + 1), np.float32),
            "one vector, not a batch": np.zeros(k, np.float32),
            "three dimensions": np.zeros((1, 2, k), np.float32),
        }
        for problem, batch in bad.items():
            with pytest.raises(ValueError, match=rf"expected a \(n, {k}\) float32 batch"):
                await backend.infer(batch)
                pytest.fail(problem)
        with pytest.raises(ValueError, match=r"takes 1\.\.8"):
            await backend.infer(np.zeros((9, k), np.float32))
        with pytest.raises(ValueError, match="batch of 0 rows"):
            await backend.infer(np.zeros((0, k), np.float32))
        with pytest.raises(ValueError, match="float32"):
            await backend.infer(np.zeros((1, k), np.float64))
        # A non-contiguous float32 view is fine.
        wide = np.zeros((4, 2 * k), np.float32)
        assert (await backend.infer(wide[:, ::2])).shape == (4,)
    finally:
        await backend.stop()
        await backend.stop()  # twice is safe


async def test_not_started_is_unavailable(version_dir: Path, metadata: ModelMetadata) -> None:
    backend = OnnxBackend(version_dir / "model.onnx", len(metadata.inputs), 4)
    with pytest.raises(BackendUnavailable, match="not started"):
        await backend.infer(metadata.warmup_rows()[:1])
    missing = OnnxBackend(version_dir / "absent.onnx", len(metadata.inputs), 4)
    with pytest.raises(BackendUnavailable, match="no ONNX model"):
        await missing.start()


async def test_an_onnx_model_that_does_not_fit_is_refused_at_start(
    version_dir: Path, metadata: ModelMetadata
) -> None:
    backend = OnnxBackend(version_dir / "model.onnx", len(metadata.inputs) + 1, 4)
    with pytest.raises(ValueError, match="does not fit"):
        await backend.start()


def one_score_onnx(path: Path, k: int) -> None:
    """A real ONNX model with the right signature that returns one score per batch."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["features"], ["m"], keepdims=1),
            helper.make_node("Sigmoid", ["m"], ["score"]),
        ],
        "one_score",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class OneScore(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.mean()).reshape(1, 1)


async def test_a_wrong_result_count_is_an_error(tmp_path: Path) -> None:
    k = 5
    one_score_onnx(tmp_path / "model.onnx", k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(OneScore()).save(str(tmp_path / "model.pt"))
    backends: list[Backend] = [
        OnnxBackend(tmp_path / "model.onnx", k, 8),
        TorchBackend(tmp_path / "model.pt", k, 8),
    ]
    for backend in backends:
        await backend.start()
        assert (await backend.infer(np.ones((1, k), np.float32))).shape == (1,)
        with pytest.raises(ModelOutputError, match="returned 1 scores for a batch of 4"):
            await backend.infer(np.ones((4, k), np.float32))
        await backend.stop()


async def test_tensorrt_runs_where_it_can_else_skips_with_the_reason(
    version_dir: Path, metadata: ModelMetadata
) -> None:
    k = len(metadata.inputs)
    backend = TensorRTBackend(version_dir / "model.onnx", k, 16)
    try:
        await backend.start()
    except BackendUnavailable as unavailable:
        assert "TensorRT backend unavailable" in str(unavailable)
        pytest.skip(str(unavailable))
    try:
        reference = await started(OnnxBackend(version_dir / "model.onnx", k, 16))
        rows = feature_rows(metadata, 16)
        np.testing.assert_allclose(
            await backend.infer(rows), await reference.infer(rows), rtol=1e-3, atol=1e-4
        )
        with pytest.raises(ValueError):
            await backend.infer(np.zeros((2, k + 1), np.float32))
        await reference.stop()
    finally:
        await backend.stop()

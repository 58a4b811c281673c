"""The compiled dense kernel against onnxruntime, on real ONNX graphs.

Random small networks (hypothesis) are built with onnx.helper and scored both ways;
graphs the kernel cannot compute exactly are refused, naming why, and the ONNX
backend then keeps onnxruntime. The backend uses the kernel only for small batches
and only after it matched onnxruntime at load.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from streamscore.config import load_settings
from streamscore.kernels import dense
from streamscore.server.backends import onnx_backend
from streamscore.server.backends.onnx_backend import DENSE_MAX_ROWS, OnnxBackend
from streamscore.server.model import ModelMetadata, ModelOutputError
from streamscore.server.repository import ModelRegistry

pytestmark = pytest.mark.skipif(
    not dense.kernel_available(), reason="the compiled dense kernel is not built"
)

MODEL = "fraud_mlp"


class GraphBuilder:
    """A graph from ``features`` (float32, (batch, n_inputs)) to ``score``."""

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = n_inputs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.last = "features"
        self.width = n_inputs

    def name(self) -> str:
        return f"t{len(self.nodes)}_{len(self.initializers)}"

    def constant(self, values: Any, dtype: Any = np.float32) -> str:
        name = self.name() + "c"
        array = np.asarray(values, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, *inputs: str, width: int | None = None, **attrs: Any) -> str:
        out = self.name() + "o"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        self.last = out
        if width is not None:
            self.width = width
        return out

    def model(self, output: str | None = None) -> onnx.ModelProto:
        output = output or self.last
        self.nodes.append(helper.make_node("Identity", [output], ["score"]))
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, self.n_inputs])],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, None)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def onnxruntime_scores(model: onnx.ModelProto, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["score"], {"features": rows})
    return np.asarray(scores, dtype=np.float32).reshape(-1)


def kernel_scores(model: onnx.ModelProto, rows: np.ndarray) -> np.ndarray:
    translation = dense.translate(model, "features", "score", rows.shape[1])
    return dense.DenseModel(translation.program())(rows)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    # Sums are accumulated in another order than onnxruntime's: equal to float32
    # rounding, relative to the size of the values involved.
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


# -- random networks -----------------------------------------------------------------


def add_preprocessing(g: GraphBuilder, draw: Callable[..., Any], kind: str) -> None:
    w = g.width
    x = g.last
    if kind == "signed_log":  # the demo model's: sign(x) * log(1 + |x|)
        sign, magnitude = g.node("Sign", x), g.node("Abs", x)
        one = g.constant(1.0)
        shifted = g.node("Add", *draw(st.permutations([one, magnitude])))
        g.node("Mul", sign, g.node("Log", shifted))
    elif kind == "standardize":
        shape = draw(st.sampled_from([(), (1,), (w,), (1, w)]))
        mean = draw(st.lists(st.floats(-5, 5), min_size=w, max_size=w))
        std = draw(st.lists(st.floats(0.5, 5), min_size=w, max_size=w))
        size = int(np.prod(shape))
        centred = g.node("Sub", x, g.constant(np.reshape(mean[:size], shape)))
        g.node("Div", centred, g.constant(np.reshape(std[:size], shape)))
    elif kind == "sqrt_abs":
        g.node("Sqrt", g.node("Abs", x))
    elif kind == "exp_tanh":
        g.node("Exp", g.node("Tanh", x))
    elif kind == "square":
        g.node("Mul", x, x)
    elif kind == "scaled":  # a constant on the left of a non-commutative op
        g.node("Sub", g.constant(draw(st.floats(-3, 3))), x)
    else:  # a unary op
        g.node(kind, x)


def add_layer(g: GraphBuilder, draw: Callable[..., Any], width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1 / np.sqrt(g.width), size=(g.width, width))
    bias = rng.normal(0, 0.5, size=width)
    form = draw(st.sampled_from(["gemm", "gemm_t", "matmul"]))
    if form == "matmul":
        product = g.node("MatMul", g.last, g.constant(weights))
        bias_shape = draw(st.sampled_from([(width,), (1, width)]))
        g.node("Add", product, g.constant(bias.reshape(bias_shape)))
        g.width = width
        return
    b = g.constant(weights.T if form == "gemm_t" else weights)
    attrs: dict[str, Any] = {"transB": 1} if form == "gemm_t" else {}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.floats(0.25, 2.0))
        attrs["beta"] = draw(st.floats(0.25, 2.0))
    bias_shape = draw(st.sampled_from([None, (), (1,), (width,), (1, width)]))
    inputs = [g.last, b]
    if bias_shape is not None:
        inputs.append(g.constant(np.resize(bias, bias_shape) if bias_shape else bias[0]))
    g.node("Gemm", *inputs, width=width, **attrs)


@st.composite
def networks(draw: Callable[..., Any]) -> tuple[onnx.ModelProto, np.ndarray]:
    n_inputs = draw(st.integers(1, 24))
    g = GraphBuilder(n_inputs)
    kinds = ["signed_log", "standardize", "sqrt_abs", "exp_tanh", "square", "scaled"]
    kinds += ["Abs", "Neg", "Tanh", "Sign"]
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=3)):
        add_preprocessing(g, draw, kind)
    seed = draw(st.integers(0, 2**16))
    for i, width in enumerate(draw(st.lists(st.integers(1, 40), max_size=3))):
        add_layer(g, draw, width, seed + i)
        g.node(draw(st.sampled_from(["Relu", "Tanh", "Sigmoid"])), g.last)
    add_layer(g, draw, 1, seed + 99)
    if draw(st.booleans()):
        g.node("Sigmoid", g.last)
    tail = draw(st.sampled_from(["none", "flatten", "squeeze", "reshape"]))
    if tail == "flatten":
        g.node("Flatten", g.last, axis=1)
    elif tail == "squeeze":
        g.node("Squeeze", g.last, g.constant([1], np.int64))
    elif tail == "reshape":
        g.node("Reshape", g.last, g.constant([-1], np.int64))
    rows = np.random.default_rng(seed).normal(0, 30, size=(draw(st.integers(1, 40)), n_inputs))
    return g.model(), rows.astype(np.float32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_the_kernel_scores_random_networks_as_onnxruntime_does(
    network: tuple[onnx.ModelProto, np.ndarray],
) -> None:
    model, rows = network
    assert_close(kernel_scores(model, rows), onnxruntime_scores(model, rows))
    # One row given as Python floats (each rounded to float32 on the way in, as
    # numpy's cast rounds it) scores exactly as that row of a batch does.
    program = dense.translate(model, "features", "score", rows.shape[1]).program()
    values = rows.astype(np.float64) * 1.0000001  # most no longer float32 values
    batch = values.astype(np.float32)
    scores = np.empty(len(batch), np.float32)
    program.run(batch, scores)
    by_row = [program.score_row(tuple(row)) for row in values.tolist()]
    assert by_row == scores.tolist()


def test_the_demo_model_translates_and_matches_onnxruntime(trained_model: Path) -> None:
    version_dir = trained_model / MODEL / "1"
    k = len(ModelMetadata.load(version_dir / "metadata.json").inputs)
    model = dense.compile_onnx(version_dir / "model.onnx", "features", "score", k)
    rows = onnx_backend.check_rows(k)
    want = onnxruntime_scores(onnx.load(str(version_dir / "model.onnx")), rows)
    np.testing.assert_allclose(model(rows), want, rtol=1e-4, atol=1e-5)


# -- what the kernel refuses ---------------------------------------------------------


def leaky_relu(g: GraphBuilder) -> None:
    g.node("LeakyRelu", g.last)


def gemm_with_trans_a(g: GraphBuilder) -> None:
    g.node("Gemm", g.last, g.constant(np.ones((3, 3))), transA=1)


def broadcast_rows(g: GraphBuilder) -> None:
    column = g.node("Gemm", "features", g.constant(np.ones((3, 1))))
    g.node("Add", "features", column)


def int_constant(g: GraphBuilder) -> None:
    g.node("Mul", g.last, g.constant([2, 2, 2], np.int64))


def constant_of_three_dims(g: GraphBuilder) -> None:
    g.node("Add", g.last, g.constant(np.ones((1, 1, 3))))


def wide_reshape(g: GraphBuilder) -> None:
    g.node("Reshape", g.last, g.constant([-1], np.int64))


def gemm_after_squeeze(g: GraphBuilder) -> None:
    column = g.node("Gemm", "features", g.constant(np.ones((3, 1))))
    squeezed = g.node("Squeeze", column, g.constant([1], np.int64))
    g.node("Add", squeezed, g.constant(1.0))


def constants_only(g: GraphBuilder) -> None:
    g.node("Abs", g.constant([1.0]))


def weights_from_rows(g: GraphBuilder) -> None:
    g.node("MatMul", "features", g.node("Abs", "features"))


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (leaky_relu, "op LeakyRelu"),
        (gemm_with_trans_a, "transA"),
        (broadcast_rows, "no broadcasting"),
        (int_constant, "int64 constant"),
        (constant_of_three_dims, r"shape \(1, 1, 3\)"),
        (wide_reshape, "Reshape of a row 3 wide"),
        (gemm_after_squeeze, "Add after a reshape"),
        (constants_only, "constants only"),
        (weights_from_rows, "not a constant matrix"),
    ],
)
def test_graphs_the_kernel_cannot_compute_are_refused_naming_why(
    build: Callable[[GraphBuilder], None], reason: str
) -> None:
    g = GraphBuilder(3)
    build(g)
    with pytest.raises(dense.Unsupported, match=reason):
        dense.translate(g.model(), "features", "score", 3)


def test_an_output_wider_than_one_score_is_refused() -> None:
    g = GraphBuilder(3)
    g.node("Relu", "features")
    with pytest.raises(dense.Unsupported, match="not one computed score per row"):
        dense.translate(g.model(), "features", "score", 3)


def test_the_program_checks_what_it_is_given() -> None:
    """The C side trusts its steps once checked: every bad index or width is refused."""
    one = np.ones(1, np.float32).tobytes()
    relu = (dense.RELU, 1, 0, 0, 2, 0, 0)
    with pytest.raises(ValueError, match="bad destination"):
        dense.Program([(dense.RELU, 5, 0, 0, 2, 0, 0)], [], b"", [2, 1], 1)
    with pytest.raises(ValueError, match="bad operand"):
        dense.Program([(dense.RELU, 1, 0, 0, 1, 0, 0)], [], b"", [2, 1], 1)
    with pytest.raises(ValueError, match="bad GEMM"):
        dense.Program([(dense.GEMM, 1, 0, -1, 1, 2, 0)], [(0, 1)], one, [2, 1], 1)
    with pytest.raises(ValueError, match="outside values"):
        dense.Program([relu], [(0, 2)], one, [2, 2], 1)
    with pytest.raises(ValueError, match="writes a register it reads"):
        dense.Program([(dense.ADD, 1, 1, 0, 2, 0, 0)], [], b"", [2, 2], 1)
    with pytest.raises(ValueError, match="output"):
        dense.Program([relu], [], b"", [2, 2], 1)


def test_the_program_refuses_batches_of_the_wrong_type_or_shape() -> None:
    g = GraphBuilder(3)
    g.node("Gemm", "features", g.constant(np.ones((3, 1))))
    program = dense.translate(g.model(), "features", "score", 3).program()
    scores = np.empty(2, np.float32)
    for bad in (np.ones((2, 3)), np.ones((2, 4), np.float32), np.ones(6, np.float32)):
        with pytest.raises(ValueError, match="batch"):
            program.run(bad, scores)
    with pytest.raises(ValueError, match="scores"):
        program.run(np.ones((3, 3), np.float32), scores)
    program.run(np.ones((2, 3), np.float32), scores)
    assert scores.tolist() == [3.0, 3.0]
    with pytest.raises(TypeError, match="not initialised"):
        dense.Program.__new__(dense.Program).run(np.ones((2, 0), np.float32), scores)


def test_a_row_of_numbers_is_scored_and_anything_else_refused() -> None:
    g = GraphBuilder(3)
    g.node("Gemm", "features", g.constant(np.ones((3, 1))))
    program = dense.translate(g.model(), "features", "score", 3).program()
    assert program.score_row((1.0, 2, np.float32(0.5))) == 3.5  # any numbers, any sequence
    assert program.score_row([0.1, 0.2, 0.3]) == float(
        np.float32(0.1) + np.float32(0.2) + np.float32(0.3)
    )
    assert program.score_row(np.ones(3)) == 3.0
    with pytest.raises(ValueError, match="expected 3 values, got 2"):
        program.score_row((1.0, 2.0))
    with pytest.raises(TypeError, match="must be real number"):
        program.score_row((1.0, "2", 3.0))
    with pytest.raises(TypeError, match="expected a sequence"):
        program.score_row(3.0)
    with pytest.raises(TypeError, match="not initialised"):
        dense.Program.__new__(dense.Program).score_row((1.0,))


def test_a_network_wider_than_the_stack_row_scores_rows_too() -> None:
    """Registers beyond the 4,096 floats kept on the stack are allocated per call."""
    g = GraphBuilder(3)
    rng = np.random.default_rng(1)
    g.node("Gemm", "features", g.constant(rng.normal(size=(3, 5000)) / 100))
    g.node("Relu", g.last)
    g.node("Gemm", g.last, g.constant(rng.normal(size=(5000, 1)) / 100))
    program = dense.translate(g.model(), "features", "score", 3).program()
    rows = rng.normal(size=(4, 3)).astype(np.float32)
    scores = np.empty(4, np.float32)
    program.run(rows, scores)
    assert [program.score_row(tuple(row)) for row in rows.tolist()] == scores.tolist()


# -- in the backend ------------------------------------------------------------------


@pytest.fixture
def version_dir(trained_model: Path) -> Path:
    return trained_model / MODEL / "1"


async def backend_for(version_dir: Path, **options: Any) -> OnnxBackend:
    metadata = ModelMetadata.load(version_dir / "metadata.json")
    backend = OnnxBackend(
        version_dir / "model.onnx",
        len(metadata.inputs),
        metadata.max_batch_size,
        sample_rows=metadata.warmup_rows(),
        **options,
    )
    await backend.start()
    return backend


async def test_the_backend_runs_small_batches_on_the_kernel_and_large_on_onnxruntime(
    version_dir: Path,
) -> None:
    backend = await backend_for(version_dir)
    reference = await backend_for(version_dir, kernel="onnxruntime")
    try:
        assert backend.dense is not None and reference.dense is None
        assert (backend.compute, reference.compute) == ("dense", "onnxruntime")
        calls: list[int] = []
        kernel = backend.dense

        def counted(batch: np.ndarray) -> np.ndarray:
            calls.append(len(batch))
            return kernel(batch)

        backend.dense = counted  # type: ignore[assignment]
        rows = onnx_backend.check_rows(backend.n_inputs)
        for n in (1, 2, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1, backend.max_batch_size):
            got = await backend.infer(rows[:n])
            np.testing.assert_allclose(got, reference.run(rows[:n]), rtol=1e-4, atol=1e-5)
        assert calls == [1, 2, DENSE_MAX_ROWS]
    finally:
        await backend.stop()
        await reference.stop()


async def test_the_backend_scores_one_row_of_floats_as_a_batch_of_one(
    version_dir: Path,
) -> None:
    """``score_row_inline``: the dense kernel's score of a tuple of floats, exactly
    ``infer_inline``'s for that row; None (nothing run) on onnxruntime, or once the
    model's calls belong in the worker thread."""
    backend = await backend_for(version_dir)
    reference = await backend_for(version_dir, kernel="onnxruntime")
    try:
        backend._calls.cost_s = 0.0  # measured cheap: inline
        values = onnx_backend.check_rows(backend.n_inputs)[:64].astype(np.float64) * 1.0000001
        for row in values:
            want = backend.infer_inline(np.array(row, np.float32, ndmin=2))
            assert want is not None
            assert backend.score_row_inline(tuple(row.tolist())) == float(want[0])
        assert reference.score_row_inline(tuple(values[0].tolist())) is None
        backend._calls.cost_s = 1.0  # measured heavy: its calls go to the thread
        assert backend.score_row_inline(tuple(values[0].tolist())) is None
    finally:
        await backend.stop()
        await reference.stop()
    assert backend.score_row_inline(tuple(values[0].tolist())) is None  # stopped


async def test_a_row_scored_outside_0_to_1_fails_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = GraphBuilder(3)
    g.node("Gemm", "features", g.constant(np.ones((3, 1))))  # the row's sum
    backend = await started_from(g.model(), tmp_path, 8, caplog)
    try:
        assert backend.dense is not None
        backend._calls.cost_s = 0.0  # measured cheap: inline
        assert backend.score_row_inline((0.25, 0.25, 0.25)) == 0.75
        for bad in ((1.0, 1.0, 1.0), (-1.0, 0.0, 0.0), (math.nan, 0.0, 0.0)):
            with pytest.raises(ModelOutputError, match=r"outside 0\.\.1"):
                backend.score_row_inline(bad)
    finally:
        await backend.stop()


async def started_from(
    model: onnx.ModelProto, tmp_path: Path, max_batch_size: int, caplog: pytest.LogCaptureFixture
) -> OnnxBackend:
    """The ONNX backend of ``model`` (3 inputs), started with its log captured."""
    onnx.save(model, str(tmp_path / "model.onnx"))
    backend = OnnxBackend(tmp_path / "model.onnx", 3, max_batch_size)
    with caplog.at_level(logging.INFO, logger="streamscore.models"):
        await backend.start()
    return backend


async def test_a_graph_the_kernel_refuses_stays_with_onnxruntime(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = GraphBuilder(3)
    g.node("Sigmoid", g.node("Gemm", g.node("LeakyRelu", "features"), g.constant(np.ones((3, 1)))))
    backend = await started_from(g.model(), tmp_path, 8, caplog)
    try:
        assert backend.dense is None
        assert "dense kernel: op LeakyRelu" in caplog.text
        rows = np.array([[1, -2, 3]], np.float32)
        want = 1 / (1 + np.exp(-(1 - 0.02 + 3)))
        np.testing.assert_allclose(backend.run(rows), [want], rtol=1e-6)
    finally:
        await backend.stop()


async def test_a_model_the_check_cannot_run_still_serves_on_onnxruntime(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fixed batch size in the graph (4 rows): onnxruntime refuses the check rows, so
    the kernel is not used, and the model serves as before."""
    g = GraphBuilder(3)
    g.node("Sigmoid", g.node("Gemm", "features", g.constant(np.ones((3, 1)))))
    model = g.model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    backend = await started_from(model, tmp_path, 4, caplog)
    try:
        assert backend.dense is None
        assert "the dense kernel's check failed" in caplog.text
        rows = np.zeros((4, 3), np.float32)
        np.testing.assert_allclose(backend.run(rows), [0.5] * 4)
    finally:
        await backend.stop()


async def test_a_kernel_that_disagrees_with_onnxruntime_is_not_used(
    version_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The load-time check, given a kernel off by 1e-3 on one row of many."""
    real = dense.compile_onnx

    def off_on_one_row(*args: Any) -> Callable[[np.ndarray], np.ndarray]:
        model = real(*args)

        def scores(batch: np.ndarray) -> np.ndarray:
            out = model(batch)
            out[len(out) // 2] += 1e-3
            return out

        return scores

    monkeypatch.setattr(dense, "compile_onnx", off_on_one_row)
    with caplog.at_level(logging.WARNING, logger="streamscore.models"):
        backend = await backend_for(version_dir)
    try:
        assert backend.dense is None
        assert "differs from it by up to 0.001" in caplog.text
    finally:
        await backend.stop()


async def test_concurrent_threads_get_their_own_rows_scored(version_dir: Path) -> None:
    """Batches of 16 rows and more release the GIL: calls from several threads at once
    (the backend's worker thread and the loop) must not share scratch space."""
    backend = await backend_for(version_dir)
    try:
        assert backend.dense is not None
        rows = onnx_backend.check_rows(backend.n_inputs)[: DENSE_MAX_ROWS * 8]
        batches = [
            np.ascontiguousarray(rows[i : i + DENSE_MAX_ROWS])
            for i in range(0, len(rows), DENSE_MAX_ROWS)
        ]
        want = [backend.dense(b) for b in batches]
        wrong: list[int] = []

        def score_all(offset: int) -> None:
            for round_ in range(50):
                i = (offset + round_) % len(batches)
                if not np.array_equal(backend.dense(batches[i]), want[i]):  # type: ignore[misc]
                    wrong.append(i)

        threads = [threading.Thread(target=score_all, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []
    finally:
        await backend.stop()


def test_the_onnx_kernel_setting_is_auto_or_onnxruntime() -> None:
    assert load_settings(environ={}).onnx_kernel == "auto"
    off = load_settings(environ={"STREAMSCORE_ONNX_KERNEL": "onnxruntime"})
    assert off.onnx_kernel == "onnxruntime"
    with pytest.raises(ValueError, match="onnx_kernel: 'numpy' is not one of auto, onnxruntime"):
        load_settings(environ={"STREAMSCORE_ONNX_KERNEL": "numpy"})


async def test_the_registry_passes_the_kernel_setting_to_every_onnx_backend(
    trained_model: Path,
) -> None:
    for kernel, in_use in (("auto", True), ("onnxruntime", False)):
        registry = ModelRegistry(trained_model, MODEL, reload_interval_s=0, onnx_kernel=kernel)
        await registry.start()
        try:
            served = registry.primary
            assert isinstance(served.backend, OnnxBackend) and served.fallback is not None
            assert (served.backend.dense is not None) is in_use
            assert (served.fallback.dense is not None) is in_use
        finally:
            await registry.stop()

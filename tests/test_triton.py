"""TritonBackend against a real tritonserver (from .venv-triton, scripts/setup_triton.sh).

One server for the module (about 2 s to start: the python-backend stub and
onnxruntime loading dominate); the crash test runs its own servers.
"""

from __future__ import annotations

import asyncio
import gc
import glob
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import pytest_asyncio
from onnx import TensorProto, helper, numpy_helper

from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.backends.triton_backend import TritonBackend
from streamscore.server.backends.triton_repo import model_config, write_triton_model
from streamscore.triton_server import EmbeddedTriton, TritonInstall, TritonServerError

pytestmark = pytest.mark.integration
# The module's server fixture and the tests share one event loop.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

K = 8
MODEL = "mlp"  # default batching settings (max_queue_delay 100 us)
BATCHED = "mlp_batched"  # a long queue delay, so concurrent requests surely merge

try:
    TritonInstall.locate()
    _NO_TRITON = ""
except TritonServerError as exc:
    _NO_TRITON = str(exc)
# Tests that start a server but not through the `repo` fixture (which skips too).
needs_triton = pytest.mark.skipif(bool(_NO_TRITON), reason=f"no tritonserver: {_NO_TRITON}")


def _onnx_model(k: int, seed: int) -> bytes:
    """sigmoid(x @ W + b): input "features" [batch, k], output "score" [batch, 1]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, 1)).astype(np.float32)
    b = np.array([0.1], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["score"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _NO_TRITON:
        pytest.skip(f"no tritonserver: {_NO_TRITON}")
    root = tmp_path_factory.mktemp("triton-repo")
    write_triton_model(root, MODEL, 1, _onnx_model(K, seed=1), K)
    write_triton_model(root, BATCHED, 1, _onnx_model(K, seed=2), K, max_queue_delay_us=50_000)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triton(repo: Path) -> AsyncIterator[EmbeddedTriton]:
    async with EmbeddedTriton(repo) as server:
        print(f"tritonserver startup: {server.startup_s:.2f} s")
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def backend(triton: EmbeddedTriton) -> AsyncIterator[TritonBackend]:
    b = TritonBackend(triton.url, MODEL, 1, K)
    await b.start()
    yield b
    await b.stop()


def _local_scores(repo: Path, name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"))
    return np.asarray(session.run(["score"], {"features": x})[0]).reshape(-1)


def test_config_text() -> None:
    text = model_config("m", 19, max_batch_size=128, max_queue_delay_us=250)
    assert 'backend: "python"' in text
    assert "max_batch_size: 128" in text
    assert "dims: [ 19 ]" in text
    assert "max_queue_delay_microseconds: 250" in text
    assert "KIND_CPU" in text
    with pytest.raises(ValueError):
        model_config("m", 0)


@on_module_loop
async def test_scores_equal_onnxruntime(
    backend: TritonBackend, repo: Path, triton: EmbeddedTriton
) -> None:
    rng = np.random.default_rng(7)
    for n in (1, 5, 64):
        x = rng.normal(size=(n, K)).astype(np.float32)
        scores = await backend.infer(x)
        assert scores.shape == (n,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, _local_scores(repo, MODEL, x), atol=1e-5, rtol=0)
    # float64 input is converted, not refused
    x64 = rng.normal(size=(3, K))
    np.testing.assert_allclose(
        await backend.infer(x64),
        _local_scores(repo, MODEL, x64.astype(np.float32)),
        atol=1e-5,
        rtol=0,
    )


@on_module_loop
async def test_concurrent_calls_are_batched_by_triton(triton: EmbeddedTriton, repo: Path) -> None:
    b = TritonBackend(triton.url, BATCHED, 1, K)
    await b.start()
    try:

        async def counts() -> tuple[int, int]:
            stats = await b.client.get_inference_statistics(BATCHED, "1")
            s = stats.model_stats[0]
            return int(s.inference_count), int(s.execution_count)

        inf0, exe0 = await counts()
        rng = np.random.default_rng(3)
        xs = [rng.normal(size=(1 + i % 3, K)).astype(np.float32) for i in range(32)]
        results = await asyncio.gather(*(b.infer(x) for x in xs))
        for x, scores in zip(xs, results, strict=True):
            np.testing.assert_allclose(scores, _local_scores(repo, BATCHED, x), atol=1e-5)
        inf1, exe1 = await counts()
        rows, executions = inf1 - inf0, exe1 - exe0
        assert rows == sum(len(x) for x in xs)
        # 32 requests within Triton's 50 ms queue delay: a handful of model executions.
        assert 1 <= executions <= 8, (rows, executions)
    finally:
        await b.stop()


@on_module_loop
async def test_wrong_shape_is_refused(backend: TritonBackend, triton: EmbeddedTriton) -> None:
    with pytest.raises(ValueError, match=r"expected \(n, 8\)"):
        await backend.infer(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="expected"):
        await backend.infer(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"1\.\.64"):
        await backend.infer(np.zeros((65, K), np.float32))
    # Triton's own check (INVALID_ARGUMENT) maps to ValueError too.
    wrong = TritonBackend(triton.url, MODEL, 1, K)
    await wrong.start()
    try:
        wrong.n_inputs = 5  # pretend our side is misconfigured after start
        with pytest.raises(ValueError, match="unexpected shape"):
            await wrong.infer(np.zeros((2, 5), np.float32))
    finally:
        await wrong.stop()


@on_module_loop
async def test_start_checks_model(triton: EmbeddedTriton) -> None:
    for args, match in [
        ((MODEL, 1, 5), r"expected FP32 \[5\]"),
        (("nope", 1, K), "not ready"),
        ((MODEL, 9, K), "not ready"),
    ]:
        b = TritonBackend(triton.url, *args)
        with pytest.raises(BackendUnavailable, match=match):
            await b.start()
    with pytest.raises(BackendUnavailable, match="max_batch_size"):
        await TritonBackend(triton.url, MODEL, 1, K, max_batch_size=65).start()
    with pytest.raises(BackendUnavailable, match="not started"):
        await TritonBackend(triton.url, MODEL, 1, K).infer(np.zeros((1, K), np.float32))


@on_module_loop
async def test_new_version_loads(triton: EmbeddedTriton, repo: Path) -> None:
    write_triton_model(repo, MODEL, 2, _onnx_model(K, seed=5), K)
    await triton.load_model(MODEL)
    v1, v2 = TritonBackend(triton.url, MODEL, 1, K), TritonBackend(triton.url, MODEL, 2, K)
    await v1.start()
    await v2.start()
    try:
        x = np.ones((2, K), np.float32)
        s1, s2 = await v1.infer(x), await v2.infer(x)
        session = ort.InferenceSession(str(repo / MODEL / "2" / "model.onnx"))
        np.testing.assert_allclose(s2, session.run(None, {"features": x})[0].reshape(-1), atol=1e-5)
        assert not np.allclose(s1, s2)
    finally:
        await v1.stop()
        await v2.stop()


@on_module_loop
async def test_server_down_then_restarted(repo: Path) -> None:
    server = EmbeddedTriton(repo, models=[MODEL])
    await server.start()
    b = TritonBackend(server.url, MODEL, 1, K, timeout_s=0.5)
    await b.start()
    x = np.ones((1, K), np.float32)
    try:
        await b.infer(x)
        assert server.pid is not None
        # A hung server: the call gives up at its deadline.
        os.kill(server.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable, match="DEADLINE_EXCEEDED"):
                await asyncio.wait_for(b.infer(x), 5)
            assert time.monotonic() - t0 < 2
        finally:
            os.kill(server.pid, signal.SIGCONT)
        # Resumed, it answers again: within a few tries of 0.5 s (on a loaded box its
        # first answers after the stop can take longer than one, CI saw it).
        for attempt in range(20):
            try:
                await b.infer(x)
                break
            except BackendUnavailable as late:
                assert "DEADLINE_EXCEEDED" in str(late) and attempt < 19, late
        # A dead server: refused at once, every time, no hang.
        server.kill()
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
                await asyncio.wait_for(b.infer(x), 5)
            assert time.monotonic() - t0 < 1
    finally:
        await b.stop()
        await b.stop()  # idempotent
        await server.stop()
    # Restarted (a new port): a new backend works.
    async with EmbeddedTriton(repo, models=[MODEL]) as again:
        fresh = TritonBackend(again.url, MODEL, 1, K)
        await fresh.start()
        try:
            assert (await fresh.infer(x)).shape == (1,)
        finally:
            await fresh.stop()
    with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
        await TritonBackend("127.0.0.1:1", MODEL, 1, K).start()


@on_module_loop
async def test_port_clash_is_detected(triton: EmbeddedTriton, repo: Path) -> None:
    with pytest.raises(TritonServerError, match="port in use"):
        await EmbeddedTriton(repo, port=triton.port, models=[MODEL]).start()
    assert await triton_ready(triton)


async def triton_ready(server: EmbeddedTriton) -> bool:
    b = TritonBackend(server.url, MODEL, 1, K)
    await b.start()
    try:
        return (await b.infer(np.zeros((1, K), np.float32))).shape == (1,)
    finally:
        await b.stop()


@needs_triton
@on_module_loop
async def test_start_failure_is_clear(tmp_path: Path) -> None:
    bad = tmp_path / "repo"
    write_triton_model(bad, "broken", 1, b"not an onnx model", K)
    with pytest.raises(TritonServerError, match="broken"):
        await EmbeddedTriton(bad, start_timeout=30).start()


@on_module_loop
async def test_server_dies_with_its_parent(repo: Path, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed owner takes tritonserver (and its stubs) along."""
    code = (
        "import asyncio, sys\n"
        "from streamscore.triton_server import EmbeddedTriton\n"
        "async def main():\n"
        f"    server = EmbeddedTriton({str(repo)!r}, models=[{MODEL!r}], "
        f"log_dir={str(tmp_path)!r})\n"
        "    await server.start()\n"
        "    print(server.pid, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        line = await asyncio.wait_for(owner.stdout.readline(), 60)
        pid = int(line)
        assert _alive(pid)
    finally:
        owner.kill()
        await owner.wait()
    for _ in range(150):  # 15 s; it takes about 2 (a graceful SIGTERM shutdown)
        if not _alive(pid):
            break
        await asyncio.sleep(0.1)
    assert not _alive(pid), "tritonserver outlived its owner"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@on_module_loop
async def test_cancelled_start_leaves_nothing_running(repo: Path) -> None:
    server = EmbeddedTriton(repo, models=[MODEL])
    task = asyncio.create_task(server.start())
    for _ in range(100):
        if server.pid is not None:
            break
        await asyncio.sleep(0.01)
    pid = server.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.running and not _alive(pid)


def _shm_regions(prefix: str) -> list[Path]:
    return sorted(Path("/dev/shm").glob(glob.escape(prefix) + "*"))


@needs_triton
async def test_killed_or_forgotten_servers_leave_no_shared_memory(repo: Path) -> None:
    """The python backend keeps a shared-memory region per model instance; a graceful
    stop removes them itself, a killed server leaves them behind. stop() after a
    kill removes them, and so does the finalizer of a server its owner forgot."""
    killed = EmbeddedTriton(repo, models=[MODEL])
    await killed.start()
    prefix = killed._shm_prefix  # our own names for the regions (--backend-config)
    assert _shm_regions(prefix), "the model instance has no region: nothing tested"
    killed.kill()
    await killed.stop()
    assert not _shm_regions(prefix)

    forgotten = EmbeddedTriton(repo, models=[MODEL])
    await forgotten.start()
    pid, prefix = forgotten.pid, forgotten._shm_prefix
    assert pid is not None and _shm_regions(prefix)
    del forgotten
    gc.collect()
    assert not _alive(pid), "tritonserver outlived its collected owner"
    assert not _shm_regions(prefix)


@needs_triton
def test_the_triton_command_serves_the_repository_until_sigterm(repo: Path) -> None:
    """``streamscore triton``: the binary setup.sh installs, on the repository, ready
    when it prints its address (the README's bare ``tritonserver`` command found no
    python backend for the models); SIGTERM stops it cleanly."""
    import subprocess

    import tritonclient.grpc as triton_grpc

    command = [sys.executable, "-m", "streamscore", "triton", "--model-repository", str(repo)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("127.0.0.1:"), (url, process.stderr)
            client = triton_grpc.InferenceServerClient(url)
            assert client.is_server_ready() and client.is_model_ready(MODEL)
            client.close()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()


def test_the_triton_command_says_in_one_line_why_it_cannot_start(tmp_path: Path) -> None:
    """A repository it cannot serve: exit 1, why on one line (the server's own error
    lines included), no traceback."""
    import subprocess

    broken = tmp_path / "models"
    (broken / "fraud_mlp" / "1").mkdir(parents=True)
    (broken / "fraud_mlp" / "config.pbtxt").write_text("this is not a model config")
    done = subprocess.run(
        [sys.executable, "-m", "streamscore", "triton", "--model-repository", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr, done.stderr
    assert "tritonserver" in last and "says:" not in last, last


def test_tritonservers_own_error_lines_are_joined_without_grpcs_debug_blob() -> None:
    from streamscore.cli import _one_line_triton_error

    message = (
        "could not start tritonserver: port in use; tritonserver says:\n"
        "E1201 19:58:01.643834934    8798 chttp2_server.cc:1060]    UNKNOWN:No address "
        'added {created_time:"2026-12-01T19:58:01", children:[UNKNOWN:Address in use]}\n'
        "E1201 main.cc:245] failed to start GRPC service\n"
    )
    assert _one_line_triton_error(message) == (
        "could not start tritonserver: port in use (tritonserver: E1201 19:58:01.643834934 "
        "8798 chttp2_server.cc:1060] UNKNOWN:No address added | "
        "E1201 main.cc:245] failed to start GRPC service)"
    )
    assert _one_line_triton_error("tritonserver not installed in\n  /x") == (
        "tritonserver not installed in /x"
    )


@needs_triton
def test_the_triton_command_warns_of_a_repository_without_models(tmp_path: Path) -> None:
    """An empty repository was served without a word: Triton up, no model in it."""
    import subprocess

    command = [sys.executable, "-m", "streamscore", "triton", "--model-repository", str(tmp_path)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.readline().startswith("127.0.0.1:")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            assert f"no model in {tmp_path}" in process.stderr.read()
        finally:
            process.kill()

"""Smoke tests of the load tools: ``loadtest.sweep``, the echo server and
``loadtest.report --quick``.

The sweep runs as a subprocess (its client processes are spawned from there) against
a real server in this process (as in test_server.py), or the echo server
(``loadtest/echo_server.py``, also in this process) for ``--rpc echo-stream``, for
about two seconds per RPC at low rates; the report runs its whole quick suite (its
own broker, echo server and two ``streamscore serve`` processes) with the session's
trained model; the report's pairing of rows with their echo baseline is checked on
made-up figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hdrh.histogram import HdrHistogram

from loadtest.client_pool import ClientPool
from loadtest.openloop import closed_loop, open_loop, requests_in
from loadtest.procstat import cpu_jiffies, steal_pct
from loadtest.sweep import main as sweep_main
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.server.app import ScoringServer

from system import run_module

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


@pytest.fixture
async def target(trained_model: Path) -> AsyncIterator[str]:
    server = ScoringServer(Settings(port=0, model_repository=trained_model))
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


@pytest.fixture
async def echo_target() -> AsyncIterator[str]:
    from loadtest.echo_server import start

    server, port = await start(0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_echo_server_score_stream(echo_target: str) -> None:
    """ScoreStream on the echo: one answer per message, in order, shaped like Score's."""
    async with grpc.aio.insecure_channel(echo_target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        unary = await stub.Score(pb.ScoreRequest(request_id="u-1"), timeout=10)
        requests = [pb.ScoreRequest(request_id=f"s-{i}") for i in range(50)]
        answers = [a async for a in stub.ScoreStream(iter(requests), timeout=10)]
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    for answer in answers:
        answer.request_id = unary.request_id
        assert answer == unary


@pytest.mark.parametrize(("setting", "dense"), [(None, True), ("onnxruntime", False)])
async def test_model_echo_loads_its_model_with_serves_onnx_kernel_setting(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, dense: bool
) -> None:
    from loadtest.echo_server import model_registry
    from streamscore.server.backends.onnx_backend import OnnxBackend

    if setting is None:
        monkeypatch.delenv("STREAMSCORE_ONNX_KERNEL", raising=False)
    else:
        monkeypatch.setenv("STREAMSCORE_ONNX_KERNEL", setting)
    models = model_registry(trained_model, "fraud_mlp", "")
    await models.start()
    try:
        backend = models.primary.backend
        assert isinstance(backend, OnnxBackend)
        assert (backend.dense is not None) is dense
    finally:
        await models.stop()


def test_feature_bench_times_both_ways_of_reading_windows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loadtest.feature_bench import read_speed, synthetic

    read_speed(synthetic(3000), n_requests=200)
    lines = capsys.readouterr().out.splitlines()
    times = [
        re.fullmatch(
            r"window reads, (\w+) \((\d+) of 200 requests' entities known\): "
            r"compiled ([\d.]+) us, python ([\d.]+) us per entity",
            line,
        )
        for line in lines
    ]
    assert all(times) and [m[1] for m in times if m] == ["card", "merchant", "device", "ip"]
    for m in times:
        assert m is not None and int(m[2]) > 0 and float(m[3]) > 0 and float(m[4]) > 0


async def test_model_echo_answers_with_its_models_score(trained_model: Path) -> None:
    """The model echo calls the served model once per answer (unary and each stream
    message), on its fixed row: its score is the backend's own for that row."""
    import numpy as np

    from loadtest.echo_server import model_call, start
    from streamscore.server.repository import ModelRegistry

    models = ModelRegistry(trained_model, "fraud_mlp", reload_interval_s=0)
    await models.start()
    try:
        served = models.primary
        n_inputs = len(served.metadata.inputs)
        (expected,) = await served.backend.infer(np.full((1, n_inputs), 0.5, np.float32))
        calls = 0
        call_model = model_call(served.backend, n_inputs)

        def counted() -> float:
            nonlocal calls
            calls += 1
            return call_model()

        server, port = await start(0, score=counted)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ScoringStub(channel)
                unary = await stub.Score(pb.ScoreRequest(request_id="u-1"), timeout=10)
                requests = [pb.ScoreRequest(request_id=f"s-{i}") for i in range(5)]
                answers = [a async for a in stub.ScoreStream(iter(requests), timeout=10)]
        finally:
            await server.stop(None)
    finally:
        await models.stop()
    assert calls == 6
    for answer in [unary, *answers]:
        # The proto's score is a float32, like the backend's.
        assert answer.score == pytest.approx(float(expected), rel=1e-6), answer
    assert unary.score != 0.01  # not the plain echo's canned score


async def check_sweep(target: str, tmp_path: Path, rpc: str) -> None:
    """Two one-second steps (40/s, 80/s) from two client processes, all answered."""
    out = tmp_path / "sweep.json"
    output = await run_module(
        "loadtest.sweep",
        "--target",
        target,
        "--rpc",
        rpc,
        "--rates",
        "40,80",
        "--seconds",
        "1",
        "--clients",
        "2",
        "--budget-p99-ms",
        "5000",
        "--server-pid",
        str(os.getpid()),  # the server runs in this process
        "--requests",
        "1000",
        "--json",
        str(out),
        timeout=60,
    )
    report = json.loads(out.read_text())
    assert report["rpc"] == rpc and report["clients"] == 2, output
    assert report["streams"] == (2 if rpc in ("stream", "echo-stream") else None), output
    rows = report["rows"]
    assert [row["offered_rate"] for row in rows] == [40.0, 80.0], output
    for row in rows:
        assert row["achieved_rate"] > 0, (row, output)
        assert row["ok"] == int(row["offered_rate"] * 1), (row, output)
        assert row["errors"] == 0 and row["dropped"] == 0, (row, output)
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        assert row["p99_ms"] <= row["p999_ms"] <= row["max_ms"], row
        assert row["server_cpu_us"] > 0 and row["passed"] is True, row
        # Linux: the host's steal over the step, a share of the machine's CPU time.
        assert row["steal_pct"] is not None and 0 <= row["steal_pct"] <= 100, row
    assert report["max_rate"] == 80.0, output
    assert "highest offered rate" in output


@pytest.mark.parametrize("rpc", ["score", "stream"])
async def test_sweep_two_clients_json(target: str, tmp_path: Path, rpc: str) -> None:
    await check_sweep(target, tmp_path, rpc)


async def test_sweep_echo_stream_json(echo_target: str, tmp_path: Path) -> None:
    await check_sweep(echo_target, tmp_path, "echo-stream")


async def test_open_loop_counts_calls_never_answered_as_errors() -> None:
    """A call still unanswered ``drain_timeout`` after the last send was counted
    nowhere (not ok, not an error), so a step with calls never answered passed."""
    never = asyncio.Event()

    async def call(i: int) -> None:
        if i % 10 == 3:
            await never.wait()

    result = await open_loop(call, 200, 0.2, drain_timeout=0.3)
    assert (result.ok, result.errors, result.unanswered, result.dropped) == (36, 4, 4, 0)


async def test_a_closed_loop_keeps_exactly_its_calls_in_flight_and_counts_failures() -> None:
    """Each caller sends its next call when its last one ends, failed or not: never
    more than ``in_flight`` at once, and all of them going while calls last."""
    going = peak = 0
    calls: list[int] = []

    async def call(i: int) -> None:
        nonlocal going, peak
        calls.append(i)
        going += 1
        peak = max(peak, going)
        try:
            await asyncio.sleep(0.01)
            if i % 5 == 0:
                raise RuntimeError("refused")
        finally:
            going -= 1

    result = await closed_loop(call, 4, 0.3, offset=100)
    assert peak == 4
    assert result.ok + result.errors == len(calls) and result.dropped == 0
    assert result.errors == sum(1 for i in calls if i % 5 == 0)
    assert sorted(calls) == list(range(100, 100 + len(calls)))  # each request once, in turn
    # 4 callers of ~10 ms calls for 0.3 s: about 120 calls (timers on a busy box run late).
    assert 40 <= len(calls) <= 4 * 0.3 / 0.01 + 4
    assert result.histogram.get_value_at_percentile(50) >= 10_000  # us, from each send


async def test_closed_loop_streams_keep_their_messages_in_flight(echo_target: str) -> None:
    """Each stream keeps its messages going, the next written as an answer comes; each
    answer timed from its own write. The echo answers every one."""
    from loadtest.streamload import closed_loop_streams, stream_opener

    requests = [pb.ScoreRequest(request_id=f"c-{i}").SerializeToString() for i in range(100)]
    async with grpc.aio.insecure_channel(echo_target) as channel:
        result, first_error = await closed_loop_streams(
            stream_opener(channel), requests, 0.3, streams=2, in_flight=3
        )
    assert first_error == "" and result.errors == 0 and result.dropped == 0
    assert result.ok > 6  # more than the messages first written: it went on
    assert result.histogram.get_total_count() == result.ok


class RefusingStreams(pb_grpc.ScoringServicer):
    """A ScoreStream that refuses every ``refuse_every``-th message (its stream ends
    INVALID_ARGUMENT), or stops answering after ``stall_after`` messages."""

    def __init__(self, refuse_every: int = 0, stall_after: int = 0) -> None:
        self.refuse_every = refuse_every
        self.stall_after = stall_after
        self.messages = 0

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        from loadtest.echo_server import canned

        async for request in request_iterator:
            self.messages += 1
            if self.stall_after and self.messages > self.stall_after:
                await asyncio.Event().wait()  # never answers again
            if self.refuse_every and self.messages % self.refuse_every == 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")
            yield canned(request.request_id)


@contextlib.asynccontextmanager
async def streams_of(servicer: pb_grpc.ScoringServicer) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    pb_grpc.add_ScoringServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_a_closed_loop_stream_refused_is_opened_again() -> None:
    """A refusal ends a stream: it was never opened again, so one refusal took its
    share of the load away for the rest of the step (audit AU, F3)."""
    from loadtest.streamload import closed_loop_streams, stream_opener

    requests = [pb.ScoreRequest(request_id=f"c-{i}").SerializeToString() for i in range(100)]
    refusing = RefusingStreams(refuse_every=10)
    async with streams_of(refusing) as channel:
        result, first_error = await closed_loop_streams(
            stream_opener(channel), requests, 0.5, streams=1, in_flight=2
        )
    # The refusal, or, where the client's next write raced it, grpc's Python client's
    # own "INTERNAL: Internal error from Core" (its status for that stream, too).
    assert "INVALID_ARGUMENT" in first_error or "Internal error from Core" in first_error
    # The stream went on after its first refusal (at the 10th message) many times over.
    assert result.ok > 50 and result.errors >= 5, result
    # Each refusal costs its stream the messages it had going (2), no more.
    assert result.ok <= refusing.messages
    assert result.errors <= 2 * (refusing.messages // 10 + 1), (result, refusing.messages)


async def test_a_closed_loop_stream_that_stops_answering_ends_after_the_drain_timeout() -> None:
    """A server that stops answering held the step until it answered again, and its
    unanswered messages counted nowhere (audit AU, F4)."""
    from loadtest.streamload import closed_loop_streams, stream_opener

    requests = [pb.ScoreRequest(request_id=f"c-{i}").SerializeToString() for i in range(100)]
    async with streams_of(RefusingStreams(stall_after=20)) as channel:
        started = time.monotonic()
        result, first_error = await closed_loop_streams(
            stream_opener(channel), requests, 0.3, streams=2, in_flight=3, drain_timeout=0.3
        )
    assert time.monotonic() - started < 5
    assert "drain timeout" in first_error
    assert result.ok <= 20 and result.errors >= 1, result


async def test_each_client_of_a_closed_loop_starts_at_its_own_place_in_the_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second of two clients sent the same requests as the first, at once: its
    offset was added twice (audit AU, F5)."""
    from loadtest.client_pool import _Client

    requests = [pb.ScoreRequest(request_id=f"r{i}").SerializeToString() for i in range(10)]
    client = _Client(requests, index=1, clients=2)
    sent: list[bytes] = []

    async def unary(request: bytes, timeout: float) -> bytes:
        sent.append(request)
        await asyncio.sleep(0.001)
        return request

    monkeypatch.setattr(client, "channel", lambda target: None)
    monkeypatch.setattr(client, "unaries", lambda target: [unary])
    job = {
        "kind": "run",
        "target": "unused",
        "rpc": "score",
        "rate": 0.0,
        "seconds": 0.05,
        "streams": 1,
        "timeout_s": 1.0,
        "max_in_flight": 1,
        "drain_timeout": 1.0,
        "start_at": time.time(),
        "closed_in_flight": 2,
    }
    await client.run(job)
    assert sent[0] == requests[5], sent[:2]  # its half of the requests: from the 6th


@pytest.mark.parametrize(
    ("rate", "seconds", "clients"), [(10, 1, 4), (30, 1, 4), (1000, 5, 3), (7.5, 2, 2), (1, 1, 3)]
)
def test_the_clients_shares_add_up_to_the_steps_requests(
    rate: float, seconds: float, clients: int
) -> None:
    """Each client's own int(rate / clients * seconds) lost up to one request per
    client: 10/s for 1 s from 4 clients sent 8, read as the server falling behind."""
    shares = [requests_in(rate, seconds, clients, index) for index in range(clients)]
    assert sum(shares) == round(rate * seconds), shares
    assert max(shares) - min(shares) <= 1, shares


@contextlib.asynccontextmanager
async def refusing_server(every: int) -> AsyncIterator[str]:
    """A Scoring server that answers Score with an empty answer, and refuses every
    ``every``-th call with RESOURCE_EXHAUSTED; its ScoreStream reads and never
    answers. Yields its target."""
    calls = 0

    async def silent_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            pass
        await asyncio.Event().wait()
        yield b""

    async def score(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal calls
        calls += 1
        if calls % every == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused on purpose")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "streamscore.v1.Scoring",
        {
            "Score": grpc.unary_unary_rpc_method_handler(score),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(silent_stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_sweep_measures_a_server_that_refuses_some_calls(tmp_path: Path) -> None:
    """One refused warm-up call ended the whole sweep, exit 1, nothing measured; the
    refusals are what the step's error count is for."""
    out = tmp_path / "sweep.json"
    async with refusing_server(every=5) as target:
        output = await run_module(
            "loadtest.sweep",
            "--target",
            target,
            "--rates",
            "50",
            "--seconds",
            "1",
            "--clients",
            "1",
            "--json",
            str(out),
            timeout=60,
        )
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["ok"], row["errors"]) == (40, 10), (row, output)
    assert row["passed"] is False and "RESOURCE_EXHAUSTED" in row["first_error"], row


async def test_a_sweep_names_a_score_stream_that_never_answers_its_warm_up() -> None:
    """The warm-up stream had no deadline: the sweep waited out its clients' 90 s,
    then failed naming only the timeout."""
    started = time.monotonic()
    async with refusing_server(every=10**9) as target:
        output = await run_module(
            "loadtest.sweep",
            *("--target", target, "--rpc", "stream", "--rates", "20", "--seconds", "1"),
            *("--clients", "1"),
            timeout=150,  # past the clients' own 90 s, so that a regression fails, not hangs
            expect_exit_0=False,
        )
    assert "warm-up stream" in output and "DEADLINE_EXCEEDED" in output, output
    assert time.monotonic() - started < 60, output


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--seconds", "0"),
        ("--seconds", "-2"),
        ("--seconds", "inf"),
        ("--clients", "0"),
        ("--rates", "nan"),
        ("--rates", "100,inf"),
        ("--budget-p99-ms", "nan"),
    ],
)
def test_sweep_refuses_a_step_that_measures_nothing(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        sweep_main(["--target", "127.0.0.1:1", "--rates", "10", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "1,x", ","])
def test_backend_bench_refuses_batches_in_flight_that_are_not_whole_numbers_of_one_or_more(
    value: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.backend_bench", "--triton-concurrency", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "argument --triton-concurrency:" in done.stderr


@pytest.mark.parametrize(
    ("module", "flag", "value"),
    [
        ("loadtest.backend_bench", "--rates", "0"),
        ("loadtest.backend_bench", "--rates", "300,nan"),
        ("loadtest.gc_pauses", "--rate", "0"),
        ("loadtest.load_profile", "--rate", "inf"),
        ("loadtest.ingest_cost", "--score-rate", "-1"),
    ],
)
def test_every_load_tool_refuses_a_rate_that_is_no_rate(module: str, flag: str, value: str) -> None:
    """At once, exit 2, naming it: a rate of 0 ran a whole benchmark of 0/s, nan
    crashed after starting its servers, and gc_pauses divided by 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, flag, value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: must be a finite number more than 0" in done.stderr


TOOLS = sorted(
    path.stem
    for path in (ROOT / "loadtest").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


def test_every_load_tool_starts_as_its_usage_says() -> None:
    """Each tool runs as ``python -m loadtest.NAME`` from the repository root, the one
    form its usage line and the README give (run as a script, a tool importing its
    neighbours as ``loadtest.*`` cannot start: the report's pipeline step failed so),
    and the report runs pipeline_bench in that form."""
    from loadtest.report import pipeline_arguments

    assert len(TOOLS) >= 15, TOOLS
    commands = {name: ["-m", f"loadtest.{name}"] for name in TOOLS}
    commands["report's pipeline step"] = pipeline_arguments(10, 10)
    running = {
        name: subprocess.Popen(
            [sys.executable, *argv, "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, argv in commands.items()
    }
    failed = {}
    for name, process in running.items():
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0 or "usage:" not in output:
            failed[name] = output[-500:]
    assert not failed, failed
    documented_as_scripts = [
        name
        for name in TOOLS
        if "python loadtest/" in (ROOT / "loadtest" / f"{name}.py").read_text()
    ]
    assert not documented_as_scripts


@pytest.mark.parametrize(
    ("sig", "to_group"), [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "term"]
)
async def test_an_interrupted_sweep_keeps_its_finished_steps(
    echo_target: str, tmp_path: Path, sig: signal.Signals, to_group: bool
) -> None:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM to the
    sweep alone (`timeout`, a cancelled job) during the second step: the first
    step's row is kept in --json, exit 128 + the signal, and no traceback from the
    sweep or its client processes."""
    out = tmp_path / "sweep.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.sweep",
        "--target",
        echo_target,
        "--rpc",
        "echo",
        "--rates",
        "20,40",
        "--seconds",
        "3",
        "--json",
        str(out),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        # As a terminal starts it: a test run started in the background (CI's) has
        # SIGINT ignored, and that would carry over into the sweep.
        preexec_fn=_sigint_as_at_a_terminal,
    )
    assert process.stdout is not None
    try:
        while b"| 20 |" not in await asyncio.wait_for(process.stdout.readline(), 60):
            pass
        await asyncio.sleep(1.0)  # into the second step
        if to_group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        rest, errors = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 128 + sig, errors
    assert b"interrupted after 1 steps" in rest, rest
    assert b"Traceback" not in errors, errors
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and report["max_rate"] is None
    assert [row["offered_rate"] for row in report["rows"]] == [20.0]


def test_load_clients_are_deaf_to_ctrl_c_from_their_first_instant() -> None:
    """A Ctrl-C reaches every process of the terminal's group, clients included. One
    that came while a client was still importing (before ``_client_main`` ignores
    SIGINT) killed it with a KeyboardInterrupt traceback; spawned with SIGINT
    ignored, a client lives on and the parent stops it."""
    requests = [pb.ScoreRequest(request_id=id_).SerializeToString() for id_ in "ab"]
    before = signal.getsignal(signal.SIGINT)
    pool = ClientPool(2, requests).start()
    processes = list(pool.processes)
    try:
        for process in processes:
            assert process.pid is not None
            os.kill(process.pid, signal.SIGINT)  # at once: the client is still importing
        time.sleep(1.0)
        assert [process.is_alive() for process in processes] == [True, True]
        assert signal.getsignal(signal.SIGINT) is before  # restored
    finally:
        pool.close()
    assert [process.exitcode for process in processes] == [0, 0]  # stopped by the parent


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_steal_pct_is_the_stolen_share_of_the_machines_cpu_time() -> None:
    assert steal_pct((10, 1000), (30, 1400)) == pytest.approx(5.0)
    assert steal_pct((10, 1000), (10, 1400)) == 0.0
    assert steal_pct(None, (10, 1400)) is None  # no /proc/stat
    assert steal_pct((10, 1000), (10, 1000)) is None  # no time passed
    now = cpu_jiffies()
    assert now is not None and 0 <= now[0] <= now[1], now  # Linux


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table: rows of cells, header first (the |---| line checked and dropped)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            assert len(current) >= 3, current
            assert all(re.fullmatch(r"-{3,}", cell) for cell in current[1]), current[1]
            assert all(len(row) == len(current[0]) for row in current), current
            tables.append([current[0], *current[2:]])
            current = []
    return tables


async def test_report_quick(trained_model: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "BENCH.md", tmp_path / "plots"
    before = "# Benchmarks\n\nHand-written text, never touched.\n"
    out.write_text(before)
    await run_module(
        "loadtest.report",
        "--quick",
        "--out",
        str(out),
        "--plots",
        str(plots),
        "--model-repository",  # the session's model: no second training here
        str(trained_model),
        timeout=150,
    )
    text = out.read_text()
    assert text.startswith(before)
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert "python -m loadtest.report --quick" in section
    assert "grpcio" in section and "onnxruntime" in section and "CPUs" in section

    latency, best = markdown_tables(section)[:2]
    header = latency[0]
    column = {name: i for i, name in enumerate(header)}
    assert {"configuration", "offered/s", "p50 ms", "p99 ms", "server CPU us/req"} <= set(header)
    configs = {row[0] for row in latency[1:]}
    assert configs == {
        "echo",
        "model echo",
        "null Score",
        "onnxruntime, batching on",
        "onnxruntime, batching off",
    }
    assert {float(row[column["offered/s"]]) for row in latency[1:]} == {100.0, 200.0}
    for row in latency[1:]:
        p50, p99 = float(row[column["p50 ms"]]), float(row[column["p99 ms"]])
        assert 0 < p50 <= p99 <= float(row[column["max ms"]]), row
        assert float(row[column["achieved/s"]]) > 0, row
        assert int(row[column["errors"]]) == 0, row
        assert float(row[column["server CPU us/req"]]) > 0, row
        assert 0 <= float(row[column["CPU steal"]].removesuffix(" %")) <= 100, row
    assert {row[0] for row in best[1:]} == configs

    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
    assert len(links) >= 2, section
    for link in links:
        png = (out.parent / link).resolve()
        assert png.is_relative_to(plots.resolve()), link
        assert png.read_bytes()[:8] == PNG, link
    assert json.loads((plots / "report.json").read_text())["rows"]


async def test_a_failed_pipeline_step_is_named_and_fails_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report is still written with what the step printed, and the step is named
    among the notes and as a failure (main exits 1 on it)."""
    import loadtest.report as report

    monkeypatch.setattr(
        report,
        "pipeline_arguments",
        lambda events, requests: ["-c", "import sys; print('Traceback: boom'); sys.exit(3)"],
    )
    suite = report.Suite(argparse.Namespace(pipeline_events=10, pipeline_requests=10))
    try:
        await suite.pipeline(tmp_path)
    finally:
        shutil.rmtree(suite.root, ignore_errors=True)
    assert suite.failed == ["pipeline_bench exited with code 3"]
    assert suite.failed[0] in suite.notes
    assert "Traceback: boom" in suite.pipeline_output


def test_report_section_replaces_only_between_markers(tmp_path: Path) -> None:
    from loadtest.report import write_section

    path = tmp_path / "B.md"
    path.write_text("head\nno newline at end")
    write_section(path, "first\n")
    assert path.read_text() == f"head\nno newline at end\n\n{BEGIN}\nfirst\n{END}\n"
    path.write_text(path.read_text() + "tail, kept\n")
    write_section(path, "second\n")
    assert path.read_text() == f"head\nno newline at end\n\n{BEGIN}\nsecond\n{END}\ntail, kept\n"
    path.write_text(f"{END}\n{BEGIN}\n")
    with pytest.raises(SystemExit):
        write_section(path, "x\n")
    assert path.read_text() == f"{END}\n{BEGIN}\n"


def test_report_compares_stream_rows_with_echo_stream(tmp_path: Path) -> None:
    """Made-up figures through the report's tables: unary rows against ``echo``,
    ScoreStream rows against ``echo, ScoreStream`` at the same rate (no processes)."""
    from loadtest.report import (
        ECHO,
        ECHO_STREAM,
        MODEL_ECHO,
        MODEL_ECHO_STREAM,
        NULL_SCORE,
        NULL_SCORE_STREAM,
        Suite,
        Summary,
        plan,
    )

    assert ECHO_STREAM not in {c.name for c in plan(["onnxruntime"], True, "")}
    configs = plan(["onnxruntime"], False, "")
    echo_stream = next(c for c in configs if c.name == ECHO_STREAM)
    assert (echo_stream.rpc, echo_stream.server) == ("echo-stream", ECHO)
    # The model echo answers both RPCs from one process and reads against the echo.
    model_echo = {c.name: (c.rpc, c.server) for c in configs if c.server == MODEL_ECHO}
    assert model_echo == {
        MODEL_ECHO: ("echo", MODEL_ECHO),
        MODEL_ECHO_STREAM: ("echo-stream", MODEL_ECHO),
    }
    # Null Score is one serve process answering both of streamscore's own RPCs.
    null_score = {c.name: (c.rpc, c.server) for c in configs if c.server == NULL_SCORE}
    assert null_score == {
        NULL_SCORE: ("score", NULL_SCORE),
        NULL_SCORE_STREAM: ("stream", NULL_SCORE),
    }
    # p99 ms and server CPU us per rpc and rate; the budget is 10 ms.
    figures = {
        "echo": {100.0: (2.0, 100.0), 200.0: (20.0, 100.0)},
        "echo-stream": {100.0: (1.0, 50.0), 200.0: (1.5, 40.0)},
        "score": {100.0: (4.0, 400.0), 200.0: (30.0, 300.0)},
        "stream": {100.0: (3.0, 200.0), 200.0: (12.0, 160.0)},
    }
    summaries = [
        Summary(
            config=c.name,
            rpc=c.rpc,
            rate=rate,
            rounds=1,
            achieved=rate,
            p50=p99 / 4,
            p90=p99 / 2,
            p99=p99,
            p99_low=p99,
            p99_high=p99,
            p999=p99,
            max=p99,
            errors=0,
            dropped=0,
            cpu_us=cpu,
            steal_pct=None,
            histogram=HdrHistogram(1, 60_000_000, 3),
        )
        for rate in (100.0, 200.0)
        for c in configs
        for p99, cpu in [figures[c.rpc][rate]]
    ]
    machine = dict.fromkeys(
        ["cpus", "cpu_model", "memory", "os", "commit"]
        + [f"version_{p}" for p in ("python", "grpcio", "onnxruntime", "torch", "protobuf")],
        "x",
    )
    args = argparse.Namespace(
        out=tmp_path / "B.md",
        budget_p99_ms=10.0,
        quick=False,
        command="python -m loadtest.report",
        machine=machine,
        clients=1,
        seconds=1.0,
        rounds=1,
        replica_seconds=60.0,
    )
    suite = Suite(args)
    shutil.rmtree(suite.root)
    suite.configs = configs
    text = suite.markdown(summaries, {}, 100.0)
    assert "answers Score only" not in text

    latency, best = markdown_tables(text)[:2]
    column = {name: i for i, name in enumerate(latency[0])}
    ratios = {
        (row[column["rpc"]], float(row[column["offered/s"]])): (
            row[column["p99 vs echo"]],
            row[column["CPU vs echo"]],
        )
        for row in latency[1:]
    }
    assert ratios == {
        ("echo", 100.0): ("1.00", "1.00"),
        ("echo", 200.0): ("1.00", "1.00"),
        ("echo-stream", 100.0): ("1.00", "1.00"),
        ("echo-stream", 200.0): ("1.00", "1.00"),
        ("score", 100.0): ("2.00", "4.00"),
        ("score", 200.0): ("1.50", "3.00"),
        ("stream", 100.0): ("3.00", "4.00"),
        ("stream", 200.0): ("8.00", "4.00"),
    }
    # Highest rate in budget: ScoreStream's 100/s is half the echo's ScoreStream 200/s
    # (and would read 100 % against the unary echo's 100/s).
    expected = {
        "echo": ("100", "100%"),
        "echo-stream": ("200", "100%"),
        "score": ("100", "100%"),
        "stream": ("100", "50%"),
    }
    assert {row[0]: (row[1], row[2]) for row in best[1:]} == {
        c.name: expected[c.rpc] for c in configs
    }


async def run_ab(
    trained_model: Path,
    *args: str,
    rounds: int = 1,
    ok: bool = True,
    load: tuple[str, str] = ("--rates", "40"),
) -> str:
    """``loadtest.ab`` for a smoke test: 1 s steps at 40/s (or ``load``), a small
    replica; its output (``ok``: it exited 0). No temporary worktree may be left
    behind either way."""
    out = await run_module(
        "loadtest.ab",
        *args,
        "--model-repository",
        str(trained_model),
        *load,
        "--seconds",
        "1",
        "--rounds",
        str(rounds),
        "--replica-seconds",
        "20",
        timeout=240,
        expect_exit_0=ok,
    )
    worktrees = await asyncio.to_thread(
        subprocess.run,
        ["git", "-C", str(ROOT), "worktree", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "streamscore-ab-" not in worktrees.stdout
    return out


async def test_ab_compares_a_commit_with_this_tree(trained_model: Path) -> None:
    # Base = HEAD: both servers are the same code, so both must answer everything.
    out = await run_ab(trained_model, "--base", "HEAD", "--model-echo", "--null-score", rounds=2)
    table = markdown_tables(out)[0]
    column = {name: i for i, name in enumerate(table[0])}
    rows = {row[0]: row for row in table[1:]}
    assert set(rows) == {"echo", "model echo", "null Score", "base HEAD", "this tree"}, out
    for name, row in rows.items():
        assert row[column["achieved/s"]].startswith("40 ("), (name, row)
        assert row[column["errors+dropped"]] == "0", (name, row)
        median_cpu = float(row[column["server CPU us/req"]].split()[0])
        assert median_cpu > 0, (name, row)
        assert 0 <= float(row[column["CPU steal %"]].split()[0]) <= 100, (name, row)


async def test_ab_closed_loop_steps_keep_calls_in_flight(trained_model: Path) -> None:
    """``--in-flight``: each server kept busy by that many calls (DESIGN.md's "QPS at
    64 in flight"), its throughput in the achieved column."""
    out = await run_ab(trained_model, "--base", "HEAD", load=("--in-flight", "4"))
    table = markdown_tables(out)[0]
    column = {name: i for i, name in enumerate(table[0])}
    rows = {row[0]: row for row in table[1:]}
    assert set(rows) == {"echo", "base HEAD", "this tree"}, out
    for name, row in rows.items():
        assert row[column["in flight"]] == "4", (name, row)
        # Four calls kept going for 1 s on loopback: far more than 40 answered.
        assert float(row[column["achieved/s"]].split()[0].replace(",", "")) > 40, (name, row)
        assert row[column["errors+dropped"]] == "0", (name, row)


async def test_ab_closed_loop_steps_on_score_stream(trained_model: Path) -> None:
    stream = ("--rpc", "stream")
    out = await run_ab(trained_model, "--base", "HEAD", *stream, load=("--in-flight", "8"))
    table = markdown_tables(out)[0]
    column = {name: i for i, name in enumerate(table[0])}
    rows = {row[0]: row for row in table[1:]}
    assert set(rows) == {"echo", "base HEAD", "this tree"}, out
    for name, row in rows.items():
        assert row[column["rpc"]] == ("echo-stream" if name == "echo" else "stream"), row
        assert float(row[column["achieved/s"]].split()[0].replace(",", "")) > 40, (name, row)
        assert row[column["errors+dropped"]] == "0", (name, row)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--in-flight", "6", "--rpc", "stream"], "a multiple of 4"),
        (["--in-flight", "1", "--clients", "2"], "a multiple of 2"),
        (["--in-flight", "8", "--rates", "10"], "not allowed with argument"),
    ],
)
def test_ab_refuses_closed_loop_steps_it_cannot_run(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtest.ab import parse

    with pytest.raises(SystemExit) as exit_:
        parse(["--base", "HEAD", "--model-repository", "/nonexistent", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_load_profile_refuses_calls_in_flight_it_cannot_share_evenly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loadtest.load_profile import parse

    with pytest.raises(SystemExit) as exit_:
        parse(["--model-repository", "/nonexistent", "--in-flight", "3", "--clients", "2"])
    assert exit_.value.code == 2
    assert "a multiple of 2" in capsys.readouterr().err
    assert parse(["--model-repository", "/x", "--in-flight", "4"]).in_flight == 4


async def test_ab_head_serves_another_commit_from_its_own_worktree(trained_model: Path) -> None:
    out = await run_ab(trained_model, "--base", "HEAD~1", "--head", "HEAD")
    rows = {row[0]: row for row in markdown_tables(out)[0][1:]}
    assert set(rows) == {"echo", "base HEAD~1", "head HEAD"}, out
    assert all(row[-1] == "0" for row in rows.values()), out  # no errors, nothing dropped


async def test_null_score_is_the_server_with_an_empty_score(
    trained_model: Path, tmp_path: Path
) -> None:
    """``loadtest.null_score serve``: Score and each ScoreStream message answered with
    the echo's canned response, while the rest is streamscore's server (its health,
    its GetFeatures from the replica). Like every load tool's server, it serves a copy
    of the repository: served in place, its settings were applied to the repository's
    stored rollout, and a live server sharing it lost its pinned primary."""
    from loadtest.echo_server import canned
    from loadtest.servers import serve_process
    from streamscore.client import wait_serving
    from streamscore.loopback_process import find_free_port
    from streamscore.stream.broker import EmbeddedBroker, create_topics
    from streamscore.stream.topics import TopicLayout

    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        port = find_free_port()
        repository = tmp_path / "models"
        shutil.copytree(trained_model, repository)
        pinned = {"primary": "1", "canary": "", "canary_percent": 0.0, "shadows": []}
        stored = repository / "fraud_mlp" / "rollout.json"
        stored.write_text(json.dumps({**pinned, "generation": 7, "settings": pinned}))
        live_rollout = stored.read_bytes()
        server = serve_process(
            "null Score",
            broker.bootstrap,
            port,
            repository,
            env={},
            log_path=str(tmp_path / "null-score.log"),
            cwd=str(ROOT),
            module="loadtest.null_score",
        )
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            await wait_serving(target, timeout=90)
            requests = [
                pb.ScoreRequest(
                    request_id=f"n-{i}",
                    transaction=pb.Transaction(card_id="c-1", merchant_id="m-1", amount_minor=100),
                )
                for i in range(4)
            ]
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.ScoringStub(channel)
                unary = await stub.Score(requests[0], timeout=10)
                streamed = [a async for a in stub.ScoreStream(iter(requests[1:]), timeout=10)]
                features = await stub.GetFeatures(
                    pb.FeaturesRequest(entity_type="card", entity_id="c-1"), timeout=10
                )
        finally:
            await server.stop()
    assert [unary, *streamed] == [canned(r.request_id) for r in requests]
    assert features.entity_id == "c-1" and features.features["card_txn_count_1h"] == 0
    assert stored.read_bytes() == live_rollout


def test_ab_builds_the_bases_c_kernels(tmp_path: Path) -> None:
    """A fresh worktree has no compiled kernels (they are not in git): unbuilt, the
    base would run its Python fallbacks and look slower than it is."""
    from loadtest.ab import build_extensions

    checkout = tmp_path / "base"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), "HEAD"],
        check=True,
        capture_output=True,
    )
    try:
        probe = [
            sys.executable,
            "-c",
            "import streamscore.kernels._windows, streamscore.kernels._dense",
        ]
        unbuilt = subprocess.run(probe, cwd=checkout, capture_output=True, text=True)
        assert unbuilt.returncode != 0 and "ModuleNotFoundError" in unbuilt.stderr
        build_extensions(checkout)
        built = subprocess.run(probe, cwd=checkout, capture_output=True, text=True)
        assert built.returncode == 0, built.stderr
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)],
            check=False,
            capture_output=True,
        )
    build_extensions(tmp_path)  # no setup.py (a commit from before the kernels): nothing


async def test_ab_this_env_changes_only_this_trees_server(trained_model: Path) -> None:
    # A budget nothing can meet, answered as an error: this tree's server refuses the
    # load tool's first Score (which ends the run), the base's and the echo's answer.
    out = await run_ab(
        trained_model,
        "--base",
        "HEAD",
        "--this-env",
        "STREAMSCORE_BUDGET_MS=0.001",
        "--this-env",
        "STREAMSCORE_DEADLINE_POLICY=error",
        ok=False,
    )
    assert re.search(r"round 1/1 +base HEAD +40/s: [0-9,]+/s answered, p99", out), out
    assert re.search(r"round 1/1 +echo +40/s: [0-9,]+/s answered, p99", out), out
    assert re.search(r"did not answer Score: DEADLINE_EXCEEDED", out), out
    assert not re.search(r"round 1/1 +this tree", out), out


async def run_load_profile(trained_model: Path, samples: Path, *extra: str) -> str:
    """``loadtest.load_profile`` for a smoke test: 8 s at 300/s, a small replica. Enough
    requests that every part of Score gets samples: at 2 s and 100/s (about 140
    samples) the feature reads, ~2 % of the CPU there, went unsampled in one run of
    fifty or so, at 3 s (259 samples) once in CI, and at 5 s (397 samples: py-spy
    kept a sixth of its 500 a second) all of Score's Python once in CI."""
    return await run_module(
        "loadtest.load_profile",
        "--model-repository", str(trained_model),
        "--rate", "300",
        "--seconds", "8",
        "--replica-seconds", "20",
        "--out", str(samples),
        *extra,
        timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize(
    "perf",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                shutil.which("perf") is None, reason="no perf on PATH (Debian: linux-perf)"
            ),
        ),
    ],
    ids=["py-spy", "py-spy+perf"],
)
async def test_load_profile_sorts_a_real_servers_samples(
    trained_model: Path, tmp_path: Path, perf: bool
) -> None:
    samples = tmp_path / "samples.txt"
    out = await run_load_profile(trained_model, samples, *(["--perf"] if perf else []))
    assert re.search(r"score at 300/s offered, \d+/s achieved, .* us/req; \d+ samples", out), out
    tables = markdown_tables(out)
    rows = {row[0]: row for row in tables[0][1:]}
    shares = {name: float(row[1].rstrip("%")) for name, row in rows.items()}
    assert abs(sum(shares.values()) - 100) < 1, out
    # A real server scored: gRPC's native work, and some of Score's Python (its parts
    # are a few per cent each of a few hundred samples: any one may go unsampled).
    native = "event loop, no Python frame"
    assert any(n.startswith(native) and share > 0 for n, share in shares.items()), out
    python = ("rest of the server's Python", "features", "model call")
    assert any(n.startswith(python) and share > 0 for n, share in shares.items()), out
    assert samples.stat().st_size > 0
    # CPU per request by thread: the loop's thread did most of it, gRPC's threads some.
    threads = {row[0]: float(row[1]) for row in tables[1][1:]}
    assert threads["event loop (main thread)"] > 0, out
    assert threads["event loop (main thread)"] == max(threads.values()), out
    assert threads.get("event_engine threads", 0) > 0, out
    if perf:
        libraries = {row[0]: float(row[1].rstrip("%")) for row in tables[2][1:]}
        assert 95 < sum(libraries.values()) <= 100.5, out
        # The interpreter and gRPC's compiled core both ran on the loop's thread.
        assert any(name.startswith("libpython") and share > 5 for name, share in libraries.items())
        assert any(name.startswith("cygrpc") and share > 1 for name, share in libraries.items())


def test_load_profile_counts_the_dense_kernel_as_the_model_call(tmp_path: Path) -> None:
    """The dense kernel lives under streamscore/kernels/, beside the window kernel, but
    its samples are the model call's, not the features'."""
    from loadtest.load_profile import parts

    loop = "<module> (streamscore/__main__.py:3);run (asyncio/runners.py:118)"
    scoring = f"{loop};score (streamscore/server/scoring.py:180)"
    samples = tmp_path / "samples.txt"
    samples.write_text(
        f"{scoring};submit (streamscore/server/batcher.py:540);"
        "run (streamscore/server/backends/onnx_backend.py:183);"
        "__call__ (streamscore/kernels/dense.py:281) 3\n"
        f"{scoring};features (streamscore/stream/state.py:240);"
        "window (streamscore/kernels/tiles.py:190) 2\n"
    )
    total, counts = parts(samples)
    assert total == 5
    assert {name.split(":")[0]: n for name, n in counts.items()} == {
        "model call": 3,
        "features": 2,
    }


@pytest.mark.parametrize("server", ["--echo", "--model-echo"])
async def test_load_profile_echo_profiles_the_baseline_the_same_way(
    trained_model: Path, tmp_path: Path, server: str
) -> None:
    out = await run_load_profile(trained_model, tmp_path / "samples.txt", server)
    label = "model echo, echo" if server == "--model-echo" else "echo"
    pattern = rf"^{label} at 300/s offered, \d+/s achieved, .* us/req; \d+ samples"
    assert re.search(pattern, out, re.MULTILINE), out
    tables = markdown_tables(out)
    shares = {row[0]: float(row[1].rstrip("%")) for row in tables[0][1:]}
    assert abs(sum(shares.values()) - 100) < 1, out
    # The echo servers run none of our scoring code but the model echo's model call.
    assert not any(name.startswith("features") for name in shares), out
    if server == "--echo":
        assert not any(name.startswith("model call") for name in shares), out
    threads = {row[0]: float(row[1]) for row in tables[1][1:]}
    assert threads["event loop (main thread)"] > 0, out


@pytest.mark.parametrize("onnx_kernel", ["auto", "onnxruntime"])
async def test_score_profile_breakdown(trained_model: Path, onnx_kernel: str) -> None:
    out = await run_module(
        "loadtest.score_profile",
        "--model-repository",
        str(trained_model),
        "--events",
        "2000",
        "--requests",
        "600",
        "--breakdown",
        "--cold",
        "--cold-rows",
        "1,4",
        "--bytecodes",
        "--onnx-kernel",
        onnx_kernel,
        timeout=120,
    )
    per_call = {
        line.split("  ")[1].strip(): float(line.split()[-2])
        for line in out.splitlines()
        if line.startswith("  ") and line.endswith(" us")
    }
    assert len(per_call) == 4, out
    assert all(value > 0 for value in per_call.values()), out
    # The whole body includes the features and the batcher round trip.
    whole = per_call["whole Score body (ScoringService.score)"]
    assert whole > per_call["features (assemble_features)"], out
    assert re.search(r"Score in process: \d+ us wall, \d+ us CPU per call", out), out
    rows = re.findall(r"evicted before each row of (\d+) calls: (\d+) us CPU per call", out)
    assert [row for row, _ in rows] == ["1", "4"] and all(int(us) > 0 for _, us in rows), out
    inline = re.search(
        r"inline model call \(backend.infer_inline, batch 1\): ([\d.]+) us CPU, "
        r"([\d.]+) us of it in the kernel",
        out,
    )
    assert inline is not None, out
    assert 0 < float(inline[1]) and 0 <= float(inline[2]) <= float(inline[1]), out
    cold = re.search(
        r"with the caches evicted before each call: (\d+) us CPU per call "
        r"\(passes (\d+), (\d+), (\d+)\)",
        out,
    )
    assert cold is not None, out
    assert sorted(float(p) for p in cold.groups()[1:])[1] == float(cold[1]) > 0, out
    counted = re.search(
        r"counted: (\d+) bytecodes, ([\d.]+) Python and ([\d.]+) C calls per call; "
        r"most in (.+)$",
        out,
        re.MULTILINE,
    )
    assert counted is not None, out
    assert int(counted[1]) > 100 and float(counted[2]) > 10 and float(counted[3]) > 1, out
    assert "ScoringService.score" in counted[4], out


async def test_model_call_cost_times_both_kernels_per_batch_size(trained_model: Path) -> None:
    out = await run_module(
        "loadtest.model_call_cost",
        "--model-repository",
        str(trained_model),
        "--sizes",
        "1,40",
        "--calls",
        "50",
        "--repeat",
        "1",
        timeout=120,
    )
    (table,) = markdown_tables(out)
    assert [row[0] for row in table[1:]] == ["1", "40"], out
    one_row = re.search(
        r"one row \(a tuple of floats\), inline: score_row_inline ([\d.]+) us, "
        r"np.array \+ infer_inline ([\d.]+) us",
        out,
    )
    assert one_row is not None and float(one_row[1]) > 0 and float(one_row[2]) > 0, out
    for row in table[1:]:
        times = [float(cell.removesuffix(" us")) for cell in row[1:3] + row[4:6]]
        assert all(t > 0 for t in times), out
        # The ratio is of the unrounded times; the times are printed to 0.1 us.
        ratio = float(row[3].removesuffix("x"))
        low, high = (times[0] - 0.05) / (times[1] + 0.05), (times[0] + 0.05) / (times[1] - 0.05)
        assert low - 0.005 <= ratio <= high + 0.005, out


async def test_wire_cost_times_both_codecs_hot_and_cold() -> None:
    out = await run_module("loadtest.wire_cost", "--passes", "1", timeout=120)
    (table,) = markdown_tables(out)
    assert [row[0].split(",")[0] for row in table[1:]] == ["request"] * 2 + ["response"] * 2
    assert all(float(cell) > 0 for row in table[1:] for cell in row[1:]), out


async def test_pacing_cost_times_both_ways_of_starting_a_score() -> None:
    out = await run_module(
        "loadtest.pacing_cost", "--rounds", "1", "--messages", "2000", timeout=60
    )
    found = re.search(r"directly ([0-9.]+) us, through the pacing ([0-9.]+) us \(\+", out)
    assert found is not None, out
    assert all(float(value) > 0 for value in found.groups()), out


async def run_scaling(trained_model: Path, tmp_path: Path, *args: str) -> tuple[str, dict]:
    """``loadtest.scaling`` for a smoke test: one 1 s step from one client process, a
    budget nothing misses; its output and its JSON report."""
    report_path = tmp_path / "scaling.json"
    out = await run_module(
        "loadtest.scaling",
        "--model-repository",
        str(trained_model),
        "--seconds",
        "1",
        "--clients",
        "1",
        "--refine",
        "0",
        "--budget-p99-ms",
        "5000",
        "--replica-seconds",
        "20",
        "--logs",
        str(tmp_path / "logs"),
        "--json",
        str(report_path),
        *args,
        timeout=240,
    )
    return out, json.loads(report_path.read_text())


async def test_scaling_sweeps_echo_and_serve_sets_of_processes(
    trained_model: Path, tmp_path: Path
) -> None:
    """One and two processes of each (echo, ``serve --workers``) on a shared port,
    one step each: the report parses, every set answered, and the load and the CPU
    are attributed to each serving process."""
    plot_path = tmp_path / "scaling.png"
    out, report = await run_scaling(
        trained_model,
        tmp_path,
        "--workers",
        "2,1",
        "--rates",
        "60",
        "--connections",
        "6",
        "--plot",
        str(plot_path),
    )
    sets = {(r["kind"], r["workers"]): r for r in report["results"]}
    assert sorted(sets) == [("echo", 1), ("echo", 2), ("score", 1), ("score", 2)], out
    for (kind, workers), result in sets.items():
        assert result["max_rate"] == 60.0, (kind, workers, out)
        (row,) = result["rows"]
        assert row["ok"] == 60 and row["errors"] == 0 and row["dropped"] == 0, row
        assert row["server_cpu_us"] > 0, row
        # CPU is read per serving process: the echo processes, or the workers.
        assert len(result["cpu_seconds_per_process"]) == workers, result
        assert sum(result["cpu_seconds_per_process"]) > 0, result
        if kind == "score":
            # Each worker's own /metrics: the warm-up calls and the step, all counted.
            assert len(result["served_per_worker"]) == workers, result
            assert sum(result["served_per_worker"]) >= 60, result
    table = markdown_tables(out)[-1]
    assert [row[0] for row in table[1:]] == ["1", "2"], out
    assert table[1][4] == "1.00x" and table[1][5] == "1.00x", out
    assert plot_path.read_bytes().startswith(PNG)


async def test_scaling_with_client_spread_reaches_every_process_evenly(
    trained_model: Path, tmp_path: Path
) -> None:
    """``--spread client``: each process on a port of its own, and one connection per
    worker from a round_robin channel; both workers answer about half the calls (the
    shared port would hand a single channel's calls all to one of them)."""
    out, report = await run_scaling(
        trained_model,
        tmp_path,
        "--workers",
        "2",
        "--spread",
        "client",
        "--rates",
        "100",
        "--connections",
        "1",
    )
    assert report["spread"] == "client"
    sets = {r["kind"]: r for r in report["results"]}
    assert sorted(sets) == ["echo", "score"], out
    for result in sets.values():
        (row,) = result["rows"]
        assert row["ok"] == 100 and row["errors"] == 0 and row["dropped"] == 0, row
        assert min(result["cpu_seconds_per_process"]) > 0, result
    served = sets["score"]["served_per_worker"]
    assert len(served) == 2 and min(served) >= 0.4 * sum(served), (served, out)


async def test_gc_pauses_runs_both_policies_and_reports_them(tmp_path: Path) -> None:
    report = tmp_path / "gc.json"
    out = await run_module(
        "loadtest.gc_pauses",
        "--cards",
        "3000",
        "--seconds",
        "1",
        "--events-per-s",
        "500",
        "--interval",
        "0.1",
        "--json",
        str(report),
        timeout=120,
    )
    off, on = json.loads(report.read_text())
    assert (off["policy"], on["policy"]) == ("off", "on")
    for result in (off, on):
        assert result["entities"] > 3000 and result["reads"] == 500, result
        assert result["read_ms"]["max"] >= result["read_ms"]["p99"] > 0, result
    # Only the policy froze anything, and it did while serving (collecting gen 1 first).
    assert off["frozen_objects"] == 0 and on["frozen_objects"] > 30_000
    assert on["serve_pauses"]["1"]["count"] >= 5
    (table,) = markdown_tables(out)
    assert [row[0] for row in table[1:]] == ["off", "on"]


async def test_gc_leaks_finds_no_frozen_cycle_left_by_any_kind_of_call(
    trained_model: Path,
) -> None:
    # Answered, refused, timed-out and cancelled calls, unary and streamed, with a
    # freeze every 10 ms: before the fixes in scoring.py (status set rather than
    # context.abort(), the stream's request reader closed) this found 100-700 objects.
    out = await run_module(
        "loadtest.gc_leaks", "--model-repository", str(trained_model), "--rounds", "60",
        timeout=120,
    )  # fmt: skip
    assert "Score, no transaction: INVALID_ARGUMENT 60" in out, out
    assert "ScoreStream, cancelled: CANCELLED 60" in out and "ScoreStream: OK 60" in out, out
    freezes = int(re.search(r"(\d+) freezes", out).group(1))  # type: ignore[union-attr]
    assert freezes >= 10, out
    assert "left as cyclic garbage (leaked): 0 objects" in out, out


async def test_ingest_cost_measures_a_flow_the_replica_keeps_up_with(
    trained_model: Path, tmp_path: Path
) -> None:
    report = tmp_path / "ingest.json"
    out = await run_module(
        "loadtest.ingest_cost",
        "--model-repository", str(trained_model),
        "--flows", "0,300",
        "--score-rate", "100",
        "--seconds", "1.5",
        "--settle-s", "0.5",
        "--rounds", "1",
        "--clients", "1",
        "--replica-seconds", "60",
        "--json", str(report),
        timeout=240,
    )  # fmt: skip
    result = json.loads(report.read_text())
    idle, flowing = result["rows"]
    assert (idle["flow"], flowing["flow"]) == (0, 300)
    # The flow really ran at its rate, and every entry it sent was folded (exit 0 says
    # the same; the tool exits 1 when the replica fell behind).
    assert 200 <= flowing["achieved_flow"] <= 400, flowing
    for step in result["steps"]:
        assert step["entries_folded"] == step["entries_sent"], step
    assert max(s["entries_sent"] for s in result["steps"]) >= 4 * 300, result["steps"]
    # Folding costs CPU: the server works harder with the flow than without it.
    assert flowing["flow_core"] > idle["flow_core"] > 0, result["rows"]
    assert flowing["replica_us_per_event"] > 0 and idle["replica_us_per_event"] is None
    for row in result["rows"]:
        assert row["score_rate"] > 0 and row["score_cpu_us"] > 0 and row["errors"] == 0, row
        # The server's loop-lag probe ran through the Score phase (a NaN p99 would
        # mean no probe was seen), and its lateness splits into non-negative parts.
        assert 0 <= row["loop_lag_p99_ms"] < 5000, row
        assert row["late_busy_ms_per_s"] >= 0 and row["late_cpu_wait_ms_per_s"] >= 0, row
        assert 0 <= row["steal_pct"] <= 100, row
    (table,) = markdown_tables(out)
    assert [row[0].split()[0] for row in table[1:]] == ["0", "300"], table


async def test_fetch_cost_measures_each_way_of_fetching() -> None:
    out = await run_module(
        "loadtest.fetch_cost", "--seconds", "1", "--rounds", "1", timeout=120
    )  # fmt: skip
    table = markdown_tables(out)[0]
    column = {name: i for i, name in enumerate(table[0])}
    rows = {row[0]: row for row in table[1:]}
    assert set(rows) == {"consumer", "client", "lean"}, out
    for row in rows.values():
        # tansu answers an idle Fetch when its 20 ms wait runs out: tens per second.
        assert 10 < float(row[column["fetches/s"]]) < 100, out
        assert float(row[column["us of CPU per fetch"]]) > 0, out


def test_each_private_repository_is_the_repository_as_it_is_then(trained_model: Path) -> None:
    """``backend_bench --shadows`` adds versions to its repository between its servers:
    a copy kept per source served the shadows' server the repository before they were
    added ("no version '2'"), and the run failed after its 120 s start wait."""
    from loadtest.servers import add_copy, private_repository

    stored = trained_model / "fraud_mlp" / "rollout.json"
    stored.write_text("{}")
    first = private_repository(trained_model)
    add_copy(trained_model, "2")
    second = private_repository(trained_model)
    assert first != second
    assert sorted(p.name for p in (first / "fraud_mlp").iterdir() if p.is_dir()) == ["1"]
    assert sorted(p.name for p in (second / "fraud_mlp").iterdir() if p.is_dir()) == ["1", "2"]
    assert not (second / "fraud_mlp" / "rollout.json").exists()  # the live rollout stays


def test_a_load_tool_stopped_by_sigterm_removes_its_private_repository(
    trained_model: Path, tmp_path: Path
) -> None:
    """A load tool stopped by SIGTERM (a process manager, `timeout`) left its copy of
    the repository in the temporary directory, one more at every run."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from loadtest.servers import private_repository\n"
        "print(private_repository(Path(sys.argv[1])), flush=True)\n"
        "time.sleep(60)\n"
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    with subprocess.Popen(
        [sys.executable, "-c", script, str(trained_model)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.PIPE,
        text=True,
    ) as tool:
        try:
            assert tool.stdout is not None
            copy = Path(tool.stdout.readline().strip())
            assert copy.is_dir() and copy.is_relative_to(temp), copy
            tool.send_signal(signal.SIGTERM)
            assert tool.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            tool.kill()
    assert list(temp.iterdir()) == []


def test_a_tools_work_directory_is_removed_unless_the_run_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """backend_bench, pipeline_bench and ab left their directory (servers' logs,
    repository copies) in the temporary directory at every run."""
    from loadtest.workdir import work_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with work_directory("tool") as done:
        (done / "server.log").write_text("fine")
    assert not done.exists()
    with pytest.raises(KeyboardInterrupt), work_directory("tool") as stopped:
        raise KeyboardInterrupt
    assert not stopped.exists()
    with pytest.raises(RuntimeError), work_directory("tool") as failed:
        (failed / "server.log").write_text("why")
        raise RuntimeError("server did not start")
    assert (failed / "server.log").read_text() == "why"
    assert f"tool failed; its files and logs are in {failed}" in capsys.readouterr().err

"""`streamscore serve --workers 2`: two processes share the port, both answer, both
have the features, each has its own port for clients that spread their calls, and
SIGTERM stops the set cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from test_rollout import request
from test_tls import Authority

from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import wait_serving
from streamscore.config import Settings
from streamscore.loopback_process import find_free_port, find_free_ports
from streamscore.processes import ChildProcess
from streamscore.server.app import ScoringServer
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout
from streamscore.supervisor import (
    RESTART_DELAY_MAX_S,
    RESTART_DELAY_S,
    RESTART_WINDOW_S,
    RESTARTS_MAX,
    RestartPolicy,
    spread_target,
)

from system import make_event, print_logs, publish, wait_folded


def scraped(metrics_port: int, series: str) -> float:
    """The sum of a worker's /metrics lines that start with ``series``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(series):
            total += float(line.rsplit(" ", 1)[1])
    return total


def served_by(metrics_port: int) -> float:
    """Score calls a worker answered, from its own /metrics."""
    return scraped(metrics_port, 'streamscore_rpc_seconds_count{code="OK",rpc="Score"}')


def children_of(pid: int) -> list[int]:
    """The process ids of ``pid``'s children."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(line) for line in found.stdout.split())


async def test_two_workers_share_the_port_and_both_serve_features(
    trained_model: Path, tmp_path: Path
) -> None:
    metrics = find_free_ports(2)
    own = find_free_ports(2)
    port = find_free_port()
    while port in (metrics, metrics + 1, own, own + 1) or own in (metrics, metrics + 1):
        port, own = find_free_port(), find_free_ports(2)
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        await publish(
            broker.bootstrap,
            [make_event("card-W", "m-1", "d-1", "ip-1", 1_000 + i, 100) for i in range(30)],
        )
        supervisor = ChildProcess.streamscore(
            "supervisor",
            "serve",
            "--workers",
            "2",
            "--kafka",
            broker.bootstrap,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics),
            "--worker-port-base",
            str(own),
            "--model-repository",
            str(trained_model),
            "--log-format",
            "text",
            env={"STREAMSCORE_DRAIN_DELAY_S": "0"},
            log_path=str(tmp_path / "supervisor.log"),
        )
        worker = ChildProcess.streamscore(
            "worker",
            "worker",
            "--kafka",
            broker.bootstrap,
            "--log-format",
            "text",
            log_path=str(tmp_path / "worker.log"),
        )
        await worker.start()
        await supervisor.start()
        try:
            target = f"127.0.0.1:{port}"
            await wait_serving(target, timeout=90)
            # New connections spread over the two listening sockets: many channels.
            for attempt in range(40):
                async with grpc.aio.insecure_channel(
                    target, options=[("grpc.use_local_subchannel_pool", 1)]
                ) as channel:
                    stub = pb_grpc.ScoringStub(channel)
                    await wait_serving(target, timeout=90)
                    reply = await stub.Score(request(attempt, f"card-{attempt}"), timeout=10)
                    assert reply.score >= 0
                    # Every worker folds every partition: the same features whichever
                    # answers (once the stream worker has routed the events).
                    features = await wait_folded(stub, "card", "card-W", 30, timeout=30)
                    assert features.events_folded == 30
                if min(served_by(metrics), served_by(metrics + 1)) > 0:
                    break
            counts = (served_by(metrics), served_by(metrics + 1))
            assert min(counts) > 0, f"one worker served nothing: {counts}"
            # Each worker runs the GC policy (server/gc_policy.py): its state is frozen
            # out of the collector's generations, and every collection is timed.
            for port_ in (metrics, metrics + 1):
                assert scraped(port_, "streamscore_gc_frozen_objects") > 10_000
                assert scraped(port_, 'streamscore_gc_pause_seconds_count{generation="1"}') > 0
                # Each worker's replica, caught up, fetches with its lean fetch.
                assert scraped(port_, "streamscore_replica_fetching_lean") == 1
                assert scraped(port_, "streamscore_replica_lean_fallbacks_total") == 0

            # Each worker's own port: a round_robin client spreads its calls evenly,
            # over one channel (the shared port would give all of them to one worker).
            target = spread_target("127.0.0.1", own, 2)
            assert target == f"ipv4:127.0.0.1:{own},127.0.0.1:{own + 1}"
            async with grpc.aio.insecure_channel(
                target, options=[("grpc.lb_policy_name", "round_robin")]
            ) as channel:
                stub = pb_grpc.ScoringStub(channel)
                # round_robin calls only the workers whose connection is up: call until
                # both have answered once.
                for i in range(200):
                    await stub.Score(request(i, f"card-up-{i}"), timeout=10)
                    before = (served_by(metrics), served_by(metrics + 1))
                    if min(before[0] - counts[0], before[1] - counts[1]) > 0:
                        break
                for i in range(20):
                    await stub.Score(request(i, f"card-rr-{i}"), timeout=10)
            after = (served_by(metrics), served_by(metrics + 1))
            assert (after[0] - before[0], after[1] - before[1]) == (10, 10)
            assert supervisor.process is not None

            # A worker that dies is started again; the set keeps serving meanwhile.
            workers = children_of(supervisor.process.pid)
            assert len(workers) == 2, workers
            os.kill(workers[0], signal.SIGKILL)
            for _ in range(200):
                now = children_of(supervisor.process.pid)
                if len(now) == 2 and workers[0] not in now:
                    break
                await asyncio.sleep(0.1)
            assert len(now) == 2 and workers[0] not in now, (workers, now)
            assert not supervisor.exited.is_set()
            await wait_serving(f"127.0.0.1:{own}", timeout=90)  # the new one's own port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{own}") as channel:
                stub = pb_grpc.ScoringStub(channel)
                assert (await wait_folded(stub, "card", "card-W", 30)).events_folded == 30

            supervisor.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(supervisor.exited.wait(), 40)
            assert supervisor.returncode == 0
        finally:
            await supervisor.stop()
            await worker.stop()
            print_logs(tmp_path)
    # The workers' lines, merged into the supervisor's output, each say whose they are.
    log_lines = (tmp_path / "supervisor.log").read_text().splitlines()
    listening = [line for line in log_lines if "grpc server listening" in line]
    restarted = [line for line in log_lines if "worker exited, starting it again" in line]
    assert restarted and all(re.search(r" worker=\d+( |$)", line) for line in restarted)
    indexes = [re.findall(r" worker=(\d+)", line) for line in listening]
    assert sorted({i for found in indexes for i in found}) == ["0", "1"], listening
    assert all(len(found) == 1 for found in indexes), listening


async def test_a_second_server_on_a_port_in_use_fails_to_start(trained_model: Path) -> None:
    """Only a --workers set shares its port (reuse_port): a server started twice by
    mistake must not take half the connections unnoticed."""
    first = ScoringServer(Settings(port=0, model_repository=trained_model))
    await first.start()
    try:
        second = ScoringServer(Settings(port=first.port, model_repository=trained_model))
        try:
            with pytest.raises((RuntimeError, OSError)):
                await second.start()
        finally:
            await second.stop()
        # Processes of one set share it, as asked.
        shared = [ScoringServer(Settings(port=0, model_repository=trained_model, reuse_port=True))]
        await shared[0].start()
        shared.append(
            ScoringServer(
                Settings(port=shared[0].port, model_repository=trained_model, reuse_port=True)
            )
        )
        try:
            await shared[1].start()
            assert shared[1].port == shared[0].port
        finally:
            for server in reversed(shared):
                await server.stop()
    finally:
        await first.stop()


def serve_two_workers(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``serve --workers 2`` on ``repository`` (a broker nowhere), run to its end: for
    what stops a set before it serves."""
    argv = [sys.executable, "-m", "streamscore", "serve", "--workers", "2"]
    argv += ["--kafka", "127.0.0.1:9", "--port", str(find_free_port())]
    argv += ["--model-repository", str(repository), "--log-format", "text", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_workers_with_a_bad_tls_setting_fail_once_with_the_reason(
    trained_model: Path, tmp_path: Path
) -> None:
    """Checked before any worker starts: each worker died of it, was started again, and
    the set ended on "workers keep dying", the cause buried in their output."""
    authority = Authority(tmp_path, "workers-ca")
    cert, _ = authority.issue("server", server=True)
    _, other_key = authority.issue("other", server=True)
    missing = str(tmp_path / "missing.key")
    for key, reason in (
        (other_key, "does not match the certificate"),
        (missing, f"cannot read the TLS key {missing!r}"),
    ):
        started = time.monotonic()
        result = serve_two_workers(trained_model, "--tls-cert-file", cert, "--tls-key-file", key)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert time.monotonic() - started < 30, output[-3000:]
        # No worker started (each would have died of it, again and again).
        assert "server-0" not in output and "keep dying" not in output, output[-3000:]
        [line] = [x for x in result.stderr.splitlines() if x.startswith("streamscore:")]
        assert reason in line, line


def test_workers_without_the_model_fail_once_with_the_reason(tmp_path: Path) -> None:
    """A repository without the model (a wrong path): each worker died of it, was
    started again, and the set ended on "workers keep dying"."""
    empty = tmp_path / "models"
    empty.mkdir()
    result = serve_two_workers(empty)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "server-0" not in output and "keep dying" not in output, output[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("streamscore:")]
    assert f"no versions of model 'fraud_mlp' under {empty}" in line, line


@pytest.mark.parametrize(
    ("broken", "reason"),
    [("corrupt", "does not load: InvalidProtobuf"), ("missing", "No such file or directory")],
)
def test_workers_on_a_model_that_does_not_load_stop_at_the_first(
    trained_model: Path, tmp_path: Path, broken: str, reason: str
) -> None:
    """A worker that stops on what it was given (exit 2: here a corrupt model file,
    or a version without its metadata) stops the set at once, exit 2: six more
    deaths mended nothing and buried the cause under "workers keep dying"."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    version = repository / "fraud_mlp" / "1"
    if broken == "corrupt":
        (version / "model.onnx").write_bytes(b"not a model")
    else:
        (version / "metadata.json").unlink()
    result = serve_two_workers(repository)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "keep dying" not in output and "starting it again" not in output, output[-3000:]
    assert f"model version {version} does not load" in output, output[-3000:]
    assert reason in output, output[-3000:]
    assert "a worker stopped on what it was given (exit 2" in output, output[-3000:]


async def test_a_worker_listens_only_once_its_features_caught_up(
    trained_model: Path, broker: EmbeddedBroker
) -> None:
    """On a shared port the kernel hands connections to every process on it, whatever
    its health: a restarted worker listening while its replica rebuilt answered its
    share with features not yet folded. A process on a shared port (reuse_port, as
    `serve --workers` runs them) listens once caught up; one on a port of its own
    listens at once, and says NOT_SERVING until then."""

    class AtListening(logging.Handler):
        """Whether the features had caught up when the server began to listen."""

        caught_up: bool | None = None

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "grpc server listening":
                replica = server.replica
                self.caught_up = replica is not None and replica.caught_up

    for reuse_port in (True, False):
        settings = Settings(
            port=0, model_repository=trained_model, kafka=broker.bootstrap, reuse_port=reuse_port
        )
        server = ScoringServer(settings)
        at_listening = AtListening()
        logger = logging.getLogger("streamscore.server")
        level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(at_listening)
        try:
            await server.start()
        finally:
            logger.removeHandler(at_listening)
            logger.setLevel(level)
            await server.stop()
        assert at_listening.caught_up is reuse_port


def test_a_signal_while_starting_stops_the_server_at_once(
    trained_model: Path, tmp_path: Path
) -> None:
    """A worker waiting for its features to catch up (minutes on a long log) stops at
    once on SIGTERM, as a running one drains: here its broker never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts, never answers: the start waits on its first request
    try:
        argv = [sys.executable, "-m", "streamscore", "serve"]
        argv += ["--kafka", f"127.0.0.1:{silent.getsockname()[1]}", "--port", "0"]
        argv += ["--model-repository", str(trained_model), "--log-format", "text"]
        process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(5)  # started, waiting on the broker
            assert process.poll() is None
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
        assert process.returncode == 0, err[-3000:]
        assert time.monotonic() - signalled < 5, err[-3000:]
        assert "stopped while starting" in err, err[-3000:]
    finally:
        silent.close()


# `serve` whose feature replica dies of a bug once serving (a fold that raises past the
# per-entry skip): a stand-in for any error that ends the replica's task.
DYING_REPLICA_SERVE = """
import sys
from streamscore.cli import main
from streamscore.stream.replica import FeatureReplica

async def fold(self, records):
    if records:
        raise RuntimeError("fold bug")

FeatureReplica._fold = fold
sys.exit(main(sys.argv[1:]))
"""


async def test_serve_whose_replica_dies_drains_and_exits_1(
    trained_model: Path, tmp_path: Path
) -> None:
    """The replica's task ended on an error it did not expect: the server stayed up and
    SERVING, every answer FEATURES_STALE for good, /metrics still saying caught up. It
    drains (NOT_SERVING first) and exits 1 naming the cause, to be restarted."""
    import orjson
    from aiokafka import AIOKafkaProducer

    from streamscore.stream.topics import ENTITY_EVENTS

    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        port = find_free_port()
        argv = ["serve", "--kafka", broker.bootstrap, "--port", str(port), "--log-format", "text"]
        argv += ["--model-repository", str(trained_model)]
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            serve = await asyncio.create_subprocess_exec(
                sys.executable, "-c", DYING_REPLICA_SERVE, *argv, stdout=out, stderr=out
            )
            try:
                await wait_serving(f"127.0.0.1:{port}", timeout=60)
                producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
                await producer.start()
                try:
                    entry = ["card", "c-1", "e-1", int(time.time() * 1000), 100, 0, "m", "c-1"]
                    await producer.send_and_wait(ENTITY_EVENTS, orjson.dumps([entry]))
                finally:
                    await producer.stop()
                returncode = await asyncio.wait_for(serve.wait(), 60)
            finally:
                if serve.returncode is None:
                    serve.kill()
                    await serve.wait()
    output = log.read_text()
    assert returncode == 1, output[-3000:]
    assert "draining" in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last == "streamscore: feature replica failed: RuntimeError: fold bug", output[-3000:]


def test_the_restart_policy_backs_off_per_worker_and_gives_up_only_with_none_up() -> None:
    policy = RestartPolicy()
    # One worker dying again and again: at once, then doubling delays up to the ceiling.
    delays = [policy.died(0, now=float(t)) for t in range(9)]
    assert delays[:4] == [0.0, RESTART_DELAY_S, 2 * RESTART_DELAY_S, 4 * RESTART_DELAY_S]
    assert delays[-1] == RESTART_DELAY_MAX_S and delays == sorted(delays)
    # Past RESTARTS_MAX deaths, the set still runs while another worker is up...
    assert not policy.gives_up(workers_up=1, now=9.0)
    # ...and stops once none is.
    assert policy.gives_up(workers_up=0, now=9.0)
    # Deaths older than the window are forgotten: a worker that dies once an hour
    # starts again at once, and an old crash loop no longer counts.
    later = 9.0 + RESTART_WINDOW_S + 1
    assert policy.died(1, now=later) == 0.0 and policy.died(0, now=later) == 0.0
    assert not policy.gives_up(workers_up=0, now=later)
    # Another worker's deaths do not lengthen this one's delay.
    assert policy.died(1, now=later + 1) == RESTART_DELAY_S


async def test_a_worker_that_cannot_restart_in_a_broker_outage_leaves_the_set_serving(
    trained_model: Path, tmp_path: Path
) -> None:
    """During a broker outage a restarted worker exits at once (no broker to start
    on): its deaths came five a second and stopped the whole set, the worker still
    answering from memory included (audit AH). Now it is retried with a growing
    delay while the other serves, and is back once the broker is."""
    port, metrics = find_free_port(), find_free_ports(2)
    while port in (metrics, metrics + 1):
        port = find_free_port()
    broker = EmbeddedBroker()
    await broker.start()
    broker_port = broker.port
    await create_topics(broker.bootstrap, TopicLayout().partitions())
    supervisor = ChildProcess.streamscore(
        "supervisor",
        *("serve", "--workers", "2", "--kafka", broker.bootstrap, "--port", str(port)),
        *("--metrics-port", str(metrics), "--model-repository", str(trained_model)),
        *("--log-format", "text"),
        env={"STREAMSCORE_DRAIN_DELAY_S": "0"},
        log_path=str(tmp_path / "supervisor.log"),
    )
    log_file = tmp_path / "supervisor.log"

    def lines(text: str, worker: int) -> int:
        return sum(
            text in line and re.search(rf" worker={worker}( |$)", line) is not None
            for line in log_file.read_text().splitlines()
        )

    await supervisor.start()
    try:
        target = f"127.0.0.1:{port}"
        await wait_serving(target, timeout=90)
        assert supervisor.process is not None
        # Both listening first: the port serves once either does, and a worker 0 killed
        # before it listened had one listening line in all, never the two waited for.
        deadline = time.monotonic() + 90
        while lines("grpc server listening", 0) < 1 or lines("grpc server listening", 1) < 1:
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            await asyncio.sleep(0.1)
        await broker.stop()
        os.kill(children_of(supervisor.process.pid)[0], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while lines("worker exited, starting it again", 0) <= RESTARTS_MAX:
            assert not supervisor.exited.is_set(), log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            await asyncio.sleep(0.2)
        # Past the deaths that used to stop the set, the other worker still answers.
        assert not supervisor.exited.is_set()
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await pb_grpc.ScoringStub(channel).Score(request(1, "card-1"), timeout=10)
        assert reply.score >= 0
        # The broker back, the worker starts again and listens.
        broker = EmbeddedBroker(port=broker_port)
        await broker.start()
        deadline = time.monotonic() + 90
        while lines("grpc server listening", 0) < 2:
            assert not supervisor.exited.is_set(), log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            await asyncio.sleep(0.2)
        supervisor.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(supervisor.exited.wait(), 40)
        assert supervisor.returncode == 0
    finally:
        await supervisor.stop()
        await broker.stop()
        print_logs(tmp_path)

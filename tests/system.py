"""Helpers for tests that run the real system: broker, worker and server processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from aiokafka import AIOKafkaProducer

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import wait_serving
from streamscore.loopback_process import find_free_port as free_port
from streamscore.processes import ChildProcess
from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import PAYMENTS, TopicLayout

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def make_event(
    card: str, merchant: str, device: str, ip: str, t_ms: int, amount: int, status: str = "approved"
) -> dict:
    return {
        "event_id": f"evt-{uuid.uuid4().hex[:12]}",
        "event_time_ms": t_ms,
        "card_id": card,
        "merchant_id": merchant,
        "device_id": device,
        "ip": ip,
        "amount_minor": amount,
        "currency": "EUR",
        "mcc": "5411",
        "country": "DE",
        "status": status,
    }


def print_logs(logdir: Path) -> None:
    """Shown by pytest when a test fails."""
    for log_file in sorted(logdir.glob("*.log")):
        print(f"--- {log_file.name}\n{log_file.read_text()[-3000:]}")


async def publish(bootstrap: str, events: list[dict]) -> None:
    """Produce payment events to the payments topic, keyed by card as producers do."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_compat.producer_kwargs())
    await producer.start()
    try:
        for event in events:
            await producer.send(PAYMENTS, orjson.dumps(event), key=event["card_id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


def serve_process(
    bootstrap: str, port: int, repository: Path, logdir: Path, *args: str, **env: str
) -> ChildProcess:
    """A `streamscore serve` child on ``port`` logging to ``logdir/server.log``;
    ``env`` are settings (``budget_ms="100"`` becomes STREAMSCORE_BUDGET_MS)."""
    return ChildProcess.serve(
        "server",
        bootstrap,
        port,
        repository,
        *args,
        env={f"STREAMSCORE_{name.upper()}": value for name, value in env.items()},
        log_path=str(logdir / "server.log"),
    )


class System:
    """The real processes of one test, on one embedded broker; stopped in reverse order."""

    def __init__(self, bootstrap: str, logdir: Path, model_repository: Path) -> None:
        self.bootstrap = bootstrap
        self.logdir = logdir
        self.model_repository = model_repository
        self.children: list[ChildProcess] = []

    def _common(self) -> list[str]:
        return ["--kafka", self.bootstrap, "--log-format", "text"]

    async def add_worker(self, *args: str, env: dict[str, str] | None = None) -> ChildProcess:
        name = f"worker-{len(self.children)}"
        # Run in the log directory, so running_system can check that a worker leaves
        # nothing in its working directory.
        child = ChildProcess.streamscore(
            name,
            "worker",
            *self._common(),
            *args,
            env=env,
            log_path=str(self.logdir / f"{name}.log"),
            cwd=str(self.logdir),
        )
        await child.start()
        self.children.append(child)
        return child

    async def add_server(self, *args: str, wait: bool = True) -> tuple[ChildProcess, str]:
        name = f"server-{len(self.children)}"
        port = free_port()
        child = ChildProcess.streamscore(
            name,
            "serve",
            *self._common(),
            "--port",
            str(port),
            "--model-repository",
            str(self.model_repository),
            *args,
            log_path=str(self.logdir / f"{name}.log"),
        )
        await child.start()
        self.children.append(child)
        target = f"127.0.0.1:{port}"
        if wait:
            await wait_serving(target, timeout=90)
        return child, target

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()


@contextlib.asynccontextmanager
async def system_on_broker(logdir: Path, model_repository: Path) -> AsyncIterator[System]:
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        system = System(broker.bootstrap, logdir, model_repository)
        try:
            yield system
        finally:
            await system.stop()
            print_logs(logdir)


@contextlib.asynccontextmanager
async def running_system(
    logdir: Path,
    model_repository: Path,
    *,
    workers: int = 1,
    servers: int = 1,
    server_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = (),
) -> AsyncIterator[tuple[str, list[str]]]:
    """Broker + topics + worker processes + server processes; yields (bootstrap, targets)."""
    async with system_on_broker(logdir, model_repository) as system:
        for _ in range(workers):
            await system.add_worker(*worker_args)
        targets = [(await system.add_server(*server_args))[1] for _ in range(servers)]
        yield system.bootstrap, targets
        for child in system.children:
            child.check_running()
        # Faust makes an (unused) table directory; ours goes to a temp directory.
        assert not (logdir / "streamscore-worker-data").exists()


async def wait_folded(
    stub: pb_grpc.ScoringStub,
    entity_type: str,
    entity_id: str,
    expected: int,
    timeout: float = 60.0,
) -> pb.FeaturesResponse:
    deadline = time.monotonic() + timeout
    while True:
        reply = await stub.GetFeatures(
            pb.FeaturesRequest(entity_type=entity_type, entity_id=entity_id), timeout=5
        )
        if reply.events_folded >= expected or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.2)


def assert_features_match(served: dict, expected: dict) -> None:
    assert set(expected) <= set(served)
    for name, value in expected.items():
        assert served[name] == value, (
            name,
            served[name],
            value,
        )


# How closely two float32 kernels agree on one model's score: the dense kernel, and
# onnxruntime's (in process or inside Triton), sum in other orders and compute the
# sigmoid otherwise. The tolerance the dense kernel is held to against onnxruntime
# (tests/test_dense_kernel.py): relative 1e-4, absolute 1e-5. A tighter one passed or
# failed with the hour of day, a feature of every request.
KERNELS_AGREE = {"rel": 1e-4, "abs": 1e-5}


def model_score(repository: Path, model: str, version: str, features: dict) -> float:
    """The score the model file itself gives to the features a server says it used:
    an independent check of the served score, whatever the features were
    (onnxruntime's: compare a served score with ``KERNELS_AGREE``)."""
    directory = repository / model / version
    inputs = json.loads((directory / "metadata.json").read_text())["inputs"]
    session = ort.InferenceSession(str(directory / "model.onnx"))
    vector = np.array([[features[name] for name in inputs]], dtype=np.float32)
    return float(session.run(None, {"features": vector})[0][0, 0])


async def run_module(*argv: str, timeout: float, expect_exit_0: bool = True) -> str:
    """``python -m ARGV`` from the repository root; its output, asserting exit 0 (or,
    with ``expect_exit_0=False``, not 0)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *argv,
        cwd=REPOSITORY_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    output = out.decode(errors="replace")
    assert (process.returncode == 0) == expect_exit_0, output
    return output

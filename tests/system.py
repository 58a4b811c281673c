"""Helpers for tests that run the real system: broker, worker and server processes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import wait_serving
from streamscore.processes import ChildProcess
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@contextlib.asynccontextmanager
async def running_system(
    logdir: Path,
    model_repository: Path,
    *,
    workers: int = 1,
    servers: int = 1,
    server_args: tuple[str, ...] = (),
) -> AsyncIterator[tuple[str, list[str]]]:
    """Broker + topics + worker processes + server processes; yields (bootstrap, targets)."""
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        common = ["--kafka", broker.bootstrap, "--log-format", "text"]
        ports = [free_port() for _ in range(servers)]
        children = [
            ChildProcess.streamscore(
                f"worker-{i}", "worker", *common, log_path=str(logdir / f"worker-{i}.log")
            )
            for i in range(workers)
        ] + [
            ChildProcess.streamscore(
                f"server-{i}",
                "serve",
                *common,
                "--port",
                str(port),
                "--model-repository",
                str(model_repository),
                *server_args,
                log_path=str(logdir / f"server-{i}.log"),
            )
            for i, port in enumerate(ports)
        ]
        try:
            for child in children:
                await child.start()
            targets = [f"127.0.0.1:{port}" for port in ports]
            for target in targets:
                await wait_serving(target, timeout=90)
            yield broker.bootstrap, targets
            for child in children:
                child.check_running()
        finally:
            for child in reversed(children):
                await child.stop()
            print_logs(logdir)


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
        assert math.isclose(served[name], value, rel_tol=1e-9, abs_tol=1e-9), (
            name,
            served[name],
            value,
        )

"""The decision log on the real broker: every decision arrives; a dead broker never
blocks or fails the caller."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.server.app import ScoringServer
from streamscore.server.decisions import (
    DECISIONS_TOPIC,
    DecisionLog,
    DecisionRecord,
    card_hash,
)
from streamscore.stream.broker import EmbeddedBroker, create_topics


def request(i: int) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id=f"req-{i}",
        transaction=pb.Transaction(
            transaction_id=f"t-{i}",
            card_id=f"4111-card-{i % 7}",
            merchant_id="m-1",
            amount_minor=500 + i,
            currency="EUR",
            mcc="5411",
            country="DE",
        ),
    )


async def consume_all(bootstrap: str, topic: str, expected: int) -> list[dict]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[dict] = []
    try:
        deadline = time.monotonic() + 30
        while len(records) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                records.extend(orjson.loads(m.value) for m in messages)
    finally:
        await consumer.stop()
    return records


def with_shadow_copy(trained_model: Path, tmp_path: Path) -> Path:
    """The trained repository plus version 2, a copy of version 1, to shadow."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    shutil.copytree(repository / "fraud_mlp" / "1", repository / "fraud_mlp" / "2")
    metadata = repository / "fraud_mlp" / "2" / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"version": "1"', '"version": "2"'))
    return repository


async def test_every_decision_is_published(trained_model: Path, tmp_path: Path) -> None:
    async with EmbeddedBroker() as broker:
        settings = Settings(
            port=0,
            kafka=broker.bootstrap,
            model_repository=with_shadow_copy(trained_model, tmp_path),
            model_version="1",
            shadow_versions="2",
            decision_log=True,
            model_reload_interval_s=0,
        )
        server = ScoringServer(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.ScoringStub(channel)
                replies = await asyncio.gather(*(stub.Score(request(i)) for i in range(60)))
            assert server.rollouts is not None
            for _ in range(100):  # shadows are scored off the response path
                compared = [s["compared"] for _, _, s in server.rollouts.candidate_stats()]
                if compared and compared[0] >= 60:
                    break
                await asyncio.sleep(0.05)
        finally:
            await server.stop()  # flushes the log
        records = await consume_all(broker.bootstrap, DECISIONS_TOPIC, 120)
    primary = [r for r in records if r["variant"] == "primary"]
    shadow = [r for r in records if r["variant"] == "shadow"]
    assert sorted(r["request_id"] for r in primary) == sorted(f"req-{i}" for i in range(60))
    assert sorted(r["request_id"] for r in shadow) == sorted(f"req-{i}" for i in range(60))
    by_id = {r["request_id"]: r for r in primary}
    for record in shadow:  # version 2 is a copy of 1: the same score, and the primary's
        assert record["model_version"] == "2"
        assert record["primary_score"] == by_id[record["request_id"]]["score"]
        assert record["score"] == pytest.approx(record["primary_score"], abs=1e-6)
    for i, reply in enumerate(replies):
        record = by_id[f"req-{i}"]
        assert record["score"] == reply.score
        assert record["decision"] == pb.Decision.Name(reply.decision)
        assert (record["variant"], record["model_version"]) == ("primary", reply.model.version)
        assert record["card_hash"] == card_hash(f"4111-card-{i % 7}")
        assert len(record["features_hash"]) == 16
    # No card id in clear (the full id: digits alone can occur in times and scores).
    assert not any("4111-card-" in orjson.dumps(r).decode() for r in records)


async def test_a_dead_broker_never_blocks_or_fails_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nor loses a decision unsaid: what the stop could not publish was thrown away
    uncounted (an audit trail with a gap nobody could see). It is counted as dropped
    and logged, and ``queued`` (a gauge) shows the backlog meanwhile."""
    broker = EmbeddedBroker()
    await broker.start()
    log = DecisionLog(broker.bootstrap, topic="decisions-dead", max_queue=1000)
    await log.start()
    await broker.stop()
    record = DecisionRecord("r", 0, "primary", "m", "1", 0.5, "APPROVE", "h", "c")
    # Never blocks: a plain call that queues or drops, with nothing to await.
    assert not asyncio.iscoroutinefunction(log.record)
    for _ in range(20_000):
        log.record(record)
    assert log.dropped >= 19_000 - log.published
    assert log.queued == 20_000 - log.dropped - log.published > 0
    # Stops within its timeout, what it could not publish left behind (no hang).
    await asyncio.wait_for(log.stop(timeout=2), 10)
    assert log.published + log.dropped == 20_000 and log.queued == 0
    assert "decision log stopped with decisions not published: dropped" in caplog.text


async def test_a_batch_the_producers_stop_delivers_is_counted_published() -> None:
    """A stop that cuts off the batch being sent (a hung broker) counted all of it as
    dropped, and said so, although the producer's own stop (its flush) may still
    deliver it: here the broker wakes during that stop, and every decision arrives."""
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, {"decisions-hung": 1})
        log = DecisionLog(broker.bootstrap, topic="decisions-hung")
        await log.start()
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            for i in range(50):
                log.record(
                    DecisionRecord(f"r-{i}", 0, "primary", "m", "1", 0.5, "APPROVE", "h", "c")
                )
            await asyncio.sleep(0.2)
            assert log._sending == 50  # one batch, cut off by the stop
            stopping = asyncio.create_task(log.stop(timeout=1.5))
            await asyncio.sleep(2.0)  # past the wait for the batch: in the producer's stop
            os.kill(broker.pid, signal.SIGCONT)
            await asyncio.wait_for(stopping, 10)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert (log.published, log.dropped, log.queued) == (50, 0, 0)
        stored = await consume_all(broker.bootstrap, "decisions-hung", 50)
        assert len({record["request_id"] for record in stored}) == 50


class FlakyProducer:
    """Stands in for the Kafka producer: its first send fails, as a broker that went
    away and came back does; then every send is stored.

    A fake, for the drain's requeue logic alone: with the real producer a failed send
    takes aiokafka's request timeout (40 s), and a restarted embedded tansu (in
    memory) acknowledges writes to the topic it no longer has before the topic is
    made again, and drops them, so it cannot show a retry either."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []
        self.calls = 0

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        self.calls += 1
        if self.calls == 1:
            raise KafkaConnectionError("broker gone")
        self.stored.append(value)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def stop(self) -> None:
        pass


async def test_a_failed_publish_is_retried_not_dropped() -> None:
    log = DecisionLog("127.0.0.1:1", topic="unused")
    producer = FlakyProducer()
    log._producer = producer  # type: ignore[assignment]
    log._task = asyncio.create_task(log._drain())
    for i in range(5):
        log.record(DecisionRecord(f"r{i}", 0, "primary", "m", "1", 0.5, "APPROVE", "h", "c"))
    await log.stop(timeout=5)
    assert log.failed == 5 and log.published == 5 and log.dropped == 0
    assert sorted(orjson.loads(v)["request_id"] for v in producer.stored) == [
        f"r{i}" for i in range(5)
    ]

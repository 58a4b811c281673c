"""A serving process's replica of all feature state, folded from the entity-events log.

Each serving process reads every partition of the entity-events topic from the
beginning (no consumer group: every replica needs every entity) and folds it into its
own ``FeatureStore``. It reports ready once it has folded up to the log end it saw at
start, and it tracks freshness so the server can mark answers FEATURES_STALE.

Why a replica per process and not a shared store: one Python process does about 4k
gRPC calls/s or a few thousand Faust events/s, not both, so validation and routing
run in separate worker processes, while the fold itself is cheap and local reads keep
Score free of any network hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streamscore.stream import kafka_compat, kafka_security
from streamscore.stream.lean_fetch import LeanFetcher, LeanFetchError
from streamscore.stream.state import FeatureStore
from streamscore.stream.topics import ENTITY_EVENTS, decode_fold_batch
from streamscore.tasks import cancel_and_wait, start_background

log = logging.getLogger("streamscore.replica")


class ReplicaFailed(RuntimeError):
    """The replica's fold task died; features are no longer updated."""


# After the lean fetch gives up (an error, a broker gone, partitions spread over
# several leaders), the consumer fetches for this long before it is tried again.
LEAN_RETRY_S = 30.0
MAX_PARTITION_FETCH_BYTES = 4 * 1024 * 1024


class _LogRecord(Protocol):
    """What folding reads of a record: the consumer's and the lean fetch's both."""

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...


class FeatureReplica:
    def __init__(
        self,
        bootstrap: str,
        store: FeatureStore,
        *,
        topic: str = ENTITY_EVENTS,
        max_records: int = 50,
        # Folding runs on the serving event loop: it yields after this many entries
        # (about a millisecond) so Score calls are not held behind a big fold.
        entries_per_step: int = 128,
        # How often idle entities are swept out of memory (0: never).
        sweep_interval_s: float = 60.0,
        # The Fetch wait (the kafka_fetch_max_wait_ms setting; see kafka_compat, 7).
        fetch_max_wait_ms: int = kafka_compat.FETCH_MAX_WAIT_MS,
        # Once caught up, fetch with the lean fetch (lean_fetch.py) rather than the
        # consumer's fetcher: about half its CPU per fetch. Plaintext only: it speaks
        # neither TLS nor SASL, so a secured cluster is fetched from by the consumer.
        lean_fetch: bool = True,
        # Told when the fold task dies (features are no longer updated): the server
        # stops, rather than answer from features frozen for good.
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.on_failure = on_failure
        self.bootstrap = bootstrap
        self.store = store
        self.topic = topic
        self.max_records = max_records
        self.entries_per_step = entries_per_step
        self.sweep_interval_s = sweep_interval_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.lean_fetch = lean_fetch and kafka_security.configured().protocol == "plaintext"
        self.entities_swept = 0
        self._last_sweep = time.monotonic()
        self.records_folded = 0
        self.entries_folded = 0
        self.lean_fallbacks = 0  # times the lean fetch handed fetching back
        self.log_resets = 0  # partitions found with a log end behind what was folded
        self._consumer_since = 0.0  # time.time() the consumer last took over fetching
        self.bad_records = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._targets: dict[TopicPartition, int] = {}
        # Next offset to fold, by partition of the topic: the consumer's way and the
        # lean fetch's both read and move it.
        self._positions: dict[int, int] = {}
        self._caught_up = asyncio.Event()
        self.failure: BaseException | None = None
        self._freshness = float("inf")
        self._freshness_at = float("-inf")
        # The lean fetch while it runs, the high watermarks its answers gave, and when
        # it may be tried again.
        self._lean: LeanFetcher | None = None
        self._lean_highwaters: dict[int, int] = {}
        # time.time() of the lean fetch's last answer (at its start, the consumer's).
        self._answered_at: float | None = None
        self._lean_retry_at = float("-inf")

    @property
    def fetching_lean(self) -> bool:
        return self._lean is not None

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def seconds_since_fetch(self) -> float:
        """Seconds since the broker last answered a fetch for every partition (inf
        before the first answer).

        From the consumer's per-partition fetch-response time, not from our own loop:
        ``getmany`` returns (empty) on its timeout even when the broker hangs, so
        "the loop ran" says nothing about the broker. Cached for 50 ms: Score asks
        on every call."""
        now = time.monotonic()
        if now - self._freshness_at < 0.05:
            return self._freshness
        # The latest answer of either way of fetching: the lean fetch's is kept when it
        # hands back, and it starts from the consumer's, so neither switch marks
        # features stale while the broker answers.
        answered = self._answered_at if self._lean is not None else self._latest_answer()
        self._freshness = float("inf") if answered is None else max(0.0, time.time() - answered)
        self._freshness_at = now
        return self._freshness

    def _latest_answer(self) -> float | None:
        """The later of the lean fetch's last answer and the consumer's."""
        by_consumer = self._consumer_answered_at()
        answered = self._answered_at
        if by_consumer is None or (answered is not None and answered >= by_consumer):
            return answered
        return by_consumer

    def _consumer_answered_at(self) -> float | None:
        """When the consumer's fetches last had an answer for every partition."""
        consumer = self._consumer
        if consumer is None:
            return None
        oldest_ms: float | None = None
        for tp in consumer.assignment():
            polled = consumer.last_poll_timestamp(tp)
            if polled is None:
                return None
            oldest_ms = polled if oldest_ms is None else min(oldest_ms, polled)
        return None if oldest_ms is None else oldest_ms / 1000

    def lag(self) -> int:
        """Records in the log not folded yet (known high watermarks minus positions)."""
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for tp in consumer.assignment():
            highwater = (
                self._lean_highwaters.get(tp.partition)
                if self._lean is not None
                else consumer.highwater(tp)
            )
            if highwater is not None:
                total += max(0, highwater - self._positions.get(tp.partition, 0))
        return total

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
            **kafka_security.client_kwargs(),
        )
        await consumer.start()
        self._consumer = consumer
        partitions = await self._partitions(consumer)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # The log end at start: reaching it means the replica has caught up.
        ends = await kafka_compat.true_end_offsets(consumer, partitions)
        self._targets = {tp: end for tp, end in ends.items() if end > 0}
        if not self._targets:
            self._caught_up.set()
        self._task = start_background(
            self._run(),
            name="feature-replica",
            log=log,
            failure="feature replica stopped",
            on_failure=self._failed,
        )

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        deadline = time.monotonic() + 30
        while True:
            ids = consumer.partitions_for_topic(self.topic)
            if ids:
                return [TopicPartition(self.topic, p) for p in sorted(ids)]
            if time.monotonic() > deadline:
                raise ReplicaFailed(f"topic {self.topic!r} does not exist")
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)

    async def wait_caught_up(self, timeout: float | None) -> None:
        waiter = asyncio.ensure_future(self._caught_up.wait())
        assert self._task is not None
        await asyncio.wait(
            {waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if self.failure is not None:
            raise ReplicaFailed("replica failed while catching up") from self.failure
        if not self.caught_up:
            raise TimeoutError(f"replica did not catch up within {timeout} s")

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        if self.on_failure is not None:
            self.on_failure(exc)

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
            if (
                self._lean is None
                and self.lean_fetch
                and self.caught_up
                and time.monotonic() >= self._lean_retry_at
            ):
                await self._go_lean(consumer)
            if self._lean is not None:
                try:
                    await self._fetch_lean(self._lean)
                except LeanFetchError as exc:
                    self.lean_fallbacks += 1
                    log.warning(
                        "lean fetch failed, the consumer fetches again",
                        extra={"error": str(exc)},
                    )
                    await self._leave_lean(consumer)
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            except KafkaError as exc:
                # The broker may be restarting: keep the state, serve it as stale, retry.
                log.warning("replica fetch failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            for tp, records in batches.items():
                await self._fold(records)
                if records:
                    self._positions[tp.partition] = records[-1].offset + 1
            for tp in consumer.assignment():
                # A high watermark from a fetch answered since the consumer took over
                # fetching at these positions (before, it may predate the lean fetch's).
                highwater, polled = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
                folded = self._positions.get(tp.partition, 0)
                if (
                    highwater is not None
                    and highwater < folded
                    and polled is not None
                    and polled / 1000 > self._consumer_since
                ):
                    self._positions[tp.partition] = self._log_reset(tp.partition, highwater)
                    consumer.seek(tp, 0)
            if not self.caught_up:
                self._check_caught_up()
            else:
                await self._maybe_sweep()

    def _log_reset(self, partition: int, high_watermark: int) -> int:
        """A partition's log ends before what was folded from it: the broker lost it
        (an in-memory broker restarted) or the topic was made again. Kafka would say
        OFFSET_OUT_OF_RANGE; tansu answers nothing, so the replica would wait for the
        new log to pass the old position, skipping every record before it. Fold the
        new log from its start (what the lost one held stays folded), and say so."""
        self.log_resets += 1
        log.error(
            "entity-events log is behind what was folded (the broker lost it?): folding "
            "the new log from its start",
            extra={"partition": partition, "log_end": high_watermark},
        )
        return 0

    async def _maybe_sweep(self) -> None:
        if self.sweep_interval_s and time.monotonic() - self._last_sweep > self.sweep_interval_s:
            await self.sweep_idle()

    async def _go_lean(self, consumer: AIOKafkaConsumer) -> None:
        """Take over fetching from the consumer, at its positions, where every
        partition has one leader; else leave it to the consumer for LEAN_RETRY_S."""
        self._lean_retry_at = time.monotonic() + LEAN_RETRY_S
        partitions = sorted(consumer.assignment())
        cluster = consumer._client.cluster
        leaders = {cluster.leader_for_partition(tp) for tp in partitions}
        leader = leaders.pop() if len(leaders) == 1 else None
        broker = cluster.broker_metadata(leader) if leader is not None and leader >= 0 else None
        if broker is None:
            log.info(
                "partitions not all on one known leader: the consumer keeps fetching",
                extra={"leaders": sorted(str(n) for n in leaders)},
            )
            return
        # The consumer's position is past every record it returned, all folded.
        positions = {tp.partition: await consumer.position(tp) for tp in partitions}
        fetcher = LeanFetcher(
            broker.host,
            broker.port,
            self.topic,
            [tp.partition for tp in partitions],
            max_wait_ms=self.fetch_max_wait_ms,
            max_partition_bytes=MAX_PARTITION_FETCH_BYTES,
        )
        try:
            await fetcher.open()
        except LeanFetchError as exc:
            log.warning("lean fetch cannot connect", extra={"error": str(exc)})
            return
        self._positions.update(positions)
        self._answered_at = self._latest_answer()
        consumer.pause(*partitions)
        self._lean = fetcher
        log.info("replica fetches lean", extra={"leader": f"{broker.host}:{broker.port}"})

    async def _fetch_lean(self, fetcher: LeanFetcher) -> None:
        positions = self._positions
        answers = await fetcher.fetch(positions)
        self._answered_at = fetcher.answered_at
        for partition, answer in answers.items():
            self._lean_highwaters[partition] = answer.high_watermark
            if answer.high_watermark < positions[partition]:
                positions[partition] = self._log_reset(partition, answer.high_watermark)
                continue
            if answer.next_offset != positions[partition]:
                await self._fold(answer.records)  # none, past a control batch only
                positions[partition] = answer.next_offset
        await self._maybe_sweep()

    async def _leave_lean(self, consumer: AIOKafkaConsumer) -> None:
        """Hand fetching back to the consumer, from the positions folded so far."""
        fetcher, self._lean = self._lean, None
        if fetcher is not None:
            await fetcher.close()
        self._lean_highwaters.clear()
        self._freshness_at = float("-inf")
        self._consumer_since = time.time()
        for partition, offset in self._positions.items():
            consumer.seek(TopicPartition(self.topic, partition), offset)
        consumer.resume(*consumer.assignment())

    async def sweep_idle(self, chunk: int = 5000) -> int:
        """Drop idle entities, a chunk at a time so Score calls keep running."""
        self._last_sweep = time.monotonic()
        swept = 0
        for entity_type, states in self.store.entities.items():
            ids = list(states)
            for start in range(0, len(ids), chunk):
                swept += self.store.sweep_idle(entity_type, ids[start : start + chunk])
                await asyncio.sleep(0)
        self.entities_swept += swept
        if swept:
            log.info("swept idle entities", extra={"swept": swept, "entities": len(self.store)})
        return swept

    async def _fold(self, records: Sequence[_LogRecord]) -> None:
        fold = self.store.fold_fields
        step = self.entries_per_step
        for record in records:
            try:
                if record.value is None:
                    raise ValueError("a record with no value")
                entries = decode_fold_batch(record.value)
            except Exception:
                # Only our own worker writes this topic; a bad record is a bug to see
                # in metrics, not a reason to stop folding everything else.
                self.bad_records += 1
                log.exception("unreadable entity-events record at offset %s", record.offset)
                continue
            for start in range(0, len(entries), step):
                for entry in entries[start : start + step]:
                    try:
                        fold(*entry)
                    except Exception:  # e.g. a time past int64: OverflowError
                        self.bad_records += 1
                        log.exception("bad fold entry at offset %s", record.offset)
                # Let waiting Score calls run: each pause stays around a millisecond.
                await asyncio.sleep(0)
            self.entries_folded += len(entries)
        self.records_folded += len(records)

    def _check_caught_up(self) -> None:
        for tp, target in self._targets.items():
            if self._positions.get(tp.partition, 0) < target:
                return
        log.info("feature replica caught up", extra={"records": self.records_folded})
        self._caught_up.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        lean, self._lean = self._lean, None
        if lean is not None:
            await lean.close()
        if self._consumer is not None:
            await kafka_compat.stop_consumer(self._consumer)
            self._consumer = None

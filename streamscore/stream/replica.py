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

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from streamscore.stream import kafka_compat
from streamscore.stream.state import FeatureStore
from streamscore.stream.topics import ENTITY_EVENTS, decode_fold_batch
from streamscore.tasks import cancel_and_wait, start_background

log = logging.getLogger("streamscore.replica")


class ReplicaFailed(RuntimeError):
    """The replica's fold task died; features are no longer updated."""


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
    ) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.topic = topic
        self.max_records = max_records
        self.entries_per_step = entries_per_step
        self.sweep_interval_s = sweep_interval_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.entities_swept = 0
        self._last_sweep = time.monotonic()
        self.records_folded = 0
        self.entries_folded = 0
        self.bad_records = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._targets: dict[TopicPartition, int] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._caught_up = asyncio.Event()
        self.failure: BaseException | None = None
        self._freshness = float("inf")
        self._freshness_at = float("-inf")

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
        consumer = self._consumer
        oldest_ms: float | None = None
        for tp in consumer.assignment() if consumer is not None else ():
            polled = consumer.last_poll_timestamp(tp)  # type: ignore[union-attr]
            if polled is None:
                oldest_ms = None
                break
            oldest_ms = polled if oldest_ms is None else min(oldest_ms, polled)
        self._freshness = (
            float("inf") if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        )
        self._freshness_at = now
        return self._freshness

    def lag(self) -> int:
        """Records in the log not folded yet (known high watermarks minus positions)."""
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                total += max(0, highwater - self._positions.get(tp, 0))
        return total

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
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

    async def wait_caught_up(self, timeout: float) -> None:
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

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
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
                    self._positions[tp] = records[-1].offset + 1
            if not self.caught_up:
                self._check_caught_up()
            elif self.sweep_interval_s and (
                time.monotonic() - self._last_sweep > self.sweep_interval_s
            ):
                await self.sweep_idle()

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

    async def _fold(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        fold = self.store.fold_fields
        step = self.entries_per_step
        for record in records:
            try:
                entries = decode_fold_batch(record.value)
            except ValueError:
                # Only our own worker writes this topic; a bad record is a bug to see
                # in metrics, not a reason to stop folding everything else.
                self.bad_records += 1
                log.exception("unreadable entity-events record at offset %s", record.offset)
                continue
            for start in range(0, len(entries), step):
                for entry in entries[start : start + step]:
                    try:
                        fold(*entry)
                    except (ValueError, TypeError, KeyError):
                        self.bad_records += 1
                        log.exception("bad fold entry at offset %s", record.offset)
                # Let waiting Score calls run: each pause stays around a millisecond.
                await asyncio.sleep(0)
            self.entries_folded += len(entries)
        self.records_folded += len(records)

    def _check_caught_up(self) -> None:
        for tp, target in self._targets.items():
            if self._positions.get(tp, 0) < target:
                return
        log.info("feature replica caught up", extra={"records": self.records_folded})
        self._caught_up.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

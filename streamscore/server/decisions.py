"""The decision log: every decision published to Kafka, batched and asynchronous.

``record`` is on the Score path: it appends to a bounded deque and sets an event,
nothing else (no I/O, no await, never raises). One background task drains the deque
in batches to the ``streamscore-decisions`` topic (JSON, keyed by request id). When
the broker is slow or down the deque fills and further decisions are dropped and
counted, never queued without bound and never holding a Score call. Card ids are
never written in clear: ``card_hash`` is a keyed BLAKE2b digest (``logs.hash_id``),
enough to join decisions of one card for labelling without exposing the number.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamscore.logs import hash_id
from streamscore.server.backends.base import Row
from streamscore.stream import kafka_compat, kafka_security
from streamscore.tasks import cancel_and_wait, start_background

log = logging.getLogger("streamscore.decisions")

DECISIONS_TOPIC = "streamscore-decisions"


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    request_id: str
    time_ms: int
    variant: str  # "primary", "canary" or "shadow"
    model_name: str
    model_version: str
    score: float
    decision: str  # APPROVE / REVIEW / DECLINE
    features_hash: str
    card_hash: str
    primary_score: float | None = None  # shadows: the primary's score, to compare


def features_hash(vector: Row) -> str:
    return hashlib.blake2b(
        np.ascontiguousarray(vector, np.float32).tobytes(), digest_size=8
    ).hexdigest()


# One hash for card ids everywhere (logs too).
card_hash = hash_id


def _delivered(sent: asyncio.Future[Any]) -> bool:
    return sent.done() and not sent.cancelled() and sent.exception() is None


class DecisionLog:
    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = DECISIONS_TOPIC,
        max_queue: int = 10_000,
        batch_max: int = 500,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.batch_max = batch_max
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self.failure: BaseException | None = None
        self._queue: deque[DecisionRecord] = deque()
        self._max_queue = max_queue
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set when everything queued has been published
        self._idle.set()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending = 0  # decisions of the batch being published, out of the queue
        # That batch's sends so far: a stop may cut the batch off while the producer
        # still holds them, and its own stop (a flush) may yet deliver them.
        self._sends: list[asyncio.Future[Any]] = []

    @property
    def queued(self) -> int:
        """Decisions recorded and not published yet (a broker outage grows it)."""
        return len(self._queue) + self._sending

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            linger_ms=20,
            **kafka_compat.producer_kwargs(),
            **kafka_security.client_kwargs(),
        )
        await producer.start()
        self._producer = producer
        self._task = start_background(
            self._drain(),
            name="decision-log",
            log=log,
            failure="decision log stopped; decisions are dropped",
            on_failure=self._failed,
        )

    def record(self, decision: DecisionRecord) -> None:
        """Queue one decision; O(1), never blocks, never raises (drops when full)."""
        if len(self._queue) >= self._max_queue or self.failure is not None:
            self.dropped += 1
            return
        self._queue.append(decision)
        self._idle.clear()
        self._wake.set()

    async def _drain(self) -> None:
        assert self._producer is not None
        backoff = 0.1
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue.popleft() for _ in range(min(self.batch_max, len(self._queue)))]
            self._sending = len(batch)
            self._sends = sends = []
            try:
                for d in batch:
                    value, key = orjson.dumps(asdict(d)), d.request_id.encode()
                    sends.append(await self._producer.send(self.topic, value, key=key))
                # Not gather: cancelled at a stop, it would cancel the sends too, and
                # whether the producer's flush delivered them could not be told.
                if sends:
                    await asyncio.wait(sends)
                for sent in sends:
                    sent.result()  # a failed send raises its KafkaError
            except KafkaError as error:
                # Never the caller's problem: back off and send the batch again (some
                # of it may have been stored: a consumer de-duplicates by request id
                # and variant); what comes meanwhile queues, or is dropped when full.
                self.failed += len(batch)
                self._queue.extendleft(reversed(batch))
                self._sending, self._sends = 0, []
                log.warning(
                    "decision log publish failed, retrying",
                    extra={"error": repr(error), "decisions": len(batch)},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            self.published += len(batch)
            self._sending, self._sends = 0, []
            if not self._queue:
                self._idle.set()

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish what is queued (within ``timeout``), then stop. Safe to call twice."""
        if self._task is not None:
            if self.failure is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout)
            task, self._task = self._task, None
            await cancel_and_wait(task)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout)
            self._producer = None
        # Of the batch cut off, what the producer's stop delivered is published.
        delivered = sum(map(_delivered, self._sends))
        self.published += delivered
        # The broker still down at the stop: what it never took is lost from the audit
        # trail. Counted as dropped and said, never silently.
        lost = self.queued - delivered
        self._sending, self._sends = 0, []
        self._queue.clear()
        if lost:
            self.dropped += lost
            log.error(
                "decision log stopped with decisions not published: dropped",
                extra={"decisions": lost, "timeout_s": timeout},
            )

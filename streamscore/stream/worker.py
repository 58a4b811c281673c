"""The Faust stream worker: validate payment events and route them by entity.

Events are taken in micro-batches (``Stream.take_events``: up to ``BATCH_MAX`` events,
waiting at most ``BATCH_WITHIN_S`` for more). Per event: parse and validate (schema,
then event-time rules), then either send it to the dead-letter topic with a reason,
or add its fold entries to the batch; the batch goes out as one entity-events record
per partition (``topics.route_events``). The worker keeps no feature state of its own:
the entity-events log is the state's source of truth, folded by every serving
process (see ``replica.py``). Its one piece of state, the lateness watermark per
partition, is checkpointed and recovered when it reads a partition out of turn
(``watermarks.py``). Running several workers just splits the ``payments``
partitions between them (Faust's consumer group).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Awaitable
from typing import Any

import faust
import mode
import orjson
from prometheus_client import Counter

from streamscore.config import Settings
from streamscore.processes import exit_now, exit_on_second_signal
from streamscore.stream import kafka_compat, kafka_security
from streamscore.stream.events import InvalidEvent, PaymentEvent, parse_event
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.state import DEFAULT_LATENESS_MS, DEFAULT_SKEW_MS
from streamscore.stream.topics import (
    DEAD_LETTER,
    ENTITY_EVENTS,
    PAYMENTS,
    WATERMARKS,
    route_events,
)
from streamscore.stream.watermarks import WatermarkCheckpoints

log = logging.getLogger("streamscore.worker")
# One line per event sent to the dead-letter topic, limited per 10 s (logs.RepeatLimiter).
dead_letter_log = logging.getLogger("streamscore.dead_letters")

# Micro-batching: per-message costs in Faust's stream, the producer and every replica
# dominate a per-event pipeline. 10 ms bounds the freshness cost of waiting for more.
BATCH_MAX = 500
BATCH_WITHIN_S = 0.01


# Exported on /metrics when the worker runs with a metrics port.
EVENTS = Counter(
    "streamscore_worker_events_total",
    "Payment events read, by outcome (routed or dead_lettered).",
    ["outcome"],
)
DEAD_LETTERS = Counter(
    "streamscore_worker_dead_lettered_total",
    "Events sent to the dead-letter topic, by reason (bad_json, missing_field, too_late, ...).",
    ["reason"],
)


# The most of a malformed message's bytes (and of its error's detail) that its
# dead-letter record carries; the whole message stays in its source topic, at the
# record's topic, partition and offset. Escaped as JSON, a payload can grow 6-fold
# (control characters), and a record over the producer's or the broker's limit
# would stop routing.
DLQ_PAYLOAD_MAX_BYTES = 64 * 1024
DLQ_DETAIL_MAX_CHARS = 1000


def dead_letter_record(raw: bytes | None, error: InvalidEvent, source: dict[str, Any]) -> bytes:
    """The dead-letter value: the reason, the source's coordinates and the original
    payload, exact: as text when it is UTF-8 (``payload``), else base64
    (``payload_base64``); only its first ``DLQ_PAYLOAD_MAX_BYTES`` when longer
    (``payload_truncated``, with its full length in ``payload_bytes``)."""
    record: dict[str, Any] = {
        "reason": error.reason,
        "detail": error.detail[:DLQ_DETAIL_MAX_CHARS],
        **source,
    }
    if raw is None:
        record["payload"] = None
        return orjson.dumps(record)
    kept = raw[:DLQ_PAYLOAD_MAX_BYTES]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_base64"] = base64.b64encode(kept).decode("ascii")
    else:
        # A cut may split the last character: only its bytes are dropped.
        record["payload"] = kept.decode("utf-8", errors="ignore")
    if len(kept) < len(raw):
        record["payload_truncated"] = True
        record["payload_bytes"] = len(raw)
    return orjson.dumps(record)


def create_app(
    bootstrap: str,
    *,
    app_id: str = "streamscore-worker",
    payments_partitions: int = 4,
    entity_events_partitions: int = 4,
    gate: EventTimeGate | None = None,
    fetch_max_wait_ms: int = kafka_compat.FETCH_MAX_WAIT_MS,
    datadir: str | None = None,
    exit_on_error: bool = False,
) -> faust.App:
    """Build the Faust app; the caller runs it (``faust.Worker``) or starts it in tests.

    ``datadir``: where Faust keeps its table files. The worker holds no tables, but
    Faust creates the directory anyway, by default in the working directory."""
    kafka_compat.install_faust_fixes(fetch_max_wait_ms)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,  # None: Faust's default
        # FAUST_BROKER_SETTINGS sets processing_guarantee="at_least_once": tansu has
        # no idempotent/transactional producer; the state de-duplicates by event id.
        topic_partitions=payments_partitions,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        broker_commit_interval=1.0,
        producer_linger_ms=2,
        broker_credentials=kafka_security.faust_credentials(),
        **kafka_compat.FAUST_BROKER_SETTINGS,
    )
    event_gate = gate or EventTimeGate()
    payments = app.topic(
        PAYMENTS,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
        partitions=payments_partitions,
    )
    dead_letters = app.topic(
        DEAD_LETTER, key_serializer="raw", value_serializer="raw", partitions=1
    )
    entity_events = app.topic(
        ENTITY_EVENTS,
        key_serializer="raw",
        value_serializer="raw",
        partitions=entity_events_partitions,
    )
    watermarks = app.topic(
        WATERMARKS, key_serializer="raw", value_serializer="raw", partitions=payments_partitions
    )
    positions = WatermarkCheckpoints(bootstrap, event_gate)

    async def route_batch(events: list[Any]) -> None:
        sent: list[Awaitable[Any]] = []  # deliveries, awaited before the batch is acked
        valid = []
        for event in events:
            raw = event.value
            message = event.message
            if not positions.in_turn(message.partition, message.offset):
                # A start, a partition taken over, or a redelivery: the watermark as it
                # was before this offset, not as this worker left it.
                await positions.recover(message.partition, message.offset)
            positions.routed(message.partition, message.offset)
            try:
                payment = parse_event(raw)
                if positions.refused_before(message.partition, message.offset):
                    raise InvalidEvent(
                        "future",
                        f"event_time_ms {payment.event_time_ms} was beyond the allowed "
                        "clock skew when the event was first read",
                    )
                event_gate.admit(payment, message.partition)
            except InvalidEvent as error:
                if error.reason == "future":
                    positions.refused_as_future(message.partition, message.offset)
                DEAD_LETTERS.labels(error.reason).inc()
                EVENTS.labels("dead_lettered").inc()
                source = {
                    "topic": message.topic,
                    "partition": message.partition,
                    "offset": message.offset,
                }
                dead_letter_log.info(
                    "dead-lettered event", extra={"reason": error.reason, **source}
                )
                sent.append(
                    await dead_letters.send(
                        key=event.key, value=dead_letter_record(raw, error, source)
                    )
                )
                continue
            valid.append((payment, message.partition))
        # In event-time order: a batch holds runs of several payments partitions (a
        # backlog comes a partition at a time), and an entity that takes events from
        # more than one (a merchant) refuses those more than its fold horizon behind
        # its newest, so hours of one partition before another's lost the other's.
        valid.sort(key=_event_order)
        events_in_order = [payment for payment, _ in valid]
        sources = [source for _, source in valid]
        for partition, value in route_events(
            events_in_order, entity_events_partitions, sources=sources
        ):
            sent.append(await entity_events.send(value=value, partition=partition))
        # The watermark checkpoints too: one that says an event was refused as from
        # the future must be there for whoever reads the partition after this batch.
        for partition, value in positions.due():
            sent.append(await watermarks.send(value=value, partition=partition))
        # Stored before the batch is acked: Faust commits acked offsets on its own
        # schedule, which must never run ahead of what reached the broker.
        await asyncio.gather(*sent)
        EVENTS.labels("routed").inc(len(valid))

    # An error here ends the worker (exit status 1), instead of Faust's default of
    # logging it and leaving the worker alive with its partitions, routing nothing (and
    # deaf to SIGTERM), and without acknowledging the failed batch: Faust acks a
    # batch's events when the agent leaves it, even by an error, and commits them at
    # its stop, so they would be lost. Exiting at once, they are redelivered to
    # whichever worker next holds the partition. (In process, for tests: raised.)
    @app.agent(payments, supervisor_strategy=mode.CrashingSupervisor)
    async def route(stream: faust.StreamT[bytes]) -> None:
        # take_events is on faust.Stream, missing from the StreamT protocol.
        batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
        async for events in batches:
            try:
                await route_batch(events)
            except Exception:
                if not exit_on_error:
                    raise
                log.critical(
                    "routing failed: the worker exits, its batch unacknowledged", exc_info=True
                )
                logging.shutdown()
                os._exit(1)

    return app


class _Worker(faust.Worker):
    """Faust's worker, with a stop that ends. Faust's own stop waits on the broker
    (the consumer's commit, the producer's flush) for as long as it takes: a worker
    told to stop during a broker outage stayed for minutes, until the orchestrator
    killed it. After ``stop_timeout_s`` it now exits 1, naming the cause, and at a
    second signal at once. Nothing is lost: what it had not committed is redelivered
    to the next worker, and the state de-duplicates by event id."""

    def __init__(self, app: faust.App, *, stop_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.stop_timeout_s = stop_timeout_s
        # A thread, not a loop timer: it fires whatever the loop is doing.
        self.stop_overrun: threading.Timer | None = None

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        if self._signal_stop_time:
            exit_on_second_signal(sig)
        log.info("worker stopping", extra={"signal": sig.name})
        self.stop_overrun = threading.Timer(
            self.stop_timeout_s,
            exit_now,
            (
                "the worker's stop took more than worker_stop_timeout_s "
                f"({self.stop_timeout_s:g} s; a broker that does not answer?): exiting "
                "now; the payments it had not committed are redelivered to the next worker",
            ),
        )
        self.stop_overrun.daemon = True
        self.stop_overrun.start()
        super()._schedule_shutdown(sig)


def _event_order(routed: tuple[PaymentEvent, int]) -> tuple[int, str]:
    return routed[0].event_time_ms, routed[0].event_id


def run_worker(
    bootstrap: str,
    *,
    loglevel: str = "info",
    payments_partitions: int = 4,
    entity_events_partitions: int = 4,
    lateness_ms: int = DEFAULT_LATENESS_MS,
    skew_ms: int = DEFAULT_SKEW_MS,
    fetch_max_wait_ms: int = kafka_compat.FETCH_MAX_WAIT_MS,
    gate: EventTimeGate | None = None,
    stop_timeout_s: float = Settings.worker_stop_timeout_s,
) -> None:
    """Run one worker in the foreground until SIGTERM/SIGINT (Faust handles signals).
    ``gate``: the event-time rules (by default from ``lateness_ms`` and ``skew_ms``).
    ``stop_timeout_s``: how long its stop may take before it exits 1 (``_Worker``).

    Exits with status 1 when routing fails with an error (its Faust agent crashed):
    a worker alive but routing nothing would hold its partitions, unnoticed."""
    # A throwaway data directory, so that running a worker leaves no empty
    # "streamscore-worker-data" behind in the user's working directory.
    with tempfile.TemporaryDirectory(prefix="streamscore-worker-") as datadir:
        app = create_app(
            bootstrap,
            payments_partitions=payments_partitions,
            entity_events_partitions=entity_events_partitions,
            gate=gate or EventTimeGate(lateness_ms=lateness_ms, skew_ms=skew_ms),
            fetch_max_wait_ms=fetch_max_wait_ms,
            datadir=datadir,
            exit_on_error=True,
        )
        # Our logging (structured JSON, set up by the CLI) stays in charge.
        worker = _Worker(
            app,
            stop_timeout_s=stop_timeout_s,
            loglevel=loglevel,
            quiet=True,
            override_logging=False,
            redirect_stdouts=False,
        )
        # Its progress spinner writes terminal escapes to stdout even when stdout is no
        # terminal: with stdout and stderr merged (a container) they corrupt a JSON line.
        worker.spinner = None
        try:
            worker.execute_from_commandline()
        finally:
            if worker.stop_overrun is not None:
                worker.stop_overrun.cancel()

"""The Faust stream worker: validate payment events and route them by entity.

Per event: parse and validate (schema, then event-time rules), then either send it
to the dead-letter topic with a reason, or write one fold record per entity it
touches to the entity-events topic. The worker keeps no feature state of its own:
the entity-events log is the state's source of truth, folded by every serving
process (see ``replica.py``). Running several workers just splits the ``payments``
partitions between them (Faust's consumer group).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faust
import orjson

from streamscore.stream import kafka_compat
from streamscore.stream.events import InvalidEvent, parse_event
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.state import DEFAULT_LATENESS_MS, DEFAULT_SKEW_MS
from streamscore.stream.topics import DEAD_LETTER, ENTITY_EVENTS, PAYMENTS, entity_records

log = logging.getLogger("streamscore.worker")


@dataclass
class WorkerStats:
    valid: int = 0
    dead_lettered: int = 0


def dead_letter_record(raw: bytes | None, error: InvalidEvent, source: dict[str, Any]) -> bytes:
    """The dead-letter value: the reason plus the original payload, kept verbatim."""
    payload = None if raw is None else raw.decode("utf-8", errors="replace")
    return orjson.dumps(
        {"reason": error.reason, "detail": error.detail, "payload": payload, **source}
    )


def create_app(
    bootstrap: str,
    *,
    app_id: str = "streamscore-worker",
    payments_partitions: int = 4,
    gate: EventTimeGate | None = None,
) -> tuple[faust.App, WorkerStats]:
    """Build the Faust app; the caller runs it (``faust.Worker``) or starts it in tests."""
    kafka_compat.install_faust_fixes()
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        # FAUST_BROKER_SETTINGS sets processing_guarantee="at_least_once": tansu has
        # no idempotent/transactional producer; the state de-duplicates by event id.
        topic_partitions=payments_partitions,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        broker_commit_interval=1.0,
        producer_linger_ms=2,
        **kafka_compat.FAUST_BROKER_SETTINGS,
    )
    stats = WorkerStats()
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
    entity_events = app.topic(ENTITY_EVENTS, key_serializer="raw", value_serializer="raw")

    @app.agent(payments)
    async def route(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            raw = event.value
            try:
                payment = parse_event(raw)
                event_gate.admit(payment, event.message.partition)
            except InvalidEvent as error:
                stats.dead_lettered += 1
                message = event.message
                source = {
                    "topic": message.topic,
                    "partition": message.partition,
                    "offset": message.offset,
                }
                log.info("dead-lettered event", extra={"reason": error.reason, **source})
                await dead_letters.send(key=event.key, value=dead_letter_record(raw, error, source))
                continue
            for key, value in entity_records(payment):
                await entity_events.send(key=key, value=value)
            stats.valid += 1

    return app, stats


def run_worker(
    bootstrap: str,
    *,
    loglevel: str = "info",
    payments_partitions: int = 4,
    lateness_ms: int = DEFAULT_LATENESS_MS,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> None:
    """Run one worker in the foreground until SIGTERM/SIGINT (Faust handles signals)."""
    app, _ = create_app(
        bootstrap,
        payments_partitions=payments_partitions,
        gate=EventTimeGate(lateness_ms=lateness_ms, skew_ms=skew_ms),
    )
    # Our logging (structured JSON, set up by the CLI) stays in charge.
    worker = faust.Worker(
        app, loglevel=loglevel, quiet=True, override_logging=False, redirect_stdouts=False
    )
    worker.execute_from_commandline()

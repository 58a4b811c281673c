"""The worker's routing of one batch of payment events: each validated (schema, then
the event-time rules) and either sent to the dead-letter topic with a reason or
routed, as fold entries, to the entity-events partitions of its entities; the
watermark checkpoints that are due; then every record delivered before the batch is
acknowledged. The Faust app that feeds it batches is worker.py's."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

import orjson
from prometheus_client import Counter

from streamscore.stream.events import InvalidEvent, PaymentEvent, parse_event
from streamscore.stream.topics import route_events
from streamscore.stream.watermarks import WatermarkCheckpoints

# One line per event sent to the dead-letter topic, limited per 10 s (logs.RepeatLimiter).
dead_letter_log = logging.getLogger("streamscore.dead_letters")

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


# The most of a malformed message's bytes (and of its error's detail, and of its key)
# that its dead-letter record carries; the whole message stays in its source topic,
# at the record's topic, partition and offset. A record over the producer's or the
# broker's limit would crash the worker on the same message at every start: so the
# key is cut too (a 700 kB key did that, under Kafka's default 1 MB message limit),
# and a payload that JSON would escape to more than base64's 4/3 of its size (control
# characters grow 6-fold, quotes 2-fold) goes as base64. Hence DLQ_RECORD_MAX_BYTES.
DLQ_PAYLOAD_MAX_BYTES = 64 * 1024
DLQ_DETAIL_MAX_CHARS = 1000
DLQ_KEY_MAX_BYTES = 1024
# A bound on a dead-letter record's key and value together (the detail escaped at
# worst, 6 bytes a character; the coordinates and names well within the rest).
DLQ_RECORD_MAX_BYTES = (
    DLQ_KEY_MAX_BYTES + 4 * (DLQ_PAYLOAD_MAX_BYTES + 2) // 3 + 6 * DLQ_DETAIL_MAX_CHARS + 2048
)


def dead_letter(
    raw: bytes | None, key: bytes | None, error: InvalidEvent, source: dict[str, Any]
) -> tuple[bytes | None, bytes]:
    """The dead-letter record's key and value. The key is the event's, only its first
    ``DLQ_KEY_MAX_BYTES`` when longer (``key_truncated``, with its full length in
    ``key_bytes``). The value: the reason, the source's coordinates and the original
    payload, exact: as text when it is UTF-8 and JSON does not escape it to more than
    base64 would (``payload``), else base64 (``payload_base64``); only its first
    ``DLQ_PAYLOAD_MAX_BYTES`` when longer (``payload_truncated``, with its full length
    in ``payload_bytes``)."""
    record: dict[str, Any] = {
        "reason": error.reason,
        "detail": error.detail[:DLQ_DETAIL_MAX_CHARS],
        **source,
    }
    if key is not None and len(key) > DLQ_KEY_MAX_BYTES:
        record["key_truncated"] = True
        record["key_bytes"] = len(key)
        key = key[:DLQ_KEY_MAX_BYTES]
    if raw is None:
        record["payload"] = None
        return key, orjson.dumps(record)
    kept = raw[:DLQ_PAYLOAD_MAX_BYTES]
    text = None
    with contextlib.suppress(UnicodeDecodeError):
        raw.decode("utf-8")
        # A cut may split the last character: only its bytes are dropped.
        text = kept.decode("utf-8", errors="ignore")
    if text is not None and len(orjson.dumps(text)) - 2 <= 4 * (len(kept) + 2) // 3:
        record["payload"] = text
    else:
        record["payload_base64"] = base64.b64encode(kept).decode("ascii")
    if len(kept) < len(raw):
        record["payload_truncated"] = True
        record["payload_bytes"] = len(raw)
    return key, orjson.dumps(record)


class BatchRouter:
    """Routes the worker's batches (``route``), judging each event by the event-time
    rules of ``positions`` (its gate and checkpoints); the topics are Faust's
    (``send`` gives a delivery to await)."""

    def __init__(
        self,
        positions: WatermarkCheckpoints,
        *,
        dead_letters: Any,
        entity_events: Any,
        watermarks: Any,
        entity_events_partitions: int,
    ) -> None:
        self.positions = positions
        self.dead_letters = dead_letters
        self.entity_events = entity_events
        self.watermarks = watermarks
        self.entity_events_partitions = entity_events_partitions

    async def route(self, events: list[Any]) -> None:
        """One batch of Faust events (``value``: the payment's bytes; ``message``: its
        topic, partition and offset). Raises when a record cannot be delivered: the
        batch is then not acknowledged."""
        sent: list[Awaitable[Any]] = []  # deliveries, awaited before the batch is acked
        valid = []
        for event in events:
            raw = event.value
            message = event.message
            if not self.positions.in_turn(message.partition, message.offset):
                # A start, a partition taken over, or a redelivery: the watermark as it
                # was before this offset, not as this worker left it.
                await self.positions.recover(message.partition, message.offset)
            self.positions.routed(message.partition, message.offset)
            try:
                payment = parse_event(raw)
                self.positions.admit(payment, message.partition, message.offset)
            except InvalidEvent as error:
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
                key, value = dead_letter(raw, event.key, error, source)
                sent.append(await self.dead_letters.send(key=key, value=value))
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
            events_in_order, self.entity_events_partitions, sources=sources
        ):
            sent.append(await self.entity_events.send(value=value, partition=partition))
        # The watermark checkpoints too: one that says an event was refused as from
        # the future must be there for whoever reads the partition after this batch.
        for partition, value in self.positions.due():
            sent.append(await self.watermarks.send(value=value, partition=partition))
        # Stored before the batch is acked: Faust commits acked offsets on its own
        # schedule, which must never run ahead of what reached the broker.
        await asyncio.gather(*sent)
        EVENTS.labels("routed").inc(len(valid))


def _event_order(routed: tuple[PaymentEvent, int]) -> tuple[int, str]:
    return routed[0].event_time_ms, routed[0].event_id

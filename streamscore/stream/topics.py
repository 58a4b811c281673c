"""Kafka topic names and the wire format of the entity-events log.

``payments``: raw JSON payment events from producers (keyed by card id).
``payments-dlq``: malformed, too-late and future events, with a reason.
``streamscore-entity-events``: validated events routed by entity: each event becomes
one fold entry per entity it touches, placed in the partition of that entity
(``entity_partition``), and a worker writes each micro-batch as one record per
partition (a JSON array of entries, split when it would exceed ``RECORD_MAX_BYTES``),
not one record per entry: per-record costs in
the producer, the broker and every replica dominate otherwise. It is the source of
truth for feature state: every serving process folds it (all partitions) into its
own replica, and routing by entity keeps each entity's entries in one partition, in
one order, for every replica (the too-late rule depends on that order).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from streamscore.stream.events import PaymentEvent
from streamscore.stream.features import ENTITY_FIELD, ENTITY_TYPES

PAYMENTS = "payments"
DEAD_LETTER = "payments-dlq"
ENTITY_EVENTS = "streamscore-entity-events"
# The workers' lateness watermarks, one partition per payments partition
# (``watermarks``).
WATERMARKS = "streamscore-worker-watermarks"


@dataclass(frozen=True, slots=True)
class TopicLayout:
    payments_partitions: int = 4
    entity_events_partitions: int = 4

    def partitions(self) -> dict[str, int]:
        return {
            PAYMENTS: self.payments_partitions,
            DEAD_LETTER: 1,
            ENTITY_EVENTS: self.entity_events_partitions,
            WATERMARKS: self.payments_partitions,
        }


def entity_key(entity_type: str, entity_id: str) -> bytes:
    return f"{entity_type}:{entity_id}".encode()


def entity_partition(entity_type: str, entity_id: str, partitions: int) -> int:
    """The entity-events partition of an entity: stable across processes and restarts."""
    return zlib.crc32(entity_key(entity_type, entity_id)) % partitions


# One fold entry: [entity_type, entity_id, event_id, time_ms, amount, declined,
# merchant_id, card_id, source], the arguments of ``FeatureStore.fold_fields`` in
# order; source: the payments partition of the event (records of older workers have
# no source: 8 fields, partition 0).
FoldEntry = list[Any]


def fold_entries(event: PaymentEvent, source: int = 0) -> list[FoldEntry]:
    """The fold entries of one valid event from payments partition ``source``, one per
    entity type it names (a card-present payment names no device or IP)."""
    declined = 1 if event.declined else 0
    return [
        [
            entity,
            entity_id,
            event.event_id,
            event.event_time_ms,
            event.amount_minor,
            declined,
            event.merchant_id,
            event.card_id,
            source,
        ]
        for entity in ENTITY_TYPES
        if (entity_id := getattr(event, ENTITY_FIELD[entity]))
    ]


# The largest entity-events record a worker writes, well under Kafka's default
# message limit (~1 MB) and the producer's request limit: a micro-batch of events
# with long ids would exceed them, and a record the producer refuses stops routing.
RECORD_MAX_BYTES = 256 * 1024


def route_events(
    events: Sequence[PaymentEvent],
    partitions: int,
    max_bytes: int = RECORD_MAX_BYTES,
    *,
    sources: Sequence[int] | None = None,
) -> list[tuple[int, bytes]]:
    """A micro-batch of valid events as entity-events records: (partition, value),
    one record per partition unless its entries exceed ``max_bytes`` of JSON, then as
    many as it takes, in order. ``sources``: each event's payments partition (0)."""
    groups: dict[int, list[FoldEntry]] = {}
    for event, source in zip(events, sources or [0] * len(events), strict=True):
        for entry in fold_entries(event, source):
            partition = entity_partition(entry[0], entry[1], partitions)
            groups.setdefault(partition, []).append(entry)
    return [
        (partition, value)
        for partition, entries in groups.items()
        for value in _encode_bounded(entries, max_bytes)
    ]


def _encode_bounded(entries: list[FoldEntry], max_bytes: int) -> list[bytes]:
    """``entries`` as JSON arrays of at most ``max_bytes`` each (one entry alone may
    exceed it: ids are bounded, so an entry is a few KB at most), in order."""
    value = orjson.dumps(entries)
    if len(value) <= max_bytes or len(entries) == 1:
        return [value]
    half = len(entries) // 2
    return _encode_bounded(entries[:half], max_bytes) + _encode_bounded(entries[half:], max_bytes)


def decode_fold_batch(value: bytes) -> list[FoldEntry]:
    """The entries of one entity-events record; ValueError when it is not a batch."""
    entries = orjson.loads(value)
    if not isinstance(entries, list) or not all(
        isinstance(entry, list) and len(entry) in (8, 9) for entry in entries
    ):
        raise ValueError("not a batch of fold entries (8 or 9 fields)")
    return entries

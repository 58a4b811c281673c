"""Kafka topic names and the wire format of the entity-events log.

``payments``: raw JSON payment events from producers (keyed by card id).
``payments-dlq``: malformed, too-late and future events, with a reason.
``streamscore-entity-events``: validated events routed by entity: each event becomes
one fold entry per entity it touches, placed in the partition of that entity
(``entity_partition``), and a worker writes each micro-batch as one record per
partition (a JSON array of entries), not one record per entry: per-record costs in
the producer, the broker and every replica dominate otherwise. It is the source of
truth for feature state: every serving process folds it (all partitions) into its
own replica, and routing by entity keeps each entity's entries in one partition, in
one order, for every replica (the too-late rule depends on that order).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from streamscore.stream.events import PaymentEvent
from streamscore.stream.features import ENTITY_FIELD, ENTITY_TYPES

PAYMENTS = "payments"
DEAD_LETTER = "payments-dlq"
ENTITY_EVENTS = "streamscore-entity-events"


@dataclass(frozen=True, slots=True)
class TopicLayout:
    payments_partitions: int = 4
    entity_events_partitions: int = 4

    def partitions(self) -> dict[str, int]:
        return {
            PAYMENTS: self.payments_partitions,
            DEAD_LETTER: 1,
            ENTITY_EVENTS: self.entity_events_partitions,
        }


def entity_key(entity_type: str, entity_id: str) -> bytes:
    return f"{entity_type}:{entity_id}".encode()


def entity_partition(entity_type: str, entity_id: str, partitions: int) -> int:
    """The entity-events partition of an entity: stable across processes and restarts."""
    return zlib.crc32(entity_key(entity_type, entity_id)) % partitions


# One fold entry: [entity_type, entity_id, event_id, time_ms, amount, declined,
# merchant_id, card_id], the arguments of ``FeatureStore.fold_fields`` in order.
FoldEntry = list[Any]


def fold_entries(event: PaymentEvent) -> list[FoldEntry]:
    """The fold entries of one valid event, one per entity type."""
    declined = 1 if event.declined else 0
    return [
        [
            entity,
            getattr(event, ENTITY_FIELD[entity]),
            event.event_id,
            event.event_time_ms,
            event.amount_minor,
            declined,
            event.merchant_id,
            event.card_id,
        ]
        for entity in ENTITY_TYPES
    ]


def route_events(events: Iterable[PaymentEvent], partitions: int) -> dict[int, bytes]:
    """A micro-batch of valid events as one entity-events record value per partition."""
    groups: dict[int, list[FoldEntry]] = {}
    for event in events:
        for entry in fold_entries(event):
            partition = entity_partition(entry[0], entry[1], partitions)
            groups.setdefault(partition, []).append(entry)
    return {partition: orjson.dumps(entries) for partition, entries in groups.items()}


def decode_fold_batch(value: bytes) -> list[FoldEntry]:
    """The entries of one entity-events record; ValueError when it is not a batch."""
    entries = orjson.loads(value)
    if not isinstance(entries, list) or not all(
        isinstance(entry, list) and len(entry) == 8 for entry in entries
    ):
        raise ValueError("not a batch of 8-field fold entries")
    return entries

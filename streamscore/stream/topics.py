"""Kafka topic names and the wire format of the entity-events log.

``payments``: raw JSON payment events from producers (keyed by card id).
``payments-dlq``: malformed, too-late and future events, with a reason.
``streamscore-entity-events``: validated events re-keyed by entity ("card:c1"), one
record per entity an event touches. It is the source of truth for feature state:
every serving process folds it (all partitions) into its own replica, and keying by
entity keeps each entity's events in one partition, in one order, for every replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from streamscore.stream.events import PaymentEvent
from streamscore.stream.features import ENTITY_FIELD, ENTITY_TYPES
from streamscore.stream.state import FoldRecord

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


def split_entity_key(key: bytes) -> tuple[str, str]:
    entity_type, _, entity_id = key.decode().partition(":")
    return entity_type, entity_id


def encode_fold_record(event: PaymentEvent) -> bytes:
    # A compact positional array: this record is written once per entity type.
    return orjson.dumps(
        [
            event.event_id,
            event.event_time_ms,
            event.amount_minor,
            1 if event.declined else 0,
            event.merchant_id,
            event.card_id,
        ]
    )


def decode_fold_record(value: bytes) -> FoldRecord:
    event_id, time_ms, amount, declined, merchant_id, card_id = orjson.loads(value)
    return FoldRecord(event_id, time_ms, amount, bool(declined), merchant_id, card_id)


def entity_records(event: PaymentEvent) -> list[tuple[bytes, bytes]]:
    """The (key, value) records one valid event becomes on the entity-events topic."""
    value = encode_fold_record(event)
    return [
        (entity_key(entity, getattr(event, ENTITY_FIELD[entity])), value) for entity in ENTITY_TYPES
    ]

"""Event validation and the event-time gate: every bad event gets a stable reason."""

from __future__ import annotations

import orjson
import pytest

from streamscore.stream.backfill import backfill
from streamscore.stream.events import InvalidEvent, event_from_dict, parse_event
from streamscore.stream.features import ENTITY_FIELD, ENTITY_TYPES
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.topics import (
    decode_fold_batch,
    entity_partition,
    fold_entries,
    route_events,
)

import reference

GOOD = {
    "event_id": "e-1",
    "event_time_ms": 1_700_000_000_000,
    "card_id": "c-1",
    "merchant_id": "m-1",
    "device_id": "d-1",
    "ip": "203.0.113.7",
    "amount_minor": 1234,
    "currency": "EUR",
    "mcc": "5411",
    "country": "DE",
    "status": "declined",
}


def test_valid_event_parses() -> None:
    event = parse_event(orjson.dumps(GOOD))
    assert event.event_id == "e-1" and event.amount_minor == 1234 and event.declined
    assert parse_event(event.to_json()) == event


def test_numeric_mcc_is_accepted_as_text() -> None:
    assert event_from_dict({**GOOD, "mcc": 5411}).mcc == "5411"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "not_an_object"),
        (None, "empty_message"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "card_id"}), "missing_field"),
        (orjson.dumps({**GOOD, "amount_minor": "12"}), "bad_type"),
        (orjson.dumps({**GOOD, "amount_minor": 12.5}), "bad_type"),
        (orjson.dumps({**GOOD, "amount_minor": True}), "bad_type"),
        (orjson.dumps({**GOOD, "amount_minor": -1}), "negative_amount"),
        (orjson.dumps({**GOOD, "event_time_ms": "soon"}), "bad_type"),
        (orjson.dumps({**GOOD, "event_time_ms": -5}), "bad_value"),
        (orjson.dumps({**GOOD, "event_time_ms": 2**63}), "bad_value"),
        (orjson.dumps({**GOOD, "event_time_ms": 2**64 - 1}), "bad_value"),
        # Integer literals past 64 bits (read as floats by orjson): out of range too.
        (
            orjson.dumps(GOOD).replace(b'"amount_minor":1234', b'"amount_minor":' + b"9" * 30),
            "bad_value",
        ),
        (
            orjson.dumps(GOOD).replace(b'"amount_minor":1234', b'"amount_minor":-' + b"9" * 30),
            "bad_value",
        ),
        (orjson.dumps({**GOOD, "status": "pending"}), "bad_value"),
        (orjson.dumps({**GOOD, "card_id": ""}), "empty_field"),
        (orjson.dumps({**GOOD, "card_id": 42}), "bad_type"),
        (orjson.dumps({**GOOD, "merchant_id": "m" * 300}), "field_too_long"),
        (orjson.dumps({**GOOD, "mcc": [5411]}), "bad_type"),
        (orjson.dumps({**GOOD, "mcc": ""}), "empty_field"),
        (orjson.dumps({**GOOD, "mcc": -1}), "bad_value"),
        (orjson.dumps({**GOOD, "mcc": "5" * 300}), "field_too_long"),
    ],
)
def test_malformed_events_have_reasons(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw)
    assert caught.value.reason == reason


def test_gate_refuses_future_and_too_late_events() -> None:
    now = 1_700_000_000_000
    gate = EventTimeGate(lateness_ms=60_000, skew_ms=5_000, clock_ms=lambda: now)
    gate.admit(event_from_dict({**GOOD, "event_time_ms": now}))
    gate.admit(event_from_dict({**GOOD, "event_time_ms": now - 60_000}))  # exactly at the bound
    with pytest.raises(InvalidEvent) as late:
        gate.admit(event_from_dict({**GOOD, "event_time_ms": now - 60_001}))
    assert late.value.reason == "too_late"
    gate.admit(event_from_dict({**GOOD, "event_time_ms": now + 5_000}))  # within skew
    with pytest.raises(InvalidEvent) as future:
        gate.admit(event_from_dict({**GOOD, "event_time_ms": now + 5_001}))
    assert future.value.reason == "future"
    # Refused events do not move the watermark.
    assert gate.newest_ms == {0: now + 5_000}


def test_gate_keeps_lateness_per_partition() -> None:
    now = 1_700_000_000_000
    gate = EventTimeGate(lateness_ms=60_000, skew_ms=5_000, clock_ms=lambda: now)
    gate.admit(event_from_dict({**GOOD, "event_time_ms": now}), partition=1)
    # Partition 2 has seen nothing newer: an old event there is on time.
    gate.admit(event_from_dict({**GOOD, "event_time_ms": now - 600_000}), partition=2)
    with pytest.raises(InvalidEvent):
        gate.admit(event_from_dict({**GOOD, "event_time_ms": now - 600_000}), partition=1)


def test_fold_entries_cover_every_entity_once() -> None:
    entries = fold_entries(event_from_dict(GOOD))
    assert [(e[0], e[1]) for e in entries] == [
        ("card", "c-1"),
        ("merchant", "m-1"),
        ("device", "d-1"),
        ("ip", "203.0.113.7"),
    ]
    assert entries[0][2:] == ["e-1", GOOD["event_time_ms"], 1234, 1, "m-1", "c-1", 0]
    # The payments partition it came from rides along (the fold horizon is per partition).
    assert all(entry[8] == 3 for entry in fold_entries(event_from_dict(GOOD), source=3))
    # A record of an older worker, without it, still reads.
    assert decode_fold_batch(orjson.dumps([entry[:8] for entry in entries])) == [
        entry[:8] for entry in entries
    ]


def test_route_events_puts_each_entity_in_its_own_stable_partition() -> None:
    events = [
        event_from_dict(
            {**GOOD, "event_id": f"e-{i}", "card_id": f"c-{i % 7}", "ip": "2001:db8::1"}
        )
        for i in range(50)
    ]
    routed = route_events(events, partitions=4)
    assert {partition for partition, _ in routed} <= {0, 1, 2, 3}
    assert len(routed) == len({partition for partition, _ in routed})  # one record each
    seen = []
    for partition, value in routed:
        for entry in decode_fold_batch(value):
            assert entity_partition(entry[0], entry[1], 4) == partition
            seen.append((entry[0], entry[2]))
    # Every event once per entity type, colons in ids included.
    assert sorted(seen) == sorted((t, f"e-{i}") for t in ENTITY_TYPES for i in range(50))
    assert entity_partition("ip", "2001:db8::1", 4) == entity_partition("ip", "2001:db8::1", 4)


def test_a_large_micro_batch_is_split_into_bounded_records_in_order() -> None:
    """Events with the longest ids allowed: a 500-event batch would be megabytes in one
    record per partition, over Kafka's default message limit."""
    long = "x" * 250
    events = [
        event_from_dict(
            {
                **GOOD,
                "event_id": f"{long}{i:06d}",
                "card_id": f"{long}c{i % 3}",
                "merchant_id": f"{long}m",
                "device_id": f"{long}d",
                "ip": f"{long}i",
            }
        )
        for i in range(500)
    ]
    routed = route_events(events, partitions=4, max_bytes=100_000)
    assert all(len(value) <= 100_000 for _, value in routed)
    assert len(routed) > len({partition for partition, _ in routed})  # split
    # The same entries as one record per partition, in the same order per partition.
    whole = dict(route_events(events, partitions=4, max_bytes=10**9))
    by_partition: dict[int, list[list[object]]] = {}
    for partition, value in routed:
        by_partition.setdefault(partition, []).extend(decode_fold_batch(value))
    assert by_partition == {p: decode_fold_batch(v) for p, v in whole.items()}


def test_decode_fold_batch_refuses_other_shapes() -> None:
    for bad in (b"{}", b"[1, 2]", b"[[1, 2, 3]]", b"not json"):
        with pytest.raises(ValueError):
            decode_fold_batch(bad)


def test_a_card_present_payment_counts_for_its_card_and_merchant_only() -> None:
    """An event without device or IP (a card-present payment, as a ScoreRequest may
    be) is valid: it folds into its card and merchant, into no device or IP entity, and
    the backfill's values for it and after it equal the brute-force reference's (which
    gives an empty device or IP no events)."""
    present = {**GOOD, "event_id": "e-present", "device_id": "", "ip": ""}
    assert [entry[0] for entry in fold_entries(event_from_dict(present))] == ["card", "merchant"]
    for name in ("device_id", "ip"):  # absent is still malformed; empty is not
        with pytest.raises(InvalidEvent, match="missing_field"):
            event_from_dict({k: v for k, v in GOOD.items() if k != name})
    t0 = GOOD["event_time_ms"]
    log = [
        {**GOOD, "event_id": f"e-{i}", "event_time_ms": t0 + i * 7_000, "amount_minor": 100 * i}
        | ({"device_id": "", "ip": ""} if i % 2 else {})
        for i in range(12)
    ]
    rows = dict(backfill(event_from_dict(e) for e in log))
    for event, features in rows.items():
        t = event.event_time_ms
        before = [e for e in log if (e["event_time_ms"], e["event_id"]) < (t, event.event_id)]
        want: dict[str, float] = {}
        for entity in ENTITY_TYPES:
            entity_id = {"card": "c-1", "merchant": "m-1"}.get(entity) or getattr(
                event, ENTITY_FIELD[entity]
            )
            want |= reference.features(before, entity, entity_id, t)
        assert {k: features[k] for k in want} == want, event.event_id
    assert rows[event_from_dict(log[-1])]["card_txn_count_5m"] == 11  # every one before it

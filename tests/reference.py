"""Brute-force reference for the feature semantics in DESIGN.md ("Feature semantics").

Deliberately independent of ``streamscore.kernels`` and ``streamscore.stream.state``:
every value is recomputed from the raw event dicts on each call, straight from the
definitions. Only the feature *declarations* (names, windows, resolutions) are taken
from ``streamscore.stream.features``. Slow and obvious on purpose.

Raw events are dicts with ``event_id, event_time_ms, card_id, merchant_id, device_id,
ip, amount_minor, status``.
"""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta

from streamscore.stream.features import DEFAULT_PACK, ENTITY_FIELD, Agg

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Outcomes of offering an event to one entity's state (same strings as state.Fold values).
APPLIED = "applied"
DUPLICATE = "duplicate"
TOO_LATE = "too_late"


def dedup(events: list[dict]) -> list[dict]:
    """The first occurrence of each event_id, in the given order."""
    seen: set[str] = set()
    out = []
    for event in events:
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            out.append(event)
    return out


def in_window(event_time_ms: int, t_ms: int, window_ms: int, resolution_ms: int) -> bool:
    """``b(t) - W/r < b(e) <= b(t)`` with ``b(x) = floor(x / r)``."""
    b_event = event_time_ms // resolution_ms  # // is floor division, also for negatives
    b_t = t_ms // resolution_ms
    return b_t - window_ms // resolution_ms < b_event <= b_t


def feature_value(feature, events: list[dict], t_ms: int) -> float:
    """One feature as of ``t_ms`` over ``events`` (already only this entity's, deduped)."""
    if feature.agg is Agg.SECONDS_SINCE_LAST:
        past = [e["event_time_ms"] for e in events if e["event_time_ms"] <= t_ms]
        return (t_ms - max(past)) / 1000 if past else -1.0

    window = [
        e
        for e in events
        if in_window(e["event_time_ms"], t_ms, feature.window_ms, feature.resolution_ms)
    ]
    amounts = [e["amount_minor"] for e in window]
    declined = sum(1 for e in window if e["status"] == "declined")
    match feature.agg:
        case Agg.COUNT:
            return float(len(window))
        case Agg.COUNT_DECLINED:
            return float(declined)
        case Agg.SUM:
            return float(sum(amounts))
        case Agg.MAX:
            return float(max(amounts, default=0))
        case Agg.MEAN:
            return sum(amounts) / len(amounts) if amounts else 0.0
        case Agg.STD:
            return statistics.pstdev(amounts) if amounts else 0.0
        case Agg.DISTINCT:
            return float(len({e[feature.distinct_field] for e in window}))
        case Agg.DECLINE_RATE:
            return declined / len(window) if window else 0.0
    raise AssertionError(f"unknown aggregation {feature.agg}")


def features(
    events: list[dict], entity_type: str, entity_id: str, t_ms: int, pack=DEFAULT_PACK
) -> dict[str, float]:
    """Every feature of ``pack`` for one entity as of ``t_ms``, by brute force."""
    field = ENTITY_FIELD[entity_type]
    # An empty device or IP (a card-present payment) is no entity: it has no events.
    mine = dedup([e for e in events if e[field] == entity_id]) if entity_id else []
    return {f.name: feature_value(f, mine, t_ms) for f in pack if f.entity == entity_type}


def fold_outcomes(
    events: list[dict], entity_type: str, entity_id: str, lateness_ms: int
) -> list[tuple[dict, str]]:
    """The lateness and duplicate rule, applied per entity in arrival order.

    An event older than the newest event time the entity accepted from the same
    source (payments partition, ``source``, 0 when absent) minus ``lateness_ms`` is
    TOO_LATE (checked first); otherwise an event_id already accepted is DUPLICATE;
    otherwise it is APPLIED.
    """
    field = ENTITY_FIELD[entity_type]
    newest: dict[int, int] = {}
    accepted_ids: set[str] = set()
    outcomes = []
    for event in events:
        if event[field] != entity_id or not entity_id:
            continue
        time_ms = event["event_time_ms"]
        source = event.get("source", 0)
        if source in newest and time_ms < newest[source] - lateness_ms:
            outcomes.append((event, TOO_LATE))
        elif event["event_id"] in accepted_ids:
            outcomes.append((event, DUPLICATE))
        else:
            accepted_ids.add(event["event_id"])
            newest[source] = max(newest.get(source, time_ms), time_ms)
            outcomes.append((event, APPLIED))
    return outcomes


def accepted_events(
    events: list[dict], entity_type: str, entity_id: str, lateness_ms: int
) -> list[dict]:
    """The events one entity's state keeps, given the arrival order ``events``."""
    return [
        e
        for e, outcome in fold_outcomes(events, entity_type, entity_id, lateness_ms)
        if outcome == APPLIED
    ]


def request_features(amount_minor: int, event_time_ms: int, card_mean_7d: float) -> dict:
    """Request-derived features (no state)."""
    return {
        "amount": float(amount_minor),
        "log_amount": math.log1p(amount_minor),
        "amount_to_card_mean_7d": amount_minor / card_mean_7d if card_mean_7d > 0 else 0.0,
        # UTC hour of the event time, via the calendar rather than arithmetic on ms.
        "hour_of_day": float((EPOCH + timedelta(milliseconds=event_time_ms)).hour),
    }

"""Offline backfill: point-in-time features for every event of a log.

For each event, the features as of its own event time from the events strictly
before it in (event_time_ms, event_id) order (DESIGN.md "Online = offline"), using
the very ``FeatureStore`` the serving replicas use, so both paths agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from streamscore.stream.assembly import event_features
from streamscore.stream.events import PaymentEvent
from streamscore.stream.state import DEFAULT_FOLD_HORIZON_MS, FeatureStore
from streamscore.stream.topics import fold_entries


def sort_events(events: Iterable[PaymentEvent]) -> list[PaymentEvent]:
    """Backfill order: event time, then event id (DESIGN.md "Online = offline")."""
    return sorted(events, key=lambda e: (e.event_time_ms, e.event_id))


def fold_event(store: FeatureStore, event: PaymentEvent) -> None:
    fold = store.fold_fields
    for entry in fold_entries(event):
        fold(*entry)


def backfill(
    events: Iterable[PaymentEvent], store: FeatureStore | None = None
) -> Iterator[tuple[PaymentEvent, dict[str, float]]]:
    """Yield (event, features as of the event) in (event_time_ms, event_id) order.

    A repeated event id yields once (its first copy in that order), and every copy is
    folded as the stream folds it: each entity counts an event id once while it
    remembers it (the fold horizon). So a redelivered copy counts once, as in the
    stream; and a copy that differs (other entities, or a time past the horizon),
    which the contract leaves open, counts exactly where the stream counts it.
    """
    # The replicas' fold horizon, which decides which copies count (see above).
    store = store or FeatureStore(fold_horizon_ms=DEFAULT_FOLD_HORIZON_MS)
    seen: set[str] = set()
    for event in sort_events(events):
        if event.event_id not in seen:
            seen.add(event.event_id)
            yield event, event_features(store, event, event.event_time_ms)
        fold_event(store, event)

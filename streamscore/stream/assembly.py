"""Feature assembly for one transaction: the same code online (Score) and offline (backfill)."""

from __future__ import annotations

from streamscore.stream.events import PaymentEvent
from streamscore.stream.features import REQUEST_FEATURES, request_features
from streamscore.stream.state import FeatureStore


def all_feature_names(store: FeatureStore) -> tuple[str, ...]:
    return tuple(f.name for f in store.pack) + REQUEST_FEATURES


def assemble_features(
    store: FeatureStore,
    *,
    card_id: str,
    merchant_id: str,
    device_id: str,
    ip: str,
    amount_minor: int,
    event_time_ms: int,
    t_ms: int,
) -> dict[str, float]:
    """The stateful features of the transaction's entities as of ``t_ms``, then request ones."""
    values: dict[str, float] = {}
    store.add_features(values, "card", card_id, t_ms)
    store.add_features(values, "merchant", merchant_id, t_ms)
    store.add_features(values, "device", device_id, t_ms)
    store.add_features(values, "ip", ip, t_ms)
    values.update(request_features(amount_minor, event_time_ms, values["card_amount_mean_7d"]))
    return values


def event_features(store: FeatureStore, event: PaymentEvent, t_ms: int) -> dict[str, float]:
    """``assemble_features`` for a payment event's transaction, as if made at ``t_ms``
    (backfill: the event's own time)."""
    return assemble_features(
        store,
        card_id=event.card_id,
        merchant_id=event.merchant_id,
        device_id=event.device_id,
        ip=event.ip,
        amount_minor=event.amount_minor,
        event_time_ms=t_ms,
        t_ms=t_ms,
    )

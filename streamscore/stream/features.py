"""Feature definitions as code: declared once, they drive folding, serving and backfill.

Each stateful feature is entity x aggregation x window W x resolution r
(DESIGN.md "Feature semantics"). Adding a feature means adding one ``FeatureDef`` to
``DEFAULT_PACK``; the entity state keeps tiles for every resolution the pack uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from streamscore.kernels import tiles

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

ENTITY_TYPES = ("card", "merchant", "device", "ip")
# Which event field identifies each entity type.
ENTITY_FIELD = {"card": "card_id", "merchant": "merchant_id", "device": "device_id", "ip": "ip"}


class Agg(StrEnum):
    COUNT = "count"
    COUNT_DECLINED = "count_declined"
    SUM = "sum"
    MAX = "max"
    MEAN = "mean"
    STD = "std"
    DISTINCT = "distinct"
    DECLINE_RATE = "decline_rate"
    SECONDS_SINCE_LAST = "seconds_since_last"


@dataclass(frozen=True, slots=True)
class FeatureDef:
    name: str
    entity: str
    agg: Agg
    window_ms: int = 0  # 0 for window-less aggregations (seconds_since_last)
    resolution_ms: int = 0
    distinct_field: str = ""  # event field counted by Agg.DISTINCT

    def __post_init__(self) -> None:
        if self.entity not in ENTITY_TYPES:
            raise ValueError(f"{self.name}: unknown entity {self.entity!r}")
        if self.agg is Agg.SECONDS_SINCE_LAST:
            return
        if self.resolution_ms <= 0 or self.window_ms <= 0 or self.window_ms % self.resolution_ms:
            raise ValueError(f"{self.name}: window must be a positive multiple of resolution")
        if (self.agg is Agg.DISTINCT) != bool(self.distinct_field):
            raise ValueError(f"{self.name}: distinct_field goes with Agg.DISTINCT only")

    def read_code(self) -> int:
        """What this feature reads from the aggregate of its (entity, W, r) window:
        one of the kernel's read codes (kernels/tiles.py, ``windowed_values``)."""
        code = _READ_CODES.get(self.agg)
        if code is None:
            raise ValueError(f"{self.name}: {self.agg} has no window value")
        return code


_READ_CODES: dict[Agg, int] = {
    Agg.COUNT: tiles.READ_COUNT,
    Agg.COUNT_DECLINED: tiles.READ_DECLINED,
    Agg.SUM: tiles.READ_SUM,
    Agg.MAX: tiles.READ_MAX,
    Agg.MEAN: tiles.READ_MEAN,
    Agg.STD: tiles.READ_STD,
    Agg.DECLINE_RATE: tiles.READ_DECLINE_RATE,
    Agg.DISTINCT: tiles.READ_DISTINCT,
}


def _f(
    name: str, entity: str, agg: Agg, window: int, resolution: int, field: str = ""
) -> FeatureDef:
    return FeatureDef(name, entity, agg, window, resolution, field)


DEFAULT_PACK: tuple[FeatureDef, ...] = (
    _f("card_txn_count_5m", "card", Agg.COUNT, 5 * MINUTE, 10 * SECOND),
    _f("card_txn_count_1h", "card", Agg.COUNT, HOUR, MINUTE),
    _f("card_txn_count_24h", "card", Agg.COUNT, DAY, 15 * MINUTE),
    _f("card_amount_sum_1h", "card", Agg.SUM, HOUR, MINUTE),
    _f("card_amount_sum_24h", "card", Agg.SUM, DAY, 15 * MINUTE),
    _f("card_amount_max_24h", "card", Agg.MAX, DAY, 15 * MINUTE),
    _f("card_amount_mean_7d", "card", Agg.MEAN, 7 * DAY, HOUR),
    _f("card_amount_std_7d", "card", Agg.STD, 7 * DAY, HOUR),
    _f("card_distinct_merchants_24h", "card", Agg.DISTINCT, DAY, 15 * MINUTE, "merchant_id"),
    _f("card_declines_1h", "card", Agg.COUNT_DECLINED, HOUR, MINUTE),
    FeatureDef("card_seconds_since_last", "card", Agg.SECONDS_SINCE_LAST),
    _f("merchant_txn_count_1m", "merchant", Agg.COUNT, MINUTE, 5 * SECOND),
    _f("merchant_txn_count_1h", "merchant", Agg.COUNT, HOUR, MINUTE),
    _f("merchant_decline_rate_1h", "merchant", Agg.DECLINE_RATE, HOUR, MINUTE),
    _f("merchant_amount_mean_24h", "merchant", Agg.MEAN, DAY, 15 * MINUTE),
    _f("device_txn_count_10m", "device", Agg.COUNT, 10 * MINUTE, 10 * SECOND),
    _f("device_distinct_cards_24h", "device", Agg.DISTINCT, DAY, 15 * MINUTE, "card_id"),
    _f("ip_txn_count_5m", "ip", Agg.COUNT, 5 * MINUTE, 10 * SECOND),
    _f("ip_distinct_cards_1h", "ip", Agg.DISTINCT, HOUR, MINUTE, "card_id"),
)


@dataclass(frozen=True, slots=True)
class EntityLayout:
    """How one entity type's state is laid out for a feature pack.

    ``resolutions``: one tile set per resolution; ``distinct_fields[r]``: the fields
    whose distinct values the tiles of resolution r keep; ``max_window_ms[r]``: how far
    back tiles of resolution r must reach.
    """

    entity: str
    features: tuple[FeatureDef, ...]
    resolutions: tuple[int, ...]
    distinct_fields: dict[int, tuple[str, ...]]
    max_window_ms: dict[int, int]

    # Precomputed for the serving path: what it reads per (resolution, window), the
    # names, read codes and distinct slots of the features over that one window
    # aggregate (``tiles.windowed_values``'s plan; its tiles named by their index in
    # ``resolutions``, the order of an entity's tuple of tiles); the names of the
    # features from the newest event time (seconds since last); all names, in the
    # pack's order.
    window_plan: tuple[tiles.WindowPlan, ...] = ()
    since_last_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()
    # The greatest common divisor of the resolutions (the finest, where they nest, as
    # the default pack's do; 1 without any): t's bucket at it fixes t's bucket at every
    # one of them (floor(floor(t/g)/k) = floor(t/(gk))), so it alone keys a busy
    # entity's cached values.
    cache_grain: int = 1


def entity_layout(entity: str, pack: tuple[FeatureDef, ...] = DEFAULT_PACK) -> EntityLayout:
    features = tuple(f for f in pack if f.entity == entity)
    windowed = [f for f in features if f.resolution_ms]
    resolutions = tuple(sorted({f.resolution_ms for f in windowed}))
    distinct = {
        r: tuple(
            sorted(
                {f.distinct_field for f in windowed if f.resolution_ms == r and f.distinct_field}
            )
        )
        for r in resolutions
    }
    max_window = {
        r: max(f.window_ms for f in windowed if f.resolution_ms == r) for r in resolutions
    }
    reads: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for f in windowed:
        # The index of its field among its tiles' distinct sets (-1: none).
        slot = distinct[f.resolution_ms].index(f.distinct_field) if f.distinct_field else -1
        reads.setdefault((f.resolution_ms, f.window_ms), []).append((f.name, f.read_code(), slot))
    return EntityLayout(
        entity,
        features,
        resolutions,
        distinct,
        max_window,
        window_plan=tuple(
            (resolutions.index(r), w, tuple(named)) for (r, w), named in reads.items()
        ),
        since_last_names=tuple(f.name for f in features if f.agg is Agg.SECONDS_SINCE_LAST),
        feature_names=tuple(f.name for f in features),
        cache_grain=math.gcd(*resolutions) or 1,
    )


def feature_names(pack: tuple[FeatureDef, ...] = DEFAULT_PACK) -> tuple[str, ...]:
    return tuple(f.name for f in pack)


# Request-derived features: computed from the transaction alone (plus the card's
# 7-day mean for the relative amount). Names are fixed; the model picks its inputs.
REQUEST_FEATURES = ("amount", "log_amount", "amount_to_card_mean_7d", "hour_of_day")


def request_features(
    amount_minor: int, event_time_ms: int, card_mean_7d: float
) -> dict[str, float]:
    amount = float(amount_minor)
    return {
        "amount": amount,
        "log_amount": math.log1p(amount),
        # 0 when the card has no history: "no reference" rather than an infinite ratio.
        "amount_to_card_mean_7d": amount / card_mean_7d if card_mean_7d > 0 else 0.0,
        "hour_of_day": float((event_time_ms // HOUR) % 24),
    }

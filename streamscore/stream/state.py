"""Per-entity feature state for a feature pack, folded from validated events.

One ``EntityState`` per (entity type, entity id): a ``Tiles`` per resolution the pack
uses plus the entity's recent events. Folding is idempotent (a redelivered event is
recognised by its id) and order-independent within the allowed lateness, so the
same state comes out of live streaming, a crash-and-replay, and the offline backfill.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from streamscore.kernels.recent import RecentEvents
from streamscore.kernels.tiles import Tiles, WindowAgg
from streamscore.stream.features import (
    DEFAULT_PACK,
    ENTITY_TYPES,
    HOUR,
    MINUTE,
    Agg,
    EntityLayout,
    FeatureDef,
    entity_layout,
)

DEFAULT_LATENESS_MS = HOUR
DEFAULT_SKEW_MS = 5 * MINUTE


class Fold(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    TOO_LATE = "too_late"


@dataclass(frozen=True, slots=True)
class FoldRecord:
    """What one entity needs of an event: the fields its features aggregate."""

    event_id: str
    time_ms: int
    amount: int
    declined: bool
    merchant_id: str
    card_id: str


class EntityState:
    __slots__ = ("folded", "recent", "tiles")

    def __init__(self, layout: EntityLayout, horizon_ms: int) -> None:
        self.tiles = {r: Tiles(r, len(layout.distinct_fields[r])) for r in layout.resolutions}
        self.recent = RecentEvents(horizon_ms)
        self.folded = 0


class FeatureStore:
    """All entities' state; ``fold`` events in, read ``features`` as of a time."""

    def __init__(
        self,
        pack: tuple[FeatureDef, ...] = DEFAULT_PACK,
        lateness_ms: int = DEFAULT_LATENESS_MS,
        skew_ms: int = DEFAULT_SKEW_MS,
    ) -> None:
        self.pack = pack
        self.lateness_ms = lateness_ms
        self.skew_ms = skew_ms
        self.layouts = {entity: entity_layout(entity, pack) for entity in ENTITY_TYPES}
        self.entities: dict[str, dict[str, EntityState]] = {e: {} for e in ENTITY_TYPES}
        self.counts = {fold: 0 for fold in Fold}

    def fold(self, entity_type: str, entity_id: str, record: FoldRecord) -> Fold:
        layout = self.layouts[entity_type]
        states = self.entities[entity_type]
        state = states.get(entity_id)
        if state is None:
            state = states[entity_id] = EntityState(layout, self.lateness_ms)
        recent = state.recent
        if recent.is_too_old(record.time_ms):
            outcome = Fold.TOO_LATE
        elif record.event_id in recent:
            outcome = Fold.DUPLICATE
        else:
            recent.add(record.time_ms, record.event_id)
            newest = recent.newest_ms
            assert newest is not None
            for r, tiles in state.tiles.items():
                values = tuple(getattr(record, name) for name in layout.distinct_fields[r])
                if tiles.add(record.time_ms, record.amount, record.declined, values):
                    # Queries go back at most lateness (replay) or skew (live) before
                    # the newest event, then one window; older buckets can never count.
                    tiles.expire(newest - self.lateness_ms - self.skew_ms - layout.max_window_ms[r])
            state.folded += 1
            outcome = Fold.APPLIED
        self.counts[outcome] += 1
        return outcome

    def earliest_exact_ms(self, entity_type: str, entity_id: str) -> int | None:
        """Queries at or after this time are exact; None when any time is.

        Older buckets and event times are let go once they are more than the fold
        horizon behind the entity's newest event (memory stays bounded), so only
        replay-mode reads far in the past can fall before it.
        """
        state = self.entities[entity_type].get(entity_id)
        if state is None or state.recent.newest_ms is None:
            return None
        return state.recent.newest_ms - self.lateness_ms

    def get(self, entity_type: str, entity_id: str) -> EntityState | None:
        return self.entities[entity_type].get(entity_id)

    def features(self, entity_type: str, entity_id: str, t_ms: int) -> dict[str, float]:
        """The entity's feature values as of ``t_ms`` (zeros / -1 for an unknown entity)."""
        layout = self.layouts[entity_type]
        state = self.entities[entity_type].get(entity_id)
        values: dict[str, float] = {}
        windows: dict[tuple[int, int], WindowAgg] = {}
        for feature in layout.features:
            if feature.agg is Agg.SECONDS_SINCE_LAST:
                newest = state.recent.newest_at_or_before(t_ms) if state else None
                values[feature.name] = -1.0 if newest is None else (t_ms - newest) / 1000
                continue
            if state is None:
                values[feature.name] = 0.0
                continue
            key = (feature.resolution_ms, feature.window_ms)
            agg = windows.get(key)
            if agg is None:
                agg = windows[key] = state.tiles[feature.resolution_ms].window(
                    t_ms, feature.window_ms
                )
            values[feature.name] = feature.value(agg, layout.distinct_slots[feature.name])
        return values

    def __len__(self) -> int:
        return sum(len(states) for states in self.entities.values())

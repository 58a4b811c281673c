"""Per-entity feature state for a feature pack, folded from validated events.

One ``EntityState`` per (entity type, entity id): a ``Tiles`` per resolution the pack
uses (a tuple in the layout's order of resolutions) plus the entity's recent events.
Folding is idempotent (a redelivered event is recognised by its id) and
order-independent within the allowed lateness, so the same state comes out of live
streaming, a crash-and-replay, and the offline backfill.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from streamscore.kernels.recent import RecentEvents
from streamscore.kernels.tiles import PyTiles, Tiles, _windowed_values_py, windowed_values
from streamscore.stream.features import (
    DEFAULT_PACK,
    ENTITY_TYPES,
    HOUR,
    MINUTE,
    EntityLayout,
    FeatureDef,
    entity_layout,
)

DEFAULT_LATENESS_MS = HOUR
# How far behind an entity's newest event a record may still be folded, and its id
# recognised as a redelivery, by the serving replicas and the backfill alike: the
# worker's lateness plus an hour of event-time skew between payments partitions.
DEFAULT_FOLD_HORIZON_MS = 2 * HOUR
DEFAULT_SKEW_MS = 5 * MINUTE


class Fold(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    TOO_LATE = "too_late"


# ``fold_fields`` returns these ints (cheaper than enum members on the hot path).
APPLIED, DUPLICATE, TOO_LATE = 0, 1, 2
FOLD_OUTCOMES = (Fold.APPLIED, Fold.DUPLICATE, Fold.TOO_LATE)
# Fields a distinct count can be over, in the order ``fold_fields`` receives them.
DISTINCT_SOURCES = ("merchant_id", "card_id")


@dataclass(frozen=True, slots=True)
class FoldRecord:
    """What one entity needs of an event: the fields its features aggregate."""

    event_id: str
    time_ms: int
    amount: int
    declined: bool
    merchant_id: str
    card_id: str
    source: int = 0  # the payments partition it came from


# Entities with at least this many events folded keep their last windowed feature
# values (see ``FeatureStore.features``); the many sparse ones are cheap to compute
# and would only cost memory.
CACHE_MIN_FOLDED = 32


class EntityState:
    __slots__ = ("cached", "folded", "others", "recent", "source", "tiles")

    def __init__(
        self, layout: EntityLayout, horizon_ms: int, tiles_type: type[PyTiles] = Tiles
    ) -> None:
        # A tuple, not a dict by resolution: ~150 bytes less per entity; the plans
        # name each tiles by its index.
        self.tiles = tuple(
            tiles_type(r, len(layout.distinct_fields[r])) for r in layout.resolutions
        )
        # The recent events of each payments partition the entity's events come
        # from (``source``): the fold horizon counts from each partition's newest event,
        # for partitions run apart in event time (a backlog, a worker catching up), and
        # an entity fed by several (a merchant) would otherwise refuse the one behind.
        # ``recent``: the first partition's; ``others``: the rest, by partition (None
        # while there is one, as for most cards).
        self.recent = RecentEvents(horizon_ms)
        self.source: int | None = None
        self.others: dict[int, RecentEvents] | None = None
        self.folded = 0
        # (key, windowed values): key = (folded, t // r for each resolution).
        self.cached: tuple[tuple[int, int], dict[str, float]] | None = None

    def newest_ms(self) -> int | None:
        """The newest event time folded, from any partition."""
        newest = self.recent.newest_ms
        if self.others:
            for recent in self.others.values():
                if recent.newest_ms is not None and (newest is None or recent.newest_ms > newest):
                    newest = recent.newest_ms
        return newest

    def newest_at_or_before(self, t_ms: int) -> int | None:
        newest = self.recent.newest_at_or_before(t_ms)
        if self.others:
            for recent in self.others.values():
                other = recent.newest_at_or_before(t_ms)
                if other is not None and (newest is None or other > newest):
                    newest = other
        return newest

    def recent_of(self, source: int, horizon_ms: int) -> RecentEvents:
        """The recent events of partition ``source`` (made on its first event)."""
        if self.source is None:
            self.source = source
        if source == self.source:
            return self.recent
        if self.others is None:
            self.others = {}
        recent = self.others.get(source)
        if recent is None:
            recent = self.others[source] = RecentEvents(horizon_ms)
        return recent

    def seen(self, event_id: str, since_ms: int) -> bool:
        """Folded already, at or after ``since_ms``, from whichever partition (a copy
        may come from another). Ids are let go lazily, so one kept from before
        ``since_ms`` (outside the fold horizon) counts as not seen: whether a copy
        counts again then does not depend on what other events came in between."""
        for recent in (self.recent, *(self.others.values() if self.others else ())):
            kept = recent.time_of(event_id)
            if kept is not None and kept >= since_ms:
                return True
        return False


def _fold_plan(layout: EntityLayout, expire_lag_ms: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Per resolution, in the layout's order (the entity's tuple of tiles, read side by
    side with it): (indices into DISTINCT_SOURCES, how far behind newest to expire)."""
    for fields in layout.distinct_fields.values():
        unknown = set(fields) - set(DISTINCT_SOURCES)
        if unknown:
            raise ValueError(f"distinct counts over {sorted(unknown)} are not supported")
    return tuple(
        (
            tuple(DISTINCT_SOURCES.index(f) for f in layout.distinct_fields[r]),
            # Queries go back at most the fold horizon (replay) or skew (live) before the
            # newest event, then one window; older buckets can never count.
            expire_lag_ms + layout.max_window_ms[r],
        )
        for r in layout.resolutions
    )


class FeatureStore:
    """All entities' state; ``fold`` events in, read ``features`` as of a time."""

    def __init__(
        self,
        pack: tuple[FeatureDef, ...] = DEFAULT_PACK,
        fold_horizon_ms: int = DEFAULT_FOLD_HORIZON_MS,
        skew_ms: int = DEFAULT_SKEW_MS,
        *,
        reference: bool = False,
    ) -> None:
        """``reference``: keep the buckets in the Python twin (``PyTiles``) and read
        them with the Python readers, the reference the compiled tiles are tested and
        measured against; by default the compiled ``Tiles`` where they were built."""
        self.pack = pack
        self._tiles_type: type[PyTiles] = PyTiles if reference else Tiles
        self._read_windows = _windowed_values_py if reference else windowed_values
        self.fold_horizon_ms = fold_horizon_ms
        self.skew_ms = skew_ms
        self.layouts = {entity: entity_layout(entity, pack) for entity in ENTITY_TYPES}
        self.entities: dict[str, dict[str, EntityState]] = {e: {} for e in ENTITY_TYPES}
        # Every feature of an entity never seen, in the pack's order (read only): its
        # windowed values are 0; the since-last ones are filled in by ``features``.
        self._zeros = {
            entity: dict.fromkeys(layout.feature_names, 0.0)
            for entity, layout in self.layouts.items()
        }
        self._plans = {
            entity: _fold_plan(layout, fold_horizon_ms + skew_ms)
            for entity, layout in self.layouts.items()
        }
        self._outcome_counts = [0, 0, 0]
        # Newest event time folded into any entity: the store's stream time.
        self.watermark_ms: int | None = None
        # Idle entities swept out of memory keep only (newest event time, events
        # folded) here (about 230 bytes instead of kilobytes): the time still answers
        # time-since-newest and refuses events too late for them, and the count goes
        # on from where it was if they come back (GetFeatures' events_folded never
        # goes down, so a caller may wait on it).
        self.idle: dict[str, dict[str, tuple[int, int]]] = {e: {} for e in ENTITY_TYPES}
        self.idle_after_ms = {
            entity: max(layout.max_window_ms.values(), default=0) + fold_horizon_ms + skew_ms
            for entity, layout in self.layouts.items()
        }

    @property
    def counts(self) -> dict[Fold, int]:
        return dict(zip(FOLD_OUTCOMES, self._outcome_counts, strict=True))

    def fold(self, entity_type: str, entity_id: str, record: FoldRecord) -> Fold:
        return FOLD_OUTCOMES[
            self.fold_fields(
                entity_type,
                entity_id,
                record.event_id,
                record.time_ms,
                record.amount,
                record.declined,
                record.merchant_id,
                record.card_id,
                record.source,
            )
        ]

    def fold_fields(
        self,
        entity_type: str,
        entity_id: str,
        event_id: str,
        time_ms: int,
        amount: int,
        declined: bool,
        merchant_id: str,
        card_id: str,
        source: int = 0,
    ) -> int:
        """Fold one event into one entity: APPLIED, DUPLICATE or TOO_LATE (the hot path).
        ``source``: the payments partition it came from; the fold horizon counts from
        that partition's newest event for the entity (see ``EntityState``)."""
        states = self.entities[entity_type]
        state = states.get(entity_id)
        if state is None:
            state = states[entity_id] = EntityState(
                self.layouts[entity_type], self.fold_horizon_ms, self._tiles_type
            )
            swept = self.idle[entity_type].pop(entity_id, None)
            if swept is not None:
                state.recent.revive(swept[0])
                state.folded = swept[1]
        recent = state.recent
        if source != state.source:
            recent = state.recent_of(source, self.fold_horizon_ms)
        newest = recent.newest_ms
        if time_ms <= state.recent.floor_ms or (
            newest is not None and time_ms < newest - self.fold_horizon_ms
        ):
            outcome = TOO_LATE
        elif (event_id in recent or state.others is not None) and state.seen(
            event_id,
            (time_ms if newest is None or time_ms > newest else newest) - self.fold_horizon_ms,
        ):
            outcome = DUPLICATE
        else:
            # The tiles first: the compiled ones refuse a bad entry (an amount out of
            # range, a time that is not an int) before any of the entity's state, its
            # recent events included, has changed. They expire behind the newest
            # event from any partition.
            newest = state.newest_ms() if state.others is not None else newest
            if newest is None or time_ms > newest:
                newest = time_ms
            sources = (merchant_id, card_id)
            for tiles, (distinct, expire_lag) in zip(
                state.tiles, self._plans[entity_type], strict=True
            ):
                values = tuple([sources[i] for i in distinct]) if distinct else ()
                if tiles.add(time_ms, amount, declined, values):
                    tiles.expire(newest - expire_lag)
            recent.add(time_ms, event_id)
            state.folded += 1
            outcome = APPLIED
        if self.watermark_ms is None or time_ms > self.watermark_ms:
            self.watermark_ms = time_ms
        self._outcome_counts[outcome] += 1
        return outcome

    def earliest_exact_ms(self, entity_type: str, entity_id: str) -> int | None:
        """Queries at or after this time are exact; None when any time is.

        Older buckets and event times are let go once they are more than the fold
        horizon behind the entity's newest event, and idle entities once they are
        further behind the store's watermark than every window (memory stays
        bounded), so only replay-mode reads far in the past can fall before it.
        """
        floors = []
        if self.watermark_ms is not None:
            floors.append(self.watermark_ms - self.fold_horizon_ms)
        state = self.entities[entity_type].get(entity_id)
        newest = state.newest_ms() if state is not None else None
        if newest is not None:
            floors.append(newest - self.fold_horizon_ms)
        return max(floors, default=None)

    def sweep_idle(self, entity_type: str, entity_ids: list[str]) -> int:
        """Drop those of ``entity_ids`` idle past every window; returns how many.

        Idle: newest event older than the watermark minus (longest window + fold
        horizon + skew). Any query the store still answers exactly (t >= watermark -
        fold horizon)
        sees nothing of such an entity but its newest event time, which is kept.
        """
        if self.watermark_ms is None:
            return 0
        cutoff = self.watermark_ms - self.idle_after_ms[entity_type]
        states = self.entities[entity_type]
        idle = self.idle[entity_type]
        swept = 0
        for entity_id in entity_ids:
            state = states.get(entity_id)
            if state is None:
                continue
            newest = state.newest_ms()
            if newest is not None and newest < cutoff:
                del states[entity_id]
                idle[entity_id] = (newest, state.folded)
                swept += 1
        return swept

    def idle_count(self) -> int:
        """Entities swept as idle (``self.idle``): read at scrape time, off the loop,
        so a sum of ``len()`` calls, each atomic; the dict of types never changes."""
        return sum(len(swept) for swept in self.idle.values())

    def get(self, entity_type: str, entity_id: str) -> EntityState | None:
        return self.entities[entity_type].get(entity_id)

    def summary(self, entity_type: str, entity_id: str) -> tuple[int | None, int]:
        """(newest event time or None, events folded) of an entity, in memory or swept."""
        state = self.entities[entity_type].get(entity_id)
        if state is not None:
            return state.newest_ms(), state.folded
        return self.idle[entity_type].get(entity_id, (None, 0))

    def features(self, entity_type: str, entity_id: str, t_ms: int) -> dict[str, float]:
        """The entity's feature values as of ``t_ms`` (zeros / -1 for an unknown entity)."""
        values: dict[str, float] = {}
        self.add_features(values, entity_type, entity_id, t_ms)
        return values

    def add_features(
        self, values: dict[str, float], entity_type: str, entity_id: str, t_ms: int
    ) -> None:
        """``features`` written into ``values``: Score's one dict for the four entities,
        with no dict of its own per entity.

        Windowed values depend on ``t`` only through its bucket at each resolution, and
        change only when an event is folded: a busy entity (a large merchant, asked
        about on most requests) keeps them keyed by (events folded, t's bucket at
        the layout's ``cache_grain``, which fixes its bucket at each resolution) and
        recomputes only ``seconds_since_last``, which depends on ``t`` itself."""
        layout = self.layouts[entity_type]
        state = self.entities[entity_type].get(entity_id)
        # The windowed values: read straight into ``values``, or copied from a dict of
        # them (read only here: the zeros, or the cached ones).
        if state is None:
            values.update(self._zeros[entity_type])
        elif state.folded >= CACHE_MIN_FOLDED:
            key = (state.folded, t_ms // layout.cache_grain)
            cached = state.cached
            if cached is None or cached[0] != key:
                cached = state.cached = (key, self._windowed(layout, state, t_ms))
            values.update(cached[1])
        else:
            self._read_windows(values, state.tiles, t_ms, layout.window_plan)
        since_last = -1.0
        if layout.since_last_names:
            if state is not None:
                newest = state.newest_at_or_before(t_ms)
            else:
                swept = self.idle[entity_type].get(entity_id)
                newest = swept[0] if swept is not None and swept[0] <= t_ms else None
            if newest is not None:
                since_last = (t_ms - newest) / 1000
        for name in layout.since_last_names:
            values[name] = since_last

    def _windowed(self, layout: EntityLayout, state: EntityState, t_ms: int) -> dict[str, float]:
        """Every feature of the entity in the pack's order, the since-last ones not yet
        filled in (``add_features`` sets them)."""
        values = dict.fromkeys(layout.feature_names, -1.0)
        self._read_windows(values, state.tiles, t_ms, layout.window_plan)
        return values

    def __len__(self) -> int:
        return sum(len(states) for states in self.entities.values())

"""Recent events of one entity: duplicate detection and time of the newest event.

Kafka redelivers after a crash and our broker has no idempotent producer, so the
state itself must recognise an event it has already folded. Event keys are kept for
events within ``horizon_ms`` of the entity's newest event time; events older than
that are refused by the caller as too late, so a duplicate can never slip past.
"""

from __future__ import annotations


class RecentEvents:
    """Keys and times of the events within ``horizon_ms`` of the newest one."""

    __slots__ = ("_times", "floor_ms", "horizon_ms", "newest_ms", "older_newest_ms")

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        self.newest_ms: int | None = None
        # Newest time among events pruned out of the horizon (for time-since-newest).
        self.older_newest_ms: int | None = None
        # Events at or before this time cannot be checked for duplicates (their keys
        # were let go with an idle entity): the caller refuses them as too late.
        self.floor_ms = -(2**63)
        # Insertion-ordered: pruning pops from the front while the front is out of the
        # horizon. An out-of-order older key may wait behind a newer one a little
        # longer (memory only: in-horizon keys are never dropped). No heap: it cost
        # a tuple per event and a log-time push on the hot path. Until a second event
        # is within the horizon the one event is a (key, time) tuple: most entities
        # (a card, device or IP) see one payment an hour at most, and a dict of one
        # costs 184 bytes against the tuple's 56.
        self._times: dict[str, int] | tuple[str, int] | None = None

    def is_too_old(self, time_ms: int) -> bool:
        """True when an event this old is outside the horizon. The rule
        ``FeatureStore.fold`` applies inline (a call per event costs there); stated
        here for the tests of the window kernels."""
        return self.newest_ms is not None and time_ms < self.newest_ms - self.horizon_ms

    def __contains__(self, key: str) -> bool:
        times = self._times
        if isinstance(times, tuple):
            return times[0] == key
        return times is not None and key in times

    def time_of(self, key: str) -> int | None:
        """The time of the kept event ``key`` (None when not kept)."""
        times = self._times
        if isinstance(times, tuple):
            return times[1] if times[0] == key else None
        return None if times is None else times.get(key)

    def add(self, time_ms: int, key: str) -> None:
        """Record an event; the caller has checked it is neither too old nor seen."""
        newest = self.newest_ms
        if newest is None or time_ms > newest:
            self.newest_ms = newest = time_ms
        times = self._times
        if times is None:
            self._times = (key, time_ms)
            return  # the only event is the newest: nothing to prune
        horizon_start = newest - self.horizon_ms
        if isinstance(times, tuple):
            old_time = times[1]
            if old_time < horizon_start:  # the lone one falls out: no dict at all
                if self.older_newest_ms is None or old_time > self.older_newest_ms:
                    self.older_newest_ms = old_time
                self._times = (key, time_ms)
                return
            times = self._times = {times[0]: old_time}
        times[key] = time_ms
        while True:
            oldest_key = next(iter(times))
            old_time = times[oldest_key]
            if old_time >= horizon_start:
                break
            del times[oldest_key]
            if self.older_newest_ms is None or old_time > self.older_newest_ms:
                self.older_newest_ms = old_time
        if len(times) == 1:
            (self._times,) = times.items()  # one left: back to a tuple

    def revive(self, newest_ms: int) -> None:
        """Start from an entity's remembered newest time (its keys were let go)."""
        self.newest_ms = newest_ms
        self.older_newest_ms = newest_ms
        self.floor_ms = newest_ms

    def newest_at_or_before(self, t_ms: int) -> int | None:
        """Time of the newest event with time <= t_ms, or None when there is none."""
        if self.newest_ms is None:
            return None
        if self.newest_ms <= t_ms:
            return self.newest_ms
        times = self._times
        kept = (times[1],) if isinstance(times, tuple) else times.values() if times else ()
        best = max((time for time in kept if time <= t_ms), default=None)
        older = self.older_newest_ms
        # Pruning is lazy, so keys older than a pruned one may remain: take the larger.
        if older is not None and older <= t_ms and (best is None or older > best):
            best = older
        return best

    def __len__(self) -> int:
        times = self._times
        return 0 if times is None else 1 if isinstance(times, tuple) else len(times)

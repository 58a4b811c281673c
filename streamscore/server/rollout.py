"""Rollouts: which model versions answer (primary, canary) and which only shadow.

``RolloutState`` is immutable; a change builds a new one, loads and warms every
version it names, then replaces the reference in one assignment, so a request routed
before the change finishes on the version it started with. Routing: a sticky slice of
cards (hash of card_id, ``comparison.in_canary``) goes to the canary.

Canary safety: every canary and primary answer feeds a sliding window of latency and
errors; when the canary's error rate or p99 is worse than the primary's by the
policy's margin (over at least ``min_requests``), the canary is rolled back to 0 %
automatically, logged and counted.

Shadows: after the primary answered, the same feature vector is queued for each
shadow version's comparison with the primary (``comparisons.py``), as a canary's
answers are for the primary's scores of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.backends.base import BackendUnavailable, Row
from streamscore.server.comparisons import Comparisons, ShadowItem
from streamscore.server.decisions import DecisionLog
from streamscore.server.errors import InvalidRequest, RolloutConflict
from streamscore.server.repository import ModelRegistry
from streamscore.server.rollout_stats import (
    LatencyErrorWindow,
    RollbackPolicy,
    in_canary,
)
from streamscore.server.rollout_store import RolloutFile
from streamscore.server.served_model import ModelLoadError, ServedModel
from streamscore.tasks import cancel_and_wait, start_background

log = logging.getLogger("streamscore.rollout")

# Rollback records kept in the rollout's file.
ROLLBACKS_KEPT = 100
# Longest rollback reason, in characters. Every Admin answer carries the kept records:
# two rollbacks with reasons of 150 KB made every answer larger than gRPC's 4 MB
# limit, so the Admin API failed after applying each change, restarts included.
ROLLBACK_REASON_MAX = 1000
# How often a stored rollout served by its primary alone (its candidates would not
# load) is tried again in full.
ADOPT_RETRY_S = 10.0


@dataclass(frozen=True)
class RolloutState:
    primary: str = ""  # "" = the registry's primary (highest version, hot-reloaded)
    canary: str = ""
    canary_percent: float = 0.0
    shadows: tuple[str, ...] = ()
    generation: int = 0

    def versions(self) -> set[str]:
        """The versions it names."""
        return {v for v in (self.primary, self.canary, *self.shadows) if v}

    def one_role_each(self) -> RolloutState:
        """The same rollout with each version in one role only: the primary's, else the
        canary's, else a shadow's (a version named as primary and canary is the
        primary, as after a promote)."""
        canary = "" if self.canary and self.canary == self.primary else self.canary
        taken = {self.primary, canary} - {""}
        shadows = tuple(dict.fromkeys(v for v in self.shadows if v not in taken))
        if canary == self.canary and shadows == self.shadows:
            return self
        return dataclasses.replace(
            self,
            canary=canary,
            canary_percent=self.canary_percent if canary else 0.0,
            shadows=shadows,
        )

    def primary_alone(self) -> RolloutState:
        """The same rollout without its candidates (canary, shadows)."""
        return dataclasses.replace(self, canary="", canary_percent=0.0, shadows=())

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_percent <= 100.0:
            raise ValueError("canary_percent must be within 0..100")
        if self.canary_percent and not self.canary:
            raise ValueError("canary_percent needs a canary_version")


@dataclass(frozen=True)
class _Partial:
    """A stored rollout this process serves by its primary alone: since when (monotonic
    time), and why its candidates did not load."""

    stored: RolloutState
    since: float
    why: str


def _check_generation(current: RolloutState, expected: int) -> None:
    """A change made on the rollout of generation ``expected`` (0: on any)."""
    if expected and expected != current.generation:
        raise RolloutConflict(f"rollout is at generation {current.generation}, not {expected}")


@dataclass(frozen=True)
class RollbackRecord:
    version: str
    reason: str
    time_ms: int
    automatic: bool

    @classmethod
    def stored(cls, record: dict[str, Any]) -> RollbackRecord:
        """A record read from the rollout's file, its reason cut to the longest
        accepted (a file written before the limit, or by hand)."""
        stored = cls(**record)
        if len(stored.reason) <= ROLLBACK_REASON_MAX:
            return stored
        return dataclasses.replace(stored, reason=stored.reason[: ROLLBACK_REASON_MAX - 1] + "…")


def _settings_of(state: RolloutState) -> dict[str, object]:
    """A rollout from settings, as stored (JSON: shadows a list), no generation."""
    return {
        "primary": state.primary,
        "canary": state.canary,
        "canary_percent": state.canary_percent,
        "shadows": list(state.shadows),
    }


class RolloutManager:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        policy: RollbackPolicy | None = None,
        window: int = 2000,
        shadow_queue: int = 1000,
        state_file: RolloutFile | None = None,
        poll_s: float = 1.0,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.registry = registry
        # Told when a background task of the rollout dies (a bug): without the shadow
        # worker no canary is compared (nor rolled back), without the follower other
        # processes' changes are not seen. The server ends, to be restarted.
        self.on_failure = on_failure
        # Shared with the host's other server processes, and kept across restarts
        # (rollout_store.py); None: this process's alone.
        self.state_file = state_file
        self.poll_s = poll_s
        self.policy = policy or RollbackPolicy()
        self.state = RolloutState()
        # The last ROLLBACKS_KEPT rollbacks, as stored: every Admin answer carries them,
        # so they must not grow with the process's age (past ~250 the answers exceeded
        # gRPC's message limit). ``rollbacks_made``: this process's own, for its
        # counter, which adopting another process's stored list must not move back.
        self.rollbacks: deque[RollbackRecord] = deque(maxlen=ROLLBACKS_KEPT)
        self.rollbacks_made = 0
        # Set by the server when the decision log is on: shadow decisions go there too.
        self.decisions: DecisionLog | None = None
        self.failure: BaseException | None = None
        self._primary_window = LatencyErrorWindow(window)
        self.comparisons = Comparisons(self, window=window, queue_size=shadow_queue)
        # Bound once: the Score path calls them with no lookup through the comparisons.
        self._enqueue = self.comparisons.enqueue
        self._candidate = self.comparisons.candidate
        self._follower: asyncio.Task[None] | None = None
        self._saving: set[asyncio.Task[None]] = set()  # automatic rollbacks being written
        # Generations automatic rollbacks started from, until stored (``_sync``).
        self._rollbacks_unsaved: set[int] = set()
        self._change = asyncio.Lock()
        self._initial = RolloutState()  # the settings' rollout (``start``)
        self._stored_settings: object = None  # the stored rollout's (``_read_stored``)
        self._unreadable = ""  # why the stored rollout last could not be read
        # The stored rollout served by its primary alone, its candidates not loadable
        # now (a Triton-backed canary while Triton is down): tried again in full by the
        # follower every ``ADOPT_RETRY_S``.
        self._partial: _Partial | None = None
        # A version the rollout uses stays loaded when a hot reload replaces the
        # registry's primary (a pinned primary, then, keeps answering).
        registry.keep = self._in_use
        registry.rollout_primary = lambda: self.state.primary

    @property
    def shared(self) -> RolloutState:
        """The rollout every process of the host shares, which changes start from: this
        process's, or the stored one while this process serves it by its primary alone
        (``_adopt``). A change based on that primary alone would drop the canary and
        the shadows for every process."""
        return self._partial.stored if self._partial is not None else self.state

    @property
    def served_alone_because(self) -> str:
        """Why this process serves the shared rollout by its primary alone ("" when it
        serves it in full)."""
        return self._partial.why if self._partial is not None else ""

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, initial: RolloutState | None = None) -> None:
        """Start from ``initial`` (the settings' rollout), or from the stored rollout
        (another process of the host wrote it, or this one before a restart, with what
        changed since: promotes, rollbacks). A setting that differs from the one the
        stored rollout started from is a change, applied over it; the rest keep what
        changed since. A stored rollout that names a version since deleted is set
        aside, logged, for the settings'. One whose candidates cannot be loaded now
        is served by its primary alone meanwhile (``_adopt``); one whose primary
        cannot, fails the start. Neither is replaced: the file is every process's,
        and one start during a Triton outage set every server's canary aside (the
        others, adopting the settings' rollout, sent the canary all their traffic)."""
        self._initial = initial or RolloutState()
        async with self._change, self._file_lock():
            stored = self._read_stored()
            if stored is not None:
                try:
                    await self._adopt(*stored)
                except Exception as error:
                    gone = self._versions_gone(stored[0])
                    if not gone:
                        log.error(
                            "the stored rollout's primary does not load: not starting (the "
                            "stored rollout is every server's, and is kept as it is)",
                            extra={"rollout": dataclasses.asdict(stored[0])},
                        )
                        if isinstance(error, ValueError | OSError | BackendUnavailable):
                            raise  # says what is wrong
                        raise ModelLoadError(  # a backend's own error type: one line
                            f"the stored rollout's primary, version {stored[0].primary}, "
                            f"does not load: {type(error).__name__}: {error}"
                        ) from error
                    log.exception(
                        "the stored rollout names versions since deleted (%s): it is "
                        "replaced by the settings' rollout",
                        ", ".join(gone),
                        extra={"rollout": dataclasses.asdict(stored[0])},
                    )
                    stored = None
            if initial is not None and stored is None:
                await self._apply(dataclasses.replace(initial, generation=0))
                self._save()
            elif self._partial is not None:
                if initial is not None and self._stored_settings != _settings_of(initial):
                    log.warning(
                        "the settings' rollout changes wait: the stored rollout they apply "
                        "over is served by its primary alone until its candidates load"
                    )
            elif initial is not None and self._stored_settings != _settings_of(initial):
                await self._apply(self._settings_changes(initial))
                self._save()
            elif self.state.generation:
                log.info(
                    "rollout from its file (the same settings, changed since)",
                    extra={"rollout": dataclasses.asdict(self.state)},
                )
        self.comparisons.start(on_failure=self._failed)
        if self.state_file is not None and self.poll_s > 0:
            self._follower = start_background(
                self._follow(),
                name="rollout-follower",
                log=log,
                failure="rollout follower stopped; other processes' changes are not seen",
                on_failure=self._failed,
            )

    async def stop(self) -> None:
        follower, self._follower = self._follower, None
        await cancel_and_wait(follower)
        await self.comparisons.stop()
        for saving in list(self._saving):
            await cancel_and_wait(saving)

    # -- the shared state (rollout_store.py) -----------------------------------------------

    def _in_use(self, version: str) -> bool:
        return version in self.state.versions()

    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """The stored rollout's lock; none when there is no file, or it cannot be
        locked (a read-only repository: the rollout is then this process's alone)."""
        async with contextlib.AsyncExitStack() as stack:
            if self.state_file is not None:
                try:
                    await stack.enter_async_context(self.state_file.locked())
                except OSError as error:
                    self._alone(error)
            yield

    def _alone(self, error: OSError) -> None:
        log.warning(
            "rollout not shared: it is this process's alone, and lost at restart",
            extra={"error": str(error)},
        )
        self.state_file = None

    def _settings_changes(self, initial: RolloutState) -> RolloutState:
        """The stored rollout with what the settings changed since it started: a
        setting the same as then keeps what changed since (a promote, a rollback)."""
        before = self._stored_settings if isinstance(self._stored_settings, dict) else {}
        now = _settings_of(initial)
        changed: dict[str, Any] = {k: v for k, v in now.items() if before.get(k) != v}
        if "shadows" in changed:
            changed["shadows"] = tuple(initial.shadows)
        log.info("rollout settings changed since stored: applied", extra={"changed": changed})
        try:
            merged = dataclasses.replace(self.state, **changed)
        except ValueError:  # e.g. a canary percent for a canary promoted since
            log.warning("the changed settings do not fit the stored rollout: all applied")
            return initial
        single = merged.one_role_each()
        if single != merged:
            # The settings' primary was the stored canary (a promote by settings), or
            # their canary is the primary since promoted: merged, one version had two
            # roles, a rollout the Admin API refuses, which every server then adopted.
            log.warning(
                "the changed settings name a version the stored rollout gives another "
                "role: it keeps one (primary, then canary, then shadow)",
                extra={"merged": dataclasses.asdict(merged), "rollout": dataclasses.asdict(single)},
            )
        return single

    def _read_stored(self) -> tuple[RolloutState, list[RollbackRecord]] | None:
        if self.state_file is None:
            return None
        try:
            data = self.state_file.read()
            if data is None:
                return None
            state = RolloutState(
                primary=str(data.get("primary", "")),
                canary=str(data.get("canary", "")),
                canary_percent=float(data.get("canary_percent", 0.0)),
                shadows=tuple(str(v) for v in data.get("shadows", ())),
                generation=int(data["generation"]),
            )
            rollbacks = [RollbackRecord.stored(record) for record in data.get("rollbacks", ())]
            self._stored_settings = data.get("settings")
        except (OSError, ValueError, TypeError, KeyError) as error:
            # Read every poll (a second): said once per cause, not every second.
            if str(error) != self._unreadable:
                self._unreadable = str(error)
                log.error("rollout file unreadable: ignored", extra={"error": str(error)})
            return None
        if self._unreadable:
            self._unreadable = ""
            log.info("rollout file readable again")
        return state, rollbacks

    def _save(self) -> None:
        if self.state_file is None:
            return
        data = {
            **dataclasses.asdict(self.shared),
            "rollbacks": [dataclasses.asdict(r) for r in self.rollbacks],
            # The settings' rollout it started from: other settings at a start are a
            # change to apply, the same ones a restart that keeps what changed since.
            "settings": _settings_of(self._initial),
        }
        try:
            self.state_file.write(data)
        except OSError as error:  # a read-only repository
            self._alone(error)

    async def _sync(self) -> None:
        """Adopt the stored rollout when it differs from this process's (another
        process changed it; or this one's automatic rollback could not be stored, the
        stored rollout having moved on): by content, not generation, which two
        processes may each have reached their own way. Not the rollout this process's
        automatic rollback, not stored yet, started from: adopting it would undo it."""
        stored = self._read_stored()
        if stored is None or stored[0] == self.state:
            return
        if stored[0].generation in self._rollbacks_unsaved:
            return
        partial = self._partial
        if (
            partial is not None
            and partial.stored == stored[0]
            and time.monotonic() - partial.since < ADOPT_RETRY_S
        ):
            return  # served by its primary alone; its candidates tried again later
        await self._adopt(*stored)

    async def _adopt(self, state: RolloutState, rollbacks: list[RollbackRecord]) -> None:
        """Make the stored ``state`` this process's. When a candidate it names (canary,
        shadow) is on disk but does not load now (its Triton down), its primary alone
        answers meanwhile (the canary's slice too), and the whole is tried again every
        ``ADOPT_RETRY_S``: better than keeping a rollout the others have left (a
        canary rolled back everywhere else kept its slice here). Raises when the
        primary does not load, or a version it names is gone."""
        stored = state
        try:
            await self._load(state)
        except Exception as error:
            alone = state.primary_alone()
            if alone == state or self._versions_gone(state):
                raise
            await self._load(alone)
            if self._partial is None or self._partial.stored != state:
                log.warning(
                    "the stored rollout's candidates do not load now: its primary alone "
                    "answers until they do (tried again every %g s)",
                    ADOPT_RETRY_S,
                    exc_info=True,
                    extra={"rollout": dataclasses.asdict(state)},
                )
            self._partial = _Partial(state, time.monotonic(), str(error))
            state = alone
        else:
            if self._partial is not None:
                log.info("the stored rollout's candidates loaded: it is served in full")
            self._partial = None
        self.rollbacks = deque(rollbacks, maxlen=ROLLBACKS_KEPT)
        if state != self.state:
            await self._switch(state, "rollout adopted")
        if stored is not state:  # candidates that did load before one failed: unused
            await self._unload_unused(stored.versions())

    def _versions_gone(self, state: RolloutState) -> list[str]:
        """The versions ``state`` names that the repository no longer holds."""
        model = self.registry.repository / self.registry.name
        return sorted(v for v in state.versions() if not (model / v).is_dir())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                async with self._change:
                    await self._sync()
            except Exception:
                log.exception("could not adopt the stored rollout; trying again")

    async def _save_rollback(self, generation_before: int) -> None:
        """Store an automatic rollback, unless the stored rollout moved on meanwhile
        (another process's change, or its own rollback of the same canary)."""
        async with self._change, self._file_lock():
            stored = self._read_stored()
            if stored is None or stored[0].generation == generation_before:
                self._save()
            self._rollbacks_unsaved.discard(generation_before)

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        if self.on_failure is not None:
            self.on_failure(exc)

    # -- routing (the Score hot path) ------------------------------------------------------

    def route(self, card_id: str) -> tuple[ServedModel, pb.Variant]:
        state = self.state
        if state.canary_percent and in_canary(card_id, state.canary_percent):
            with contextlib.suppress(KeyError):
                return self.registry.get(self.registry.name, state.canary), pb.CANARY
        return self.primary_model(state), pb.PRIMARY

    def primary_model(self, state: RolloutState | None = None) -> ServedModel:
        state = state or self.state
        if state.primary:
            try:  # not contextlib.suppress: this runs on every request
                return self.registry.get(self.registry.name, state.primary)
            except KeyError:
                pass
        return self.registry.primary

    def observe(self, variant: pb.Variant, served: ServedModel, latency_s: float, ok: bool) -> None:
        """One answered (or failed) Score call, for the canary's safety check."""
        if variant == pb.PRIMARY:
            self._primary_window.add(latency_s, ok)
            return
        if served.metadata.version != self.state.canary:
            return  # an answer in flight across a promote: no comparison to add it to
        candidate = self._candidate(served.metadata.version, "canary")
        candidate.window.add(latency_s, ok)
        candidate.answered += 1
        if not ok:
            candidate.errors += 1
        # The check sorts the windows for p99: every 10th canary answer is often enough.
        if candidate.answered % 10:
            return
        reason = self.policy.should_roll_back(self._primary_window, candidate.window)
        if reason is not None and self.state.canary == served.metadata.version:
            self._roll_back_now(f"automatic: {reason}", automatic=True)

    def compare_canary(self, served: ServedModel, vector: Row, canary_score: float) -> None:
        """Queue the primary's score of a canary answer (off the response path: the
        primary shadows the canary's slice) for the canary's comparison."""
        versions = (f"primary-of:{served.metadata.version}",)
        self._enqueue(ShadowItem(vector, canary_score, versions, served.serial))

    def shadow(
        self,
        served: ServedModel,
        vector: Row,
        primary_score: float,
        request_id: str = "",
        card_id: str = "",
    ) -> None:
        """Queue shadow scoring of a primary answer (``served``'s); never blocks,
        drops when full."""
        shadows = self.state.shadows
        if shadows:
            item = ShadowItem(vector, primary_score, shadows, served.serial, request_id, card_id)
            self._enqueue(item)

    # -- changes (Admin) ---------------------------------------------------------------------

    async def set(self, new: RolloutState, expected_generation: int = 0) -> RolloutState:
        async with self._change, self._file_lock():
            await self._sync()  # another process's change first: the generation is its
            current = self.shared
            if dataclasses.replace(new, generation=current.generation) == current:
                # Nothing changes: no new generation (which would refuse, as stale, a
                # change another operator prepared on this one), nothing stored.
                _check_generation(current, expected_generation)
                return current
            state = await self._apply(new, expected_generation)
            self._save()
            return state

    async def _apply(self, new: RolloutState, expected_generation: int = 0) -> RolloutState:
        current, shared = self.state, self.shared
        _check_generation(shared, expected_generation)
        await self._load(new)
        if self.state is not current:
            # An automatic rollback landed while the versions loaded: writing this
            # change over it would undo it (with the same generation number).
            await self._unload_unused(new.versions())
            raise RolloutConflict(
                f"rollout changed (generation {self.state.generation}) while versions "
                "loaded, by an automatic rollback: read it and try again"
            )
        state = dataclasses.replace(new, generation=shared.generation + 1)
        self._partial = None  # loaded in full: the shared rollout is served in full
        await self._switch(state, "rollout changed")
        return state

    async def _load(self, state: RolloutState) -> None:
        """Load and warm up every version ``state`` names, before it takes effect."""
        for version in sorted(state.versions()):
            if self.registry.primary.metadata.version != version:
                await self.registry.load(self.registry.name, version)

    async def _switch(self, state: RolloutState, event: str) -> None:
        """Make ``state`` the rollout (its versions loaded), then unload what only the
        one before it used."""
        current = self.state
        self.state = state  # the atomic switch
        self.comparisons.start_afresh(current, state)
        log.info(event, extra={"rollout": dataclasses.asdict(state)})
        await self._unload_unused(current.versions())

    async def _unload_unused(self, versions: Iterable[str]) -> None:
        """Unload those of ``versions`` the rollout no longer uses."""
        for version in sorted({*versions} - self.state.versions()):
            if self.registry.primary.metadata.version != version:
                await self.registry.unload(self.registry.name, version)

    async def promote(self) -> RolloutState:
        async with self._change, self._file_lock():
            await self._sync()  # the canary as the host's processes last set it
            state = self.shared
            if not state.canary:
                # The rollout's state, not the request, is wrong: FAILED_PRECONDITION.
                raise RolloutConflict("there is no canary to promote")
            last = self.rollbacks[-1] if self.rollbacks else None
            if not state.canary_percent and last is not None and last.version == state.canary:
                # Rolled back and not enabled since: promoting it would put a version the
                # rollback took off live traffic on all of it, with no check in between.
                raise RolloutConflict(
                    f"canary {state.canary!r} was rolled back ({last.reason}); give it a "
                    "canary percent again before promoting it"
                )
            promoted = await self._apply(
                dataclasses.replace(state, primary=state.canary, canary="", canary_percent=0.0)
            )
            self._save()
            return promoted

    async def roll_back(self, reason: str) -> RolloutState:
        """The canary to 0 % (a canary already there: no change). With no canary, as
        after a promote, there is nothing to roll back: refused, for an operator must
        not believe a promote undone (a primary changes back with ``set``)."""
        if len(reason) > ROLLBACK_REASON_MAX:
            raise InvalidRequest(
                "reason", f"at most {ROLLBACK_REASON_MAX} characters, not {len(reason):,}"
            )
        async with self._change, self._file_lock():
            await self._sync()
            if not self.shared.canary:
                raise RolloutConflict(
                    "there is no canary to roll back (a promote is undone by setting the "
                    "primary back: rollout set --primary VERSION)"
                )
            if self._partial is not None:
                rolled_back = self._roll_back_shared(reason or "manual")
            else:
                rolled_back = self._roll_back_now(reason or "manual", automatic=False)
            if rolled_back:
                self._save()
            return self.shared

    def _roll_back_shared(self, reason: str) -> bool:
        """A rollback through a process that serves the shared rollout by its primary
        alone (its canary does not load here): the shared rollout's canary to 0 %,
        for every process; this one goes on with its primary alone. (Refused for want
        of a canary here, a rollback, the one change that must never wait, had to go
        through another server.)"""
        assert self._partial is not None
        stored = self._partial.stored
        if not stored.canary_percent:
            return False
        rolled = dataclasses.replace(stored, canary_percent=0.0, generation=stored.generation + 1)
        self._partial = dataclasses.replace(self._partial, stored=rolled)
        self.state = dataclasses.replace(self.state, generation=rolled.generation)
        self._record_rollback(stored.canary, reason, automatic=False)
        return True

    def _roll_back_now(self, reason: str, *, automatic: bool) -> bool:
        """Canary to 0 %, at once (an automatic one runs on the Score path); False when
        there was nothing to roll back. An automatic one is stored in the background."""
        state = self.state
        if not state.canary_percent:
            return False
        self.state = dataclasses.replace(state, canary_percent=0.0, generation=state.generation + 1)
        if automatic and self.state_file is not None:
            self._rollbacks_unsaved.add(state.generation)
            start_background(
                self._save_rollback(state.generation),
                name="save-rollback",
                log=log,
                failure="storing an automatic rollback failed",
                tracked=self._saving,
            )
        self._record_rollback(state.canary, reason, automatic=automatic)
        return True

    def _record_rollback(self, version: str, reason: str, *, automatic: bool) -> None:
        record = RollbackRecord(version, reason, time.time_ns() // 1_000_000, automatic)
        self.rollbacks.append(record)
        self.rollbacks_made += 1
        log.warning(
            "canary rolled back",
            extra={"version": version, "reason": reason, "automatic": automatic},
        )

    @property
    def shadow_dropped(self) -> int:
        """Comparison work (shadows', a canary's) dropped, its queue full."""
        return self.comparisons.dropped

    def candidate_stats(self) -> list[tuple[str, str, dict[str, float]]]:
        """(version, variant, its figures) of every candidate's comparison now."""
        return self.comparisons.stats()

"""Each candidate version's comparison with the primary, off the response path.

A canary's answers are scored again by the primary, and the primary's answers by
each shadow: the Score path queues the feature vector (``enqueue``, bounded; when
full the work is dropped and counted, the caller never waits) and one background
task takes what is queued, scores it with one backend call per version (straight on
the backend, not through its batcher: a batch is ready), and feeds each candidate's
comparison (score difference, decision agreement, PSI) and, for shadows, their
latency and error window. A canary's window is fed by the Score path itself
(``RolloutManager.observe``), which rolls it back.

A comparison is of two loads (a promote, a hot reload or a version replaced in place
starts a fresh one) and goes with its candidate when it leaves the rollout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.backends.base import Row
from streamscore.server.decisions import DecisionRecord, card_hash, features_hash
from streamscore.server.rollout_stats import LatencyErrorWindow, PairComparison
from streamscore.server.served_model import ServedModel
from streamscore.tasks import cancel_and_wait, start_background

if TYPE_CHECKING:
    from streamscore.server.rollout import RolloutManager, RolloutState

log = logging.getLogger("streamscore.rollout")

# Most queued shadow items taken per backend call, and the pause after each round:
# shadow vectors accumulate meanwhile, so they go out in batches (cheaper per vector)
# and the Score path gets the loop and the core between rounds.
SHADOW_BATCH = 256
SHADOW_LINGER_S = 0.01


@dataclass(frozen=True, slots=True)
class ShadowItem:
    vector: Row
    reference_score: float  # the primary's (shadows) or the canary's score
    versions: tuple[str, ...]
    # The load that gave reference_score (ServedModel.serial): one replaced since
    # (a hot reload, train --replace) says nothing of the model serving now.
    answered_by: int
    request_id: str = ""
    card_id: str = ""


def _shadow_decision(served: ServedModel, item: ShadowItem, score: float) -> DecisionRecord:
    return DecisionRecord(
        request_id=item.request_id,
        time_ms=time.time_ns() // 1_000_000,
        variant="shadow",
        model_name=served.metadata.name,
        model_version=served.metadata.version,
        score=score,
        decision=pb.Decision.Name(served.metadata.thresholds.decide(score)),
        features_hash=features_hash(item.vector),
        card_hash=card_hash(item.card_id),
        primary_score=item.reference_score,
    )


@dataclass
class _Candidate:
    """Comparison state of one candidate version against the primary."""

    version: str
    variant: str
    comparison: PairComparison
    window: LatencyErrorWindow
    # The loads compared (ServedModel.serial of the primary, of the candidate): a
    # promote, a hot reload or a version replaced in place starts a fresh comparison.
    models: tuple[int, int] = (0, 0)
    errors: int = 0
    answered: int = 0


class Comparisons:
    """The candidates' comparisons of one rollout (``rollout``: its state, registry,
    primary and decision log, read as they are at each step)."""

    def __init__(self, rollout: RolloutManager, *, window: int, queue_size: int) -> None:
        self.rollout = rollout
        self.window = window
        self.queue: asyncio.Queue[ShadowItem] = asyncio.Queue(queue_size)
        self.dropped = 0  # comparison work dropped, the queue full
        self._candidates: dict[tuple[str, str], _Candidate] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self, on_failure: Callable[[BaseException], None]) -> None:
        self._task = start_background(
            self._work(),
            name="shadow-worker",
            log=log,
            failure="shadow worker stopped; shadows are dropped",
            on_failure=on_failure,
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _work(self) -> None:
        # Shadow work is batched: take everything queued (up to one backend batch),
        # score it with one backend call per version, compare, yield. Per vector that
        # costs microseconds instead of a batcher round trip, and the Score path, which
        # shares this event loop and this core, gets the loop back after each batch.
        queue = self.queue
        while True:
            items = [await queue.get()]
            while len(items) < SHADOW_BATCH and not queue.empty():
                items.append(queue.get_nowait())
            groups: dict[tuple[str, ...], list[ShadowItem]] = {}
            for item in items:
                groups.setdefault(item.versions, []).append(item)
            for versions, pairs in groups.items():
                for version in versions:
                    await self._shadow_batch(pairs, version)
                    await asyncio.sleep(0)
            await asyncio.sleep(SHADOW_LINGER_S)

    async def _shadow_batch(self, pairs: list[ShadowItem], version: str) -> None:
        name = self.rollout.registry.name
        if version.startswith("primary-of:"):
            candidate_version = version.removeprefix("primary-of:")
            if candidate_version != self.rollout.state.canary:
                return  # promoted or replaced meanwhile: its comparison went with it
            try:
                answering = self.rollout.registry.get(name, candidate_version).serial
            except KeyError:
                return
            served, variant = self.rollout.primary_model(), "canary"
        else:
            candidate_version = version
            if version not in self.rollout.state.shadows:
                return  # removed from the rollout meanwhile (its comparison with it)
            try:
                served = self.rollout.registry.get(name, version)
            except KeyError:
                return
            answering, variant = self.rollout.primary_model().serial, "shadow"
        # Answers of a model replaced since they were queued: not this comparison's.
        pairs = [item for item in pairs if item.answered_by == answering]
        if not pairs:
            return
        candidate = self.candidate(candidate_version, variant)
        limit = served.backend.max_batch_size
        for start in range(0, len(pairs), limit):
            chunk = pairs[start : start + limit]
            if variant == "canary":
                # The primary's own backend: its calls for the comparison go after
                # the primary's requests, never in front of them (a backend thread
                # takes one call at a time); meanwhile the queue fills and drops.
                # Polled, not an Event: setting one would cost every batch a call.
                while not served.batcher.idle:  # noqa: ASYNC110
                    await asyncio.sleep(SHADOW_LINGER_S)
            batch = np.array([item.vector for item in chunk], np.float32)
            started = time.perf_counter()
            try:
                with served.use():
                    scores = await served.backend.infer(batch)
            except Exception:
                candidate.errors += len(chunk)
                if variant == "shadow":
                    candidate.window.add_many(time.perf_counter() - started, False, len(chunk))
                continue
            if variant == "shadow":
                # Per request, as a canary's are: each waited for the whole call.
                candidate.window.add_many(time.perf_counter() - started, True, len(chunk))
                for item, score in zip(chunk, scores.tolist(), strict=True):
                    candidate.comparison.observe(item.reference_score, score)
                    if self.rollout.decisions is not None:
                        self.rollout.decisions.record(_shadow_decision(served, item, score))
            else:  # the primary's scores for canary answers
                for item, score in zip(chunk, scores.tolist(), strict=True):
                    candidate.comparison.observe(score, item.reference_score)

    def _compared(self, version: str) -> tuple[ServedModel, ServedModel | None, tuple[int, int]]:
        """The loads a comparison of ``version`` is between now: the primary's, the
        candidate's (None when it is not loaded), and their serials (``models``)."""
        primary = self.rollout.primary_model()
        registry = self.rollout.registry
        try:
            candidate: ServedModel | None = registry.get(registry.name, version)
        except KeyError:
            candidate = None
        return primary, candidate, (primary.serial, candidate.serial if candidate else 0)

    def candidate(self, version: str, variant: str) -> _Candidate:
        key = (version, variant)
        candidate = self._candidates.get(key)
        primary_model, candidate_model, models = self._compared(version)
        if candidate is not None and candidate.models != models:
            # Either side changed (a promote, a hot reload, a version replaced in
            # place): pairs against the old models, at their thresholds, say nothing
            # about these; start again.
            candidate = None
        if candidate is None:
            primary = primary_model.metadata.thresholds
            thresholds = candidate_model.metadata.thresholds if candidate_model else primary
            candidate = self._candidates[key] = _Candidate(
                version,
                variant,
                PairComparison(primary, thresholds, window=self.window),
                LatencyErrorWindow(self.window),
                models=models,
            )
        return candidate

    def start_afresh(self, before: RolloutState, after: RolloutState) -> None:
        """A new canary, or one enabled again after a rollback, starts a fresh
        comparison (the old window would roll it back again at once). The primary's
        window stays: its recent answers are the baseline, also for a canary at
        100 %, which leaves the primary no live answers. A shadow taken out of the
        rollout takes its comparison along (added again, it starts afresh)."""
        dropped = set(before.shadows) - set(after.shadows)
        for version in dropped:
            self._candidates.pop((version, "shadow"), None)
        if after.canary != before.canary or (after.canary_percent and not before.canary_percent):
            self._candidates.pop((before.canary, "canary"), None)
            dropped.add(f"primary-of:{before.canary}")
        self._drop_queued(dropped)

    def _drop_queued(self, versions: AbstractSet[str]) -> None:
        """Take ``versions`` out of the work still queued for comparisons: it was
        queued for a comparison now gone, and a version added again straight after
        would count it in its fresh one. (Rare: at a rollout change; a batch being
        scored meanwhile goes to the comparison it was taken for.)"""
        if not versions or self.queue.empty():
            return
        kept = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not versions.isdisjoint(item.versions):
                left = tuple(v for v in item.versions if v not in versions)
                if not left:
                    continue
                item = dataclasses.replace(item, versions=left)
            kept.append(item)
        for item in kept:
            self.queue.put_nowait(item)

    def stats(self) -> list[tuple[str, str, dict[str, float]]]:
        """(version, variant, its figures) of every comparison of the models serving now."""
        out = []
        # A copy of the candidates (a rollout change adds and removes them on the loop
        # while a scrape reads them on the metrics thread).
        for (version, variant), candidate in dict(self._candidates).items():
            if candidate.models != self._compared(version)[2]:
                # Of models replaced since (its next pair starts it again): not shown
                # as the comparison of the ones serving now.
                continue
            stats = dict(candidate.comparison.summary())
            stats["p99_s"] = candidate.window.p99()
            stats["error_rate"] = candidate.window.error_rate()
            stats["requests"] = float(candidate.window.count)
            stats["errors_total"] = float(candidate.errors)
            out.append((version, variant, stats))
        return out

    def enqueue(self, item: ShadowItem) -> None:
        """Queue comparison work; never waits: dropped (and counted) when full."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1

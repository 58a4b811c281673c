"""The ``Scoring`` gRPC service: features, model, decision, timings."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, cast

import grpc

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.clock import wall_clock_ms
from streamscore.logs import CURRENT_REQUEST, clipped
from streamscore.server.back_to_back import BackToBack
from streamscore.server.backends.base import Row
from streamscore.server.decisions import DecisionLog, DecisionRecord, card_hash, features_hash
from streamscore.server.drain import DrainCut
from streamscore.server.eager import start_eagerly
from streamscore.server.errors import (
    BackendFailed,
    BatcherStopped,
    DeadlineUnreachable,
    InvalidRequest,
    OutOfRange,
    Overloaded,
    ServingError,
    StreamDrained,
)
from streamscore.server.malformed import MalformedRequest
from streamscore.server.metrics import RpcMetrics, ScoreMetrics
from streamscore.server.rollout import RolloutManager
from streamscore.server.served_model import ServedModel
from streamscore.server.tracing import ScoreTracer
from streamscore.server.validation import (
    lenient_parser,
    validate_features_request,
    validate_score_request,
)
from streamscore.server.wire import PyScoreFields, encode_score_response, parse_score_request
from streamscore.stream.assembly import assemble_features
from streamscore.stream.replica import FeatureReplica
from streamscore.stream.state import FeatureStore

log = logging.getLogger("streamscore.scoring")

# The share of a unary call's budget (or of its deadline, when nearer) it may wait in
# its row for others to join it (server/back_to_back.py).
ROW_SHARE_OF_BUDGET = 0.1
# Its own logger, so that logs.RepeatLimiter limits it (see _refuse_stream).
streams_log = logging.getLogger("streamscore.streams")

# ScoreStream: messages read and being scored ahead of the one being answered.
STREAM_READ_AHEAD = 64
# What the batcher leaves of a call's budget for the fallback, under the fallback
# policy: the in-process ONNX fallback takes well under a millisecond.
FALLBACK_RESERVE_S = 0.001
READ_AHEAD_TASK = "ScoreStream read-ahead"
# A ScoreStream message tried while others of its stream are being scored is taken by
# the model's batcher only while the work queued ahead of it would end within this
# share of its budget; the rest of the queue is left to other callers. Without it one
# stream sent faster than the model filled the queue, retrying into every room a Score
# of its own left, and unary calls at a tenth of the model's capacity were refused
# (audit AX). The stream loses nothing: shed, it waits and tries again (pacing).
STREAM_QUEUE_SHARE = 0.5
# Live, an event time before 2000-01-01 is refused: a payment now has none, and it is
# what a time in seconds looks like (1.7e9) read as milliseconds.
EARLIEST_LIVE_MS = 946_684_800_000
# A request as Score's deserializer gives it (server/wire.py).
ScoreInput = PyScoreFields | MalformedRequest
# (the request, when it was read on time.perf_counter, its answer's bytes to come)
_StreamItem = tuple[ScoreInput, float, "asyncio.Future[bytes]"]

# Enum names by value, without protobuf's Python-level lookup per request.
_DECISION_NAMES = {value: name for name, value in pb.Decision.items()}
_DEGRADED_NAMES = {value: name for name, value in pb.DegradedReason.items()}


class _ReadAhead:
    """One stretch of a ScoreStream read ahead: the answers to come, in order (None:
    no more), room to read more, and how many read messages are still unanswered."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[_StreamItem | None] = asyncio.Queue()
        self.room = asyncio.Semaphore(STREAM_READ_AHEAD - 1)
        self.reader: asyncio.Task[bool] | None = None
        # Pacing (see ScoringService._score_paced): how many of this stretch's
        # messages are being scored or were woken to try again; those shed, waiting,
        # by read order; whether one has given up (the stream ends at its error).
        self.scoring = 0
        self.reads = 0
        self._paced: list[tuple[int, asyncio.Future[None]]] = []
        self.gave_up = False
        self.stopped = False  # the stream ends at an error: read no further
        # The answers not yet sent, in read order: the first is message ``_sent``.
        self._unsent: deque[asyncio.Future[bytes]] = deque()
        self._sent = 0

    def add(self, item: _StreamItem) -> None:
        """A message read, its Score started: its answer to come in turn."""
        self.answers.put_nowait(item)
        self._unsent.append(item[2])

    @property
    def unanswered(self) -> int:
        return len(self._unsent)

    def answered(self) -> None:
        self._unsent.popleft()
        self._sent += 1
        self.room.release()

    def scored(self) -> None:
        """One of the stream's Scores ended: its place goes to the earliest message
        waiting to try again (counted from now, so that no other message gives up
        for want of its own while that one is on its way; one per Score that ended,
        so a try meets the room that Score left, and a shed try wakes no other)."""
        self.scoring -= 1
        while self._paced:
            waiting = heapq.heappop(self._paced)[1]
            if not waiting.done():
                waiting.set_result(None)
                self.scoring += 1
                return

    def give_up(self, order: int) -> None:
        """The message read ``order``-th was shed with none of the stream's being
        scored: the overload is not the stream's own, and the stream ends at that
        message's error (or an earlier one's). The messages read after it will not be
        answered: their Scores stop now, not at the stream's end (tried again, they
        would take room that others' calls could use). Those read before it and
        waiting try once more, and give up too if shed: none is left waiting for a
        Score that will never come (one was, and the stream hung until its deadline:
        audit AO)."""
        self.gave_up = True
        self.stop_after(order)
        while self._paced:
            earlier, waiting = heapq.heappop(self._paced)
            if earlier < order and not waiting.done():
                waiting.set_result(None)
                self.scoring += 1

    def stop_after(self, order: int) -> None:
        """The stream ends at the error of the message read ``order``-th: the Scores
        of the messages read after it stop now (scored, their decisions would be
        logged for answers never sent: audit AX), and nothing more is read. Those
        read before it go on as they were: woken to try before their turn (as
        ``give_up`` wakes them), they were shed, and the stream ended at the shed, not
        at the error (audit AY)."""
        self.stopped = True
        for answer in itertools.islice(self._unsent, order - self._sent + 1, None):
            answer.cancel()

    async def wait_for_a_score(self, order: int) -> None:
        """Until :meth:`scored` or :meth:`give_up` lets the message read ``order``-th
        try again, counted in :attr:`scoring`."""
        waiting = asyncio.get_running_loop().create_future()
        heapq.heappush(self._paced, (order, waiting))
        try:
            await waiting
        except asyncio.CancelledError:
            if waiting.done() and not waiting.cancelled():
                self.scored()  # woken, then cancelled: its place goes on
            raise
        finally:
            waiting.cancel()  # cancelled while waiting: skipped when its turn comes

    async def abandon(self) -> None:
        """At the stream's end: stop the reader and the work of the answers never sent
        (after an error or a cancel), and mark the failures of those already done as
        seen. The reader is waited for and let go: its task keeps its cancellation's
        traceback, whose frames hold this read-ahead, a reference cycle otherwise (see
        ``_close_requests``)."""
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
        while not self.answers.empty():
            item = self.answers.get_nowait()
            if item is None:
                continue
            answer = item[2]
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()
        if reader is not None and not reader.done():
            await asyncio.wait((reader,))  # let it stop reading before the reader closes


class ScoringService(pb_grpc.ScoringServicer):
    def __init__(
        self,
        store: FeatureStore,
        rollouts: RolloutManager,
        *,
        replica: FeatureReplica | None = None,
        replay: bool = False,
        stale_after_s: float = 5.0,
        budget_s: float = 0.05,
        deadline_fallback: bool = True,
        decisions: DecisionLog | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        tracer: ScoreTracer | None = None,
        max_streams: int = 0,
        row_turns: int = 0,
        row_max_wait_s: float = 0.001,
    ) -> None:
        self.store = store
        self.rollouts = rollouts
        self.replica = replica
        self.replay = replay
        self.stale_after_s = stale_after_s
        self.budget_s = budget_s
        self.deadline_fallback = deadline_fallback
        self.decisions = decisions
        self.clock_ms = clock_ms
        self.rpc_metrics = {rpc: RpcMetrics(rpc) for rpc in ("Score", "ScoreStream", "GetFeatures")}
        self.score_metrics = ScoreMetrics()
        self.tracer = tracer
        self.max_streams = max_streams  # open at once (Settings.max_streams); 0: any
        # Streams waiting for their next message: a drain ends them (end_streams).
        self._reads = DrainCut()
        # Unary calls' bodies run in rows (server/back_to_back.py); None: each in its
        # own handler.
        self._rows = BackToBack(row_turns) if row_turns else None
        self.row_max_wait_s = row_max_wait_s
        self._stale = False  # as answers were last marked (logged when it changes)

    def features_stale(self) -> bool:
        replica = self.replica
        if replica is None:
            return False
        stale = (
            replica.failure is not None
            or not replica.caught_up
            or replica.seconds_since_fetch() > self.stale_after_s
        )
        if stale is not self._stale:
            self._stale = stale
            self._log_staleness(replica, stale)
        return stale

    def _log_staleness(self, replica: FeatureReplica, stale: bool) -> None:
        """One line when answers start to be marked FEATURES_STALE, one when they stop:
        beside the metric, the log says when and why."""
        if not stale:
            log.info("features are fresh again: answers are no longer marked FEATURES_STALE")
            return
        if replica.failure is not None:
            cause = f"the feature replica failed: {replica.failure!r}"
        elif not replica.caught_up:
            cause = "the feature replica is catching up with the log"
        else:
            cause = (
                f"no fetch from the broker for {replica.seconds_since_fetch():.1f} s "
                f"(stale_after_s {self.stale_after_s})"
            )
        # The cause as a field only: a text line showed it twice, and a constant
        # message is one an alert can match.
        log.warning("features are stale: answers are marked FEATURES_STALE", extra={"cause": cause})

    def _refuse_event_time(self, event_time_ms: int, now_ms: int) -> NoReturn:
        """A live event time that is no time in milliseconds of a payment now: more
        than the skew ahead of the clock (as such an event is dead-lettered), or before
        2000. Mostly a unit mistake (seconds; micro- or nanoseconds), which would skew
        the hour-of-day input."""
        if event_time_ms < EARLIEST_LIVE_MS:
            why = "is before 2000 (seconds, not milliseconds?)"
        else:
            why = f"is more than {self.store.skew_ms} ms ahead of the server's clock ({now_ms})"
        raise InvalidRequest(
            "transaction.event_time_ms",
            f"{event_time_ms} {why}; event times are milliseconds since the epoch",
        )

    def _check_exact_for_all(self, fields: PyScoreFields, t_ms: int) -> None:
        """Replay mode: every entity of the transaction answers exactly as of ``t_ms``."""
        for entity_type, entity_id in (
            ("card", fields.card_id),
            ("merchant", fields.merchant_id),
            ("device", fields.device_id),
            ("ip", fields.ip),
        ):
            self._check_exact(entity_type, entity_id, t_ms, "transaction.event_time_ms")

    def _check_exact(self, entity_type: str, entity_id: str, t_ms: int, field: str) -> None:
        """Refuse a replay-mode time too far behind the entity's newest event."""
        earliest = self.store.earliest_exact_ms(entity_type, entity_id)
        if earliest is not None and t_ms < earliest:
            raise OutOfRange(
                field,
                f"{t_ms} is more than the fold horizon behind the newest event of "
                f"{entity_type} {entity_id!r} or of the whole log (exact from {earliest}); "
                "values that far back are no longer kept",
            )

    async def score(
        self,
        request: ScoreInput,
        time_remaining: float | None = None,
        trace_parent: Any = None,
        *,
        validated: bool = False,
        started: int | None = None,
        waited_ns: int = 0,
        queue_share: float = 1.0,
    ) -> bytes:
        """One request's answer, encoded (a ScoreResponse's bytes); the request as
        Score's deserializer gives it (``wire.parse_score_request``). ``validated``:
        the caller checked it already (ScoreStream's reader does, to stop reading at an
        invalid one). ``started``: when the call began (``perf_counter_ns``), if before
        this body (a unary call's wait in its row counts against its budget, and is
        in its answer's ``queue_us``). ``waited_ns``: how long it waited before this
        try, in its timings (``queue_us``, ``total_us``) but not against its budget (a
        ScoreStream message paced behind its own: each try has the whole budget).
        ``queue_share``: the share of its budget within which the model's queue must
        end it for the batcher to take it (``STREAM_QUEUE_SHARE``)."""
        body_started = time.perf_counter_ns()
        if started is None:
            started = body_started
        # Every log line written while serving it names it (the card id hashed).
        CURRENT_REQUEST.set((request.request_id, request.card_id))
        if not validated:
            validate_score_request(request, replay=self.replay)
        # (Validation refuses a MalformedRequest; no cast(), a call per request.)
        fields: PyScoreFields = request  # type: ignore[assignment]
        request_id, card_id = fields.request_id, fields.card_id
        now_ms = self.clock_ms()
        # None: not set (validation requires it in replay mode); 0 is a time.
        event_time_ms = now_ms if fields.event_time_ms is None else fields.event_time_ms
        t_ms = event_time_ms if self.replay else now_ms
        if self.replay:
            self._check_exact_for_all(fields, t_ms)
        elif not EARLIEST_LIVE_MS <= event_time_ms <= now_ms + self.store.skew_ms:
            self._refuse_event_time(event_time_ms, now_ms)
        features = assemble_features(
            self.store,
            card_id=card_id,
            merchant_id=fields.merchant_id,
            device_id=fields.device_id,
            ip=fields.ip,
            amount_minor=fields.amount_minor,
            event_time_ms=event_time_ms,
            t_ms=t_ms,
        )
        features_done = time.perf_counter_ns()
        degraded: list[int] = []
        # The call's budget ends here (perf_counter_ns): the gRPC deadline capped by the
        # server's, both from the call's start, for every try (a failed canary's too).
        budget = self.budget_s if time_remaining is None else min(time_remaining, self.budget_s)
        budget_end = started + int(budget * 1e9)
        # Route (primary, or the canary for its slice of cards); the version is then
        # fixed for the whole call: a rollout change or hot reload swaps references,
        # and a version is stopped only once its calls are done.
        served, variant = self.rollouts.route(card_id)
        queue_waits: list[float] = []  # the batcher's queue, when the model call waited
        try:
            score, vector = await self._score_on(
                served,
                variant,
                features,
                budget_end,
                degraded,
                features_done,
                queue_waits,
                queue_share=queue_share,
            )
        except (Overloaded, DeadlineUnreachable, BackendFailed, BatcherStopped):
            if variant == pb.PRIMARY:
                raise
            # A candidate that cannot keep up, cannot answer in time (under either
            # deadline policy) or cannot answer at all (and whose own fallback could
            # not either): the primary answers its slice, marked FALLBACK_MODEL. The
            # failure counted against the candidate, so a slow or broken canary is
            # rolled back without its cards ever seeing an error.
            served, variant = self.rollouts.primary_model(), pb.PRIMARY
            candidate_s = (time.perf_counter_ns() - features_done) / 1e9
            score, vector = await self._score_on(
                served,
                variant,
                features,
                budget_end,
                degraded,
                features_done,
                queue_waits,
                candidate_s,
            )
            degraded.append(pb.FALLBACK_MODEL)
        metadata = served.metadata
        if served.drift is not None:
            served.drift.observe(vector, score)
        if variant == pb.PRIMARY:
            self.rollouts.shadow(served, vector, score, request_id, card_id)
        else:
            self.rollouts.compare_canary(served, vector, score)
        model_done = time.perf_counter_ns()
        decision = metadata.thresholds.decide(score)
        variant_name = "primary" if variant == pb.PRIMARY else "canary"
        decision_name = _DECISION_NAMES[decision]
        if self.decisions is not None:
            self.decisions.record(
                DecisionRecord(
                    request_id=request_id,
                    time_ms=now_ms,
                    variant=variant_name,
                    model_name=metadata.name,
                    model_version=metadata.version,
                    score=score,
                    decision=decision_name,
                    features_hash=features_hash(vector),
                    card_hash=card_hash(card_id),
                )
            )
        if self.features_stale():
            degraded.append(pb.FEATURES_STALE)
        # The model's stage less its wait in the batcher's queue (both tries', when a
        # canary failed), each on its own clock: the stage's remainder, never below 0.
        model_ns = model_done - features_done
        queue_ns = min(int(sum(queue_waits) * 1e9), model_ns) if queue_waits else 0
        response = encode_score_response(
            request_id,
            score,
            decision,
            served.model_refs[variant],
            tuple(degraded),
            features if fields.include_features else None,
            (queue_ns + body_started - started + waited_ns) // 1000,
            (features_done - body_started) // 1000,
            (model_ns - queue_ns) // 1000,
            (time.perf_counter_ns() - started + waited_ns) // 1000,
        )
        degraded_names = [_DEGRADED_NAMES[r] for r in degraded] if degraded else []
        self.score_metrics.observe(
            variant_name,
            decision_name,
            (features_done - body_started) / 1e9,
            (model_done - features_done) / 1e9,
            degraded_names,
        )
        if self.tracer is not None:
            self.tracer.record(
                trace_parent,
                {
                    "streamscore.request_id": request_id,
                    "streamscore.variant": variant_name,
                    "streamscore.model_version": metadata.version,
                    "streamscore.decision": decision_name,
                    "streamscore.degraded": degraded_names,
                },
                started,
                body_started,
                features_done,
                model_done,
                time.perf_counter_ns(),
            )
        return response

    async def _score_on(
        self,
        served: ServedModel,
        variant: pb.Variant,
        features: dict[str, float],
        budget_end: int,
        degraded: list[int],
        features_done: int,
        queue_waits: list[float],
        candidate_s: float = 0.0,
        queue_share: float = 1.0,
    ) -> tuple[float, Row]:
        """Score on one version, counted for the rollout's safety check. Its features
        in the model's order stay a tuple of floats: an idle batcher in front of the
        dense kernel scores it as it is, with no numpy array (``score_row_inline``).

        ``candidate_s``: this is the primary's rescue of a call its canary could not
        answer, after the canary's try took that long (see ``_model_score``). A rescue
        is not counted: its time includes the canary's try (counted against the canary
        already), and the primary's window is the baseline the canary is compared
        with; a slow canary's rescues in it made the primary look slow and held off the
        canary's rollback."""
        with served.use():
            vector = served.inputs_of(features)
            try:
                score = await self._model_score(
                    served,
                    variant,
                    vector,
                    budget_end,
                    degraded,
                    queue_waits,
                    candidate_s,
                    queue_share,
                )
            except Exception:
                if not candidate_s:
                    spent = (time.perf_counter_ns() - features_done) / 1e9
                    self.rollouts.observe(variant, served, spent, ok=False)
                raise
        if not candidate_s:
            # A fallback answer counts against the version, like an error: one for a
            # failed backend, and one for a deadline the version could not meet (a
            # canary that is always too slow would otherwise never be rolled back).
            spent = (time.perf_counter_ns() - features_done) / 1e9
            self.rollouts.observe(variant, served, spent, ok=not degraded)
        return score, vector

    async def _model_score(
        self,
        served: ServedModel,
        variant: pb.Variant,
        vector: Row,
        budget_end: int,
        degraded: list[int],
        queue_waits: list[float],
        candidate_s: float = 0.0,
        queue_share: float = 1.0,
    ) -> float:
        """The batched score, or the fallback by policy (DESIGN.md "Errors"). The
        batcher's deadline is the call's (``budget_end``, on ``perf_counter_ns``): what
        the features and any failed try of a canary took is no longer left.

        ``candidate_s``: on a rescue (see ``_score_on``), what the canary's try took.
        A rescue the batcher sheds as over capacity, which it would have taken with
        that time left, is shed for the canary's time, not for the primary's load:
        the call's deadline cannot be met, and the deadline policy answers it (a
        fallback score, or DEADLINE_EXCEEDED), never RESOURCE_EXHAUSTED."""
        budget = (budget_end - time.perf_counter_ns()) / 1e9
        if self.deadline_fallback:
            # The batcher gives up a little before the end, so that the fallback
            # computed then still reaches a caller whose deadline is the budget's.
            budget -= FALLBACK_RESERVE_S
        breaker = served.breaker
        if (passed := breaker.allow()) is not None:
            batcher = served.batcher
            now = batcher.clock()
            deadline = now + budget
            try:
                score = await batcher.submit(
                    vector, deadline, queue_waits, now + budget * queue_share
                )
            except Overloaded as shed:
                breaker.release(passed)  # shed: says nothing about the backend
                if not (candidate_s and batcher.admits_by(deadline + candidate_s)):
                    raise
                if not self.deadline_fallback:
                    raise DeadlineUnreachable(
                        "submit", f"the canary's try took {candidate_s:.6f}s of the budget"
                    ) from shed
                reason, error = pb.DEADLINE_FALLBACK, "deadline"
            except DeadlineUnreachable as missed:
                # A backend that did not answer in time counts as failing (a hung one
                # must open the breaker, not cost every call its whole budget); one
                # predicted to miss, or missing a deadline tighter than its usual time,
                # says nothing new about it.
                if missed.overdue:
                    breaker.record_failure(passed)
                else:
                    breaker.release(passed)
                if not self.deadline_fallback:
                    raise
                reason, error = pb.DEADLINE_FALLBACK, "deadline"
            except (BackendFailed, BatcherStopped):
                breaker.record_failure(passed)
                reason, error = pb.FALLBACK_MODEL, "backend"
                log.warning(
                    "model backend failed, using the fallback",
                    exc_info=True,
                    extra={"breaker": breaker.state},
                )
            except BaseException:
                breaker.release(passed)  # shed or cancelled: says nothing about the backend
                raise
            else:
                breaker.record_success(passed)
                return score
        else:
            # The backend is known down: straight to the fallback, no wasted call.
            reason, error = pb.FALLBACK_MODEL, "circuit open"
        # A canary's own fallback answers only in time: a late answer from it is
        # worse than the primary's, which answers the call instead (see ``score``).
        fallback = await served.fallback_score(
            vector, budget_end, in_time_only=variant != pb.PRIMARY
        )
        if fallback is None:
            raise BackendFailed(f"no fallback model after a {error} failure")
        degraded.append(reason)
        return fallback

    def _trace_parent(self, context: grpc.aio.ServicerContext) -> Any:
        if self.tracer is None:
            return None
        return self.tracer.parent(context.invocation_metadata())

    def calls_in_flight(self) -> int:
        return sum(m.in_flight for m in self.rpc_metrics.values())

    def end_streams(self) -> None:
        """At a drain, once no new call is taken: every open ScoreStream answers the
        messages it has read, then ends with UNAVAILABLE (StreamDrained), so that its
        caller moves to another server now, not when the grace period cuts it off
        (CANCELLED, with answers lost). A stream waiting for its next message stops
        waiting; one that is busy stops at its next read."""
        self._reads.cut_all()

    async def Score(self, request: ScoreInput, context: grpc.aio.ServicerContext) -> bytes:
        metrics = self.rpc_metrics["Score"]
        metrics.enter()
        try:
            remaining = context.time_remaining()
            parent = self._trace_parent(context)
            if self._rows is None:
                return await _guard(context, metrics, self.score(request, remaining, parent))
            body = self.score(request, remaining, parent, started=time.perf_counter_ns())
            # The body runs in a context of its own: the log line of a refusal, here,
            # names the request as one from the body would.
            CURRENT_REQUEST.set((request.request_id, request.card_id))
            # Waiting for others to join its row: never more than a tenth of what the
            # call has left, so that the row costs no answer its deadline.
            budget = self.budget_s if remaining is None else min(remaining, self.budget_s)
            patience = min(self.row_max_wait_s, budget * ROW_SHARE_OF_BUDGET)
            return await _guard(context, metrics, self._rows.run(body, patience))
        finally:
            metrics.exit()

    async def ScoreStream(
        self, request_iterator: AsyncIterator[ScoreInput], context: grpc.aio.ServicerContext
    ) -> None:
        """Answers in request order, each message scored as soon as it is read.

        While every answer is ready the moment its message is read (a cheap in-process
        model, answered inside the batcher's submit), the handler reads and answers in
        turn, in this one task, like a bare handler. While answers have to wait (a
        model in a worker thread, Triton, a hold for a batch), it reads ahead (up to
        ``STREAM_READ_AHEAD`` messages unanswered): while one message waits for its
        model batch the next ones are read and scored, so they can share the batch, and
        reading overlaps writing. Reading ahead starts at the first answer that waits
        and ends when one is ready at once with none before it unanswered.

        An error ends the stream with its status, naming the request id (a stream has
        one status, there is no per-message error), after the answers to every earlier
        message. An invalid request stops the reading at once: nothing after it is
        scored.

        It reads with ``context.read()`` and answers with ``context.write()``, not
        through ``request_iterator`` and ``yield``: gRPC's request iterator and its
        loop over a handler's answers are two async generators more per message."""
        metrics = self.rpc_metrics["ScoreStream"]
        metrics.enter()
        parent = self._trace_parent(context)
        ahead: _ReadAhead | None = None
        try:
            if self.max_streams and metrics.in_flight > self.max_streams:
                self._refuse_stream(context, metrics)
                return
            while True:
                # In turn: no reader task and no queue, one wake-up per message.
                # (Measured: the read-ahead machinery costs 10-14 % of a cheap
                # message's CPU.)
                while (item := await self._read_one(context, parent)) is not None:
                    request, started, answer = item
                    if not answer.done():
                        break
                    response = await _guard(
                        context, metrics, answer, request=request, started=started
                    )
                    if response is None:
                        return  # refused: the stream ends with the status _guard set
                    await context.write(response)
                else:
                    return
                # Read ahead; the waiting answer is the first in the queue.
                # Its Score, started in turn, is paced like the ones read after it
                # (on a tight budget it was shed behind them, and the stream ended).
                ahead = _ReadAhead()
                valid = cast(PyScoreFields, request)  # (an invalid one's answer is done)
                paced = self._score_paced(valid, context, parent, ahead, started, first_try=answer)
                ahead.add((request, started, start_eagerly(paced)))
                ahead.reader = asyncio.create_task(
                    self._read_ahead(context, parent, ahead),
                    name=READ_AHEAD_TASK,
                )
                while (item := await ahead.answers.get()) is not None:
                    request, started, answer = item
                    response = await _guard(
                        context, metrics, answer, request=request, started=started
                    )
                    if response is None:
                        return
                    await context.write(response)
                    ahead.answered()
                # A failed read ends the call with its error; False: the stream ended.
                if not await ahead.reader:
                    return
                ahead = None  # handed back: in turn again
        except StreamDrained as drained:
            # Set, not context.abort(): see _guard.
            context.set_code(drained.code)
            context.set_details(str(drained))
        finally:
            metrics.exit()
            if ahead is not None:
                await ahead.abandon()
            await _close_requests(request_iterator)

    def _refuse_stream(self, context: grpc.aio.ServicerContext, metrics: RpcMetrics) -> None:
        """A stream past ``max_streams``: RESOURCE_EXHAUSTED before any message is
        read; the open ones go on. Warned of (rate-limited: a leaking client retries
        as fast as it is refused), since it means a leak or a limit set too low."""
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(
            f"{self.max_streams} ScoreStreams are open, the server's limit (max_streams): "
            "close streams you no longer use, or use another server"
        )
        metrics.observe("RESOURCE_EXHAUSTED", 0.0)
        streams_log.warning(
            "ScoreStream refused: %d open, the limit (max_streams)",
            self.max_streams,
            extra={"max_streams": self.max_streams},
        )

    async def _read_one(
        self,
        context: grpc.aio.ServicerContext,
        parent: Any,
        ahead: _ReadAhead | None = None,
    ) -> _StreamItem | None:
        """The next message, validated and its Score started; None at the stream's end.
        An invalid message's answer is its error. Raises StreamDrained at a drain: a
        message that arrived as the read was cut off is not scored, only dropped.
        ``ahead``: the stretch being read ahead, if it is (its Score paces itself)."""
        reads = self._reads
        if reads.draining:
            raise StreamDrained
        task = asyncio.current_task()
        assert task is not None
        reads.enter(task)  # (not reads.waiting(): a generator per message)
        try:
            request = await context.read()
        except asyncio.CancelledError:
            if not reads.was_cut(task):
                raise
            raise StreamDrained from None
        finally:
            reads.leave(task)
        if request is grpc.aio.EOF or (ahead is not None and ahead.stopped):
            return None  # (gave up while this one was read: the stream ends before it)
        started = time.perf_counter()
        try:
            validate_score_request(request, replay=self.replay)
        except ServingError as error:
            refused: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            refused.set_exception(error)
            return request, started, refused
        # Started now: a Score that never waits (a cheap model, answered in the
        # batcher's submit) is done here, with no task and no loop turn.
        if ahead is None:
            scoring = self.score(request, context.time_remaining(), parent, validated=True)
        else:
            scoring = self._score_paced(request, context, parent, ahead, started)
        return request, started, start_eagerly(scoring)

    async def _score_paced(
        self,
        request: PyScoreFields,
        context: grpc.aio.ServicerContext,
        parent: Any,
        ahead: _ReadAhead,
        read_at: float,
        first_try: asyncio.Future[bytes] | None = None,
    ) -> bytes:
        """A stream's message read ahead: scored now, or, when shed as over capacity
        while other messages of the stream are being scored, again once one of them
        has ended, as often as that holds. A stream's read-ahead is its own queue:
        shed, its messages would end the whole stream (it has one status) on load it
        made itself, where a caller's concurrent unary calls would each only be
        refused. Shed with none of its own being scored, the overload is not its own,
        and the stream ends with RESOURCE_EXHAUSTED. While others of its stream are
        being scored, a try takes only a share of the model's queue
        (``STREAM_QUEUE_SHARE``), so that a stream paces itself before it takes the
        model from other callers. Each try is bounded by the budget (from the try)
        and the stream's deadline; the waits by the Scores waited for, which have
        theirs. The answer's timings count from the read (``read_at``, on
        ``time.perf_counter``): the waits are in its ``queue_us`` and ``total_us``
        (audit AX: answers came 2-3x the budget after their read, their timings
        leaving the waits out). An error other than the shed ends the stream at this
        message: the messages read after it stop at once (``stop_after``), not scored
        for nobody. ``first_try``: its first try, when started before (the stretch's
        first message, scored in turn)."""
        order = ahead.reads
        ahead.reads += 1
        ahead.scoring += 1
        read_ns = int(read_at * 1e9)  # (perf_counter_ns's clock)
        while True:
            try:
                if first_try is None:
                    answer = await self.score(
                        request,
                        context.time_remaining(),
                        parent,
                        validated=True,
                        waited_ns=time.perf_counter_ns() - read_ns,
                        queue_share=STREAM_QUEUE_SHARE if ahead.scoring > 1 else 1.0,
                    )
                else:
                    trying, first_try = first_try, None
                    answer = await trying
            except Overloaded:
                ahead.scoring -= 1
                if ahead.gave_up or not ahead.scoring:
                    ahead.give_up(order)
                    raise
            except asyncio.CancelledError:
                ahead.scored()
                raise
            except BaseException:
                ahead.stop_after(order)  # (first: its place goes to an earlier message)
                ahead.scored()
                raise
            else:
                ahead.scored()
                return answer
            await ahead.wait_for_a_score(order)  # counted in ahead.scoring once woken

    async def _read_ahead(
        self, context: grpc.aio.ServicerContext, parent: Any, ahead: _ReadAhead
    ) -> bool:
        """Read messages and start their Scores while the handler answers earlier ones.
        True: the stream is handed back to be read in turn (an answer was ready at
        once with none before it unanswered); False: it ended, or ends with an error."""
        try:
            while True:
                await ahead.room.acquire()
                if ahead.stopped:
                    return False  # the stream ends at an error already: read no further
                item = await self._read_one(context, parent, ahead)
                if item is None:
                    return False
                ahead.add(item)
                answer = item[2]
                if answer.done():
                    if answer.cancelled() or answer.exception() is not None:
                        return False  # the stream ends with this error: read no further
                    if ahead.unanswered == 1:
                        return True
        finally:
            ahead.answers.put_nowait(None)

    async def GetFeatures(
        self, request: pb.FeaturesRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeaturesResponse:
        metrics = self.rpc_metrics["GetFeatures"]
        metrics.enter()
        try:
            return await _guard(context, metrics, self._get_features(request))
        finally:
            metrics.exit()

    async def _get_features(self, request: pb.FeaturesRequest) -> pb.FeaturesResponse:
        validate_features_request(request)
        # as_of_ms in replay mode only; live answers are as of the server clock. Given
        # to a live server it is refused rather than silently ignored.
        if request.HasField("as_of_ms") and not self.replay:
            raise InvalidRequest(
                "as_of_ms",
                "honoured in replay mode only; this server answers as of its clock "
                "(leave it unset)",
            )
        t_ms = request.as_of_ms if request.HasField("as_of_ms") else self.clock_ms()
        self._check_exact(request.entity_type, request.entity_id, t_ms, "as_of_ms")
        newest, folded = self.store.summary(request.entity_type, request.entity_id)
        # Unset (field presence) when none: 0 is a time, an event's at the epoch.
        return pb.FeaturesResponse(
            entity_type=request.entity_type,
            entity_id=request.entity_id,
            as_of_ms=t_ms,
            features=self.store.features(request.entity_type, request.entity_id, t_ms),
            newest_event_time_ms=newest,
            events_folded=folded,
        )


def add_scoring_service(service: ScoringService, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_ScoringServicer_to_server``, but
    with request parsers that never raise, so undecodable bytes get INVALID_ARGUMENT
    (naming the message type) instead of gRPC's UNKNOWN; and Score's messages go on
    the wire without protobuf objects (server/wire.py): its request parses into a
    flat record, and its answers come encoded (no serializer)."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            service.Score, request_deserializer=parse_score_request
        ),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            service.ScoreStream, request_deserializer=parse_score_request
        ),
        "GetFeatures": grpc.unary_unary_rpc_method_handler(
            service.GetFeatures,
            request_deserializer=lenient_parser(pb.FeaturesRequest),
            response_serializer=pb.FeaturesResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Scoring"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


async def _guard(
    context: grpc.aio.ServicerContext,
    metrics: RpcMetrics,
    work: Awaitable[Any],
    *,
    request: ScoreInput | None = None,
    started: float | None = None,
) -> Any:
    """Await a call's work, mapping our error taxonomy to gRPC status codes; count and
    time it (from ``started``, on ``time.perf_counter``, when the work began earlier).
    ``request``: a stream's message, whose work ran in a context of its own: a
    refusal names it in its status and its log line (a unary call's work runs in
    the call's context, where Score set its ids).

    A refused call's status is set on the context and None returned (the handler then
    returns, and grpc sends that status), rather than ``context.abort()``: abort keeps
    its exception in the call's state, whose traceback leads back to that state, a
    reference cycle per refused call that only the cyclic collector frees; one caught
    by a GC freeze in flight would never be (server/gc_policy.py, loadtest/gc_leaks.py)."""
    if started is None:
        started = time.perf_counter()
    code = "OK"
    try:
        return await work
    except ServingError as error:
        code = error.code.name
        suffix = ""
        if request is not None:
            CURRENT_REQUEST.set((request.request_id, request.card_id))
            if request.request_id:  # (none: the error says it is missing)
                suffix = f" (request_id {clipped(request.request_id)!r})"
        # Debug only: refusals can come thousands a second under overload; the
        # streamscore_rpc_seconds_count{code} series counts them.
        log.debug("request refused", extra={"code": code, "reason": str(error)})
        context.set_code(error.code)
        context.set_details(f"{error}{suffix}")
    except asyncio.CancelledError:
        code = "CANCELLED"  # the caller went away, or the server stopped
        raise
    except Exception:
        code = "INTERNAL"
        if request is not None:
            CURRENT_REQUEST.set((request.request_id, request.card_id))
        log.exception("unexpected error while serving")
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("internal error")
    finally:
        metrics.observe(code, time.perf_counter() - started)
    return None


async def _close_requests(request_iterator: AsyncIterator[ScoreInput]) -> None:
    """Close a ScoreStream's request iterator at its end, so that the stream leaves no
    reference cycle, which only the cyclic collector frees, and never once a GC freeze
    caught the stream open (server/gc_policy.py; loadtest/gc_leaks.py finds them).
    grpc's request reader is an async generator that refers back to its owner:
    closed, it lets go."""
    close = getattr(request_iterator.__aiter__(), "aclose", None)
    if close is not None:
        await close()

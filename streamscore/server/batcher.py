"""Deadline-aware micro-batching in front of one model backend.

One :class:`Batcher` per backend merges concurrent :meth:`Batcher.submit` calls into
``infer`` calls on a stacked ``(n, k)`` float32 batch. Pure asyncio, event driven: every
decision is taken synchronously when something changes (a request arrives, a batch
ends, the one timer fires); nothing polls.

Deadlines. Each request carries an absolute deadline on :attr:`Batcher.clock`
(``time.monotonic`` by default, the clock of asyncio's own loop; uvloop's
``loop.time()`` is the same clock truncated to milliseconds, so compute deadlines with
``batcher.clock() + min(grpc_time_remaining, budget)``). A :class:`LatencyModel`
predicts the backend's time per batch size (a high quantile of recent batches, times a
margin; ``latency_model.warm_up`` seeds it with real batches before serving).

Dispatch rule:

* A batch goes out as soon as a concurrency slot is free and a request is queued
  (adaptive batching: while batches run, arrivals pile up and the next batch takes up
  to ``max_batch_size`` of them). With ``max_delay_s > 0`` a non-full batch may wait to
  grow, until the earlier of ``oldest arrival + max_delay_s`` and ``most urgent
  deadline - predicted(n) - timer_slack_s``; it never waits when the batch is full or
  the queue is full (nothing more can come in).
* Batches are filled earliest deadline first (with one budget for everyone that is
  arrival order; a caller with a tighter gRPC deadline goes ahead).
* All slots busy: requests wait in the bounded queue (``QueueFull`` beyond it). The
  requests a batch's deadline cuts from it at dispatch go back in even past the bound
  (they were admitted): by at most all but one of each running batch.

Requests that cannot make their deadline are answered at once, never run late:

* at submit, if ``now + predicted(1)`` is past the deadline (the budget is too short
  for the model itself: :class:`DeadlineUnreachable`); or if the earliest a slot frees
  (now, or the predicted end of the running batches), plus the full batches already
  queued, plus ``predicted(1)`` is past it (over capacity: :class:`Overloaded`,
  RESOURCE_EXHAUSTED at once, so that admitted requests keep their budget);
* while queued, as soon as ``now + predicted(1)`` passes the deadline (the timer,
  within one timer grain);
* just before the model call, the most urgent requests that ``predicted(batch size)``
  says would miss (a prefix in deadline order; the rest still run);
* during the model call, at the deadline (one timer per batch, not per request); the
  late score is then discarded for that request (``streamscore_batch_late_results_total``).

All but the overload raise :class:`DeadlineUnreachable` (``stage`` says which); the scoring service
turns it into a fallback score marked degraded, or DEADLINE_EXCEEDED, by its policy.
A score is only ever set when the clock, read after the backend returned, is at or
before the request's deadline.

Cancelled callers (``CancelledError`` in ``submit``: the gRPC client went away) leave
the queue at once and are dropped from their batch just before the model call. A
backend exception, or a result whose shape is not ``(n,)``, fails every request of the
batch with :class:`BackendFailed` (the cause chained). :meth:`Batcher.stop` answers
everything still queued with :class:`BatcherStopped` and waits for running batches.

Errors subclass :class:`~streamscore.server.errors.ServingError`, so each carries its
gRPC status (Overloaded, QueueFull: RESOURCE_EXHAUSTED, DeadlineUnreachable: DEADLINE_EXCEEDED,
BatcherStopped and BackendFailed: UNAVAILABLE); the service applies its fallback
policy to DeadlineUnreachable before falling back to that mapping.

Hot path per request: one future, one heap push, a few float comparisons and one
histogram observation; per batch one task, one ``np.array`` (``np.stack`` costs
several times more), one deadline timer, a few histogram observations and one
``tolist()``. An in-process backend whose calls are cheap (``infer_inline``: it runs
them on the event loop anyway) skips the task, the timer and the coroutines: its
batch runs synchronously on the loop turn after the submit, so the requests submitted
in the same turn share it; or, where a call of one is cheaper than holding a request
for that turn (``DEFER_MIN_S``), in the submit itself, and the caller never waits. Then,
with nothing queued or running, the request skips the queue too (``_call_alone``: no
future, no heap entry), the usual case on a server that is not saturated; a backend
that scores a row as it is (``score_row_inline``) then needs no numpy array either.
Predictions are cached per size until the latency model changes.
Timers use ``loop.call_later``; uvloop rounds them to whole milliseconds and may fire
up to ~1 ms early, so waits shorter than ``TIMER_GRAIN_S`` are not armed (the batch
goes now) and the in-flight deadline timer answers requests within one grain of
their deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable

import numpy as np

from streamscore.server import metrics
from streamscore.server.backends.base import Infer, InferInline, Row, ScoreRowInline
from streamscore.server.errors import (
    BackendFailed,
    BatcherError,
    BatcherStopped,
    DeadlineUnreachable,
    Overloaded,
    QueueFull,
)
from streamscore.server.fastmetrics import Tally
from streamscore.server.latency_model import LatencyModel, warm_up

# uvloop's timers have millisecond resolution (and may fire up to ~1 ms early).
TIMER_GRAIN_S = 0.001
# An inline backend whose calls of one take less CPU than this runs each submit at
# once, in the submit, instead of holding it a loop turn so that co-arriving requests
# share its batch. The hold costs every caller a suspension and a resumption, d = 100-
# 150 us of server CPU per Score under gRPC (A/B in BENCHMARKS.md); a batch of n saves
# each of its requests about c * (1 - 1/n) of a call's cost c. So holding pays only
# where c > d * n / (n - 1): about 2d for the batches of two that moderate load makes.
# The demo MLP costs 45-160 us a call on onnxruntime under load, ~8 us in process on
# the dense kernel (kernels/dense.py): it runs at once either way.
DEFER_MIN_S = 0.00025
# Moving average of those calls' cost: weight of the newest, and its cap (x the bar),
# so one pause inside a cheap call (a GC pass, a preemption) does not start the holds.
# Timed on the batcher's clock: an inline call holds the loop and the GIL throughout,
# so its wall time is its CPU time but for preemptions of the whole process, which
# the cap absorbs; the thread's CPU clock would cost two syscalls a request.
_SINGLE_ALPHA = 0.05
_SINGLE_CAP = 4.0
# A call alone feeds the latency model one time in this many (a power of two): a
# call of one costs the same from one request to the next, and its window of 64
# spans 256 calls (at most ``max_age_s``), while the observation (a sorted window,
# often a rebuild of the predictions) cost more than the call it measures.
ALONE_SAMPLE_EVERY = 4
# While predictions refuse every request, one request this often goes to an idle
# backend anyway, to measure it again (``Batcher._probe_due``).
PROBE_INTERVAL_S = 0.5
# A deadline missed in flight counts against the backend (its circuit breaker) only
# when the call had run this many times its predicted time (a high quantile already):
# callers with deadlines tighter than a healthy backend's time, on a busy CPU, opened
# the breaker of a healthy Triton for everyone else.
OVERDUE_FACTOR = 2.0

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"


def _row(vector: Row) -> np.ndarray:
    """A batch of one: a (1, k) float32 copy of the vector, in one ``np.array`` call."""
    return np.array(vector, dtype=np.float32, ndmin=2)


def _rows(requests: list[_Request]) -> np.ndarray:
    """The requests' vectors as one contiguous (n, k) float32 batch, in one
    ``np.array`` call (a single copy; for arrays cheaper than ``np.concatenate``, and
    several times cheaper than ``np.stack``)."""
    if len(requests) == 1:
        return _row(requests[0].vector)
    return np.array([r.vector for r in requests], dtype=np.float32)


def _array_length(vector: Row) -> int:
    """An array's length; ValueError when it is not one-dimensional."""
    shape = np.shape(vector)
    if len(shape) != 1:
        raise ValueError(f"expected a vector, got shape {shape}")
    return int(shape[0])


# -- batcher ---------------------------------------------------------------------------


class _Request:
    __slots__ = ("arrival", "deadline", "dispatched", "future", "probe", "queued", "vector")

    def __init__(
        self, vector: Row, deadline: float, future: asyncio.Future[float], arrival: float
    ) -> None:
        self.vector = vector
        self.deadline = deadline
        self.future = future
        self.arrival = arrival
        self.dispatched = arrival  # when its batch left the queue
        # True while in the queue (the heap may still hold it after, lazily skipped).
        self.queued = True
        # Sent although predicted to miss its deadline, to measure the backend again
        # (``submit``): never refused for that prediction.
        self.probe = False


class _Batch:
    __slots__ = ("guard", "next_expiry", "requests", "started")

    def __init__(self, requests: list[_Request], started: float) -> None:
        self.requests = requests  # in deadline order
        self.started = started  # its end is predicted from the latest measurements
        self.guard: asyncio.TimerHandle | None = None
        self.next_expiry = 0


class Batcher:
    """Merges concurrent requests for one backend into deadline-aware batches.

    ``infer``: the backend call, ``(n, k)`` float32 -> ``(n,)`` scores. ``name``: the
    ``model`` metrics label. ``max_queue``: requests waiting for a batch, at most.
    ``max_delay_s``: extra wait to grow a non-full batch (capped by deadlines; 0
    dispatches whenever a slot is free). ``n_inputs``: the vector length ``submit`` accepts
    (``ValueError`` otherwise); learnt from the first vector when not given. ``timer_slack_s``:
    how long before its most urgent request's cut-off a delayed batch leaves: it absorbs
    timer lateness on a loaded box (a late timer would otherwise shed the very request
    the batch waited for). ``clock``: the clock of deadlines (see the module docstring).
    """

    def __init__(
        self,
        infer: Infer,
        *,
        name: str,
        max_batch_size: int,
        max_queue: int,
        max_concurrent_batches: int = 1,
        max_delay_s: float = 0.0,
        latency_model: LatencyModel | None = None,
        n_inputs: int | None = None,
        timer_slack_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        infer_inline: InferInline | None = None,
        score_row_inline: ScoreRowInline | None = None,
        defer_min_s: float = DEFER_MIN_S,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_concurrent_batches < 1:
            raise ValueError("max_batch_size, max_queue and max_concurrent_batches must be >= 1")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_concurrent_batches = max_concurrent_batches
        self.max_delay_s = max_delay_s
        self.latency_model = latency_model or LatencyModel(max_batch_size)
        self.n_inputs = n_inputs
        self.timer_slack_s = timer_slack_s
        self.clock = clock
        self._infer = infer
        self._infer_inline = infer_inline
        # Tried first for a request run alone (``_call_alone``), when there is one.
        self._score_row_inline = score_row_inline if infer_inline is not None else None
        self.defer_min_s = defer_min_s
        # Moving average of inline calls of one request (unknown: hold, as for a
        # costly model, until one is measured).
        self.single_call_s = math.inf
        self._alone_calls = 0  # scored by ``_call_alone`` from the kernel's row call
        # The pending next-loop-turn dispatch of inline batches (see ``_schedule``).
        self._flush: asyncio.Handle | None = None
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        # (deadline, arrival sequence, request); entries no longer queued are skipped.
        self._heap: list[tuple[float, int, _Request]] = []
        self._sequence = itertools.count()
        self._queued = 0
        self._window_start = 0.0  # arrival of the oldest queued request (for max_delay_s)
        self._running: set[_Batch] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._last_measured = -math.inf  # when a backend call last ended (``_probe_due``)

        metrics.hold_model_series(name)  # released by stop()
        self._holds_series = True
        self._m_size = metrics.BATCH_SIZE.labels(name)
        self._m_wait = metrics.BATCH_QUEUE_WAIT.labels(name)
        # Batches of one admitted by ``_call_alone``: a size of 1 and no queue wait,
        # each, counted into both histograms at scrape time.
        self._m_admitted_alone = Tally()
        self._m_size.add_tally(self._m_admitted_alone, 1.0)
        self._m_wait.add_tally(self._m_admitted_alone, 0.0)
        self._m_backend = metrics.BACKEND_SECONDS.labels(name)
        self._m_late = metrics.LATE_RESULTS.labels(name)
        self._m_shed = {
            reason: metrics.SHED_REQUESTS.labels(name, reason) for reason in metrics.SHED_REASONS
        }
        before, during = metrics.CANCEL_STAGES
        self._m_cancelled_before = metrics.CANCELLED_REQUESTS.labels(name, before)
        self._m_cancelled_during = metrics.CANCELLED_REQUESTS.labels(name, during)
        self._m_failures = {
            kind: metrics.BACKEND_FAILURES.labels(name, kind) for kind in metrics.FAILURE_KINDS
        }

    # -- observation ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Batches dispatched and not finished."""
        return len(self._running)

    @property
    def running(self) -> bool:
        return self._state == _RUNNING

    @property
    def dispatch_pending(self) -> bool:
        """Inline batches are due on the next loop turn (see ``_schedule``)."""
        return self._flush is not None

    @property
    def next_wakeup(self) -> float | None:
        """When the batcher's one timer fires (on :attr:`clock`), or None if not armed."""
        return None if self._timer is None else self._timer_at

    # -- lifecycle -----------------------------------------------------------------

    async def warm_up(
        self,
        inputs: np.ndarray,
        *,
        sizes: Iterable[int] | None = None,
        repeats: int = 3,
        untimed: int = 1,
    ) -> dict[int, float]:
        """Seed the latency model with real batches (``latency_model.warm_up``); before
        start.

        The warm-up's call of one also seeds ``single_call_s`` (by wall time, as
        every call of one is measured): a cheap model's first requests
        then need not hold a loop turn each, nor does a ScoreStream opened after a
        reload see its first answer wait (which puts it into read-ahead for good)."""
        predicted = await warm_up(
            self._infer, inputs, self.latency_model, sizes=sizes, repeats=repeats, untimed=untimed
        )
        one = predicted.get(1, math.inf)
        if math.isinf(self.single_call_s) and math.isfinite(one):
            self._observe_single_call(one)
        return predicted

    async def start(self) -> None:
        if self._state != _NEW:
            raise RuntimeError(f"batcher {self.name!r} is {self._state}; start it once")
        self._loop = asyncio.get_running_loop()
        self._state = _RUNNING

    async def stop(self, timeout: float | None = None) -> None:
        """Answer every queued request with :class:`BatcherStopped`, cancel the timer and
        wait for the running batches (their requests still get their scores). After
        ``timeout`` seconds the remaining batches are cancelled (their requests get
        :class:`BatcherStopped`). Safe to call twice. Its series leave /metrics with
        the last batcher of its name."""
        if self._state == _NEW:
            self._state = _STOPPED
            self._release_series()
            return
        self._state = _STOPPING
        self._cancel_timer()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        while self._heap:
            request = heapq.heappop(self._heap)[2]
            if request.queued:
                request.queued = False
                self._answer_error(request, BatcherStopped("the batcher stopped"), "stopped")
        self._queued = 0
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._state = _STOPPED
        self._release_series()

    def _release_series(self) -> None:
        if self._holds_series:
            self._holds_series = False
            metrics.release_model_series(self.name)

    # -- the hot path --------------------------------------------------------------

    async def submit(
        self,
        vector: Row,
        deadline: float,
        queue_waits: list[float] | None = None,
        admit_by: float | None = None,
    ) -> float:
        """The score of one feature vector of length k (a tuple of floats, or a
        ``(k,)`` array), by ``deadline`` (on :attr:`clock`). ``queue_waits``: gets how
        long it waited in the queue, in seconds, when it did (a request run at once,
        alone, did not). ``admit_by``: taken only if the work ahead of it would end it
        by then (default ``deadline``): a caller that can wait and try again leaves
        the rest of the queue to those that cannot (a ScoreStream's own messages).

        Raises :class:`QueueFull`, :class:`DeadlineUnreachable`, :class:`BackendFailed`
        or :class:`BatcherStopped`; ``CancelledError`` when the caller is cancelled."""
        if self._state != _RUNNING:
            raise BatcherStopped(f"batcher {self.name!r} is {self._state}")
        length = len(vector) if type(vector) is tuple else _array_length(vector)
        if length != self.n_inputs:
            if self.n_inputs is not None:
                raise ValueError(
                    f"expected a vector of shape ({self.n_inputs},), got {np.shape(vector)}"
                )
            self.n_inputs = length
        now = self.clock()
        if self._queued >= self.max_queue:
            self._m_shed["queue_full"].inc()
            raise QueueFull(f"{self.max_queue} requests already queued for {self.name!r}")
        model = self.latency_model
        one = model.predict(1)
        if now + one > deadline and model.expire():
            one = model.predict(1)  # stale measurements no longer refuse it
        probe = False
        if now + one > deadline:
            if not (now < deadline and self._probe_due(now)):
                self._m_shed["deadline_submit"].inc()
                raise DeadlineUnreachable(
                    "submit",
                    f"{max(deadline - now, 0.0):.6f}s left is less than the {one:.6f}s "
                    f"{self.name!r} needs",
                )
            # Nothing measured for a while, and the backend idle: this one goes, so
            # that a prediction from a slow moment (a stall, a slow warm-up) is
            # measured again instead of refusing every request until it expires.
            probe = True
            self._last_measured = now
        if (
            not self._queued
            and not self._running
            and self._infer_inline is not None
            and not self.holds_for_a_batch
        ):
            # Nothing queued or running, and no reason to hold: the request is a batch
            # of one, run now, without the queue's bookkeeping (see ``_call_alone``).
            score = self._call_alone(vector, deadline)
            if score is not None:
                return score
        start = self._start_estimate(now)
        if admit_by is None:
            admit_by = deadline
        if not probe and start + one > admit_by and model.expire():
            one = model.predict(1)  # stale measurements no longer refuse it
            start = self._start_estimate(now)
        if not probe and start + one > admit_by:
            self._m_shed["overloaded"].inc()
            raise Overloaded(
                f"over capacity: {self._queued} queued and {len(self._running)} batches "
                f"running for {self.name!r} would take it past its deadline"
            )
        assert self._loop is not None
        request = _Request(vector, deadline, self._loop.create_future(), now)
        request.probe = probe
        if self._queued == 0:
            self._window_start = now
        self._queued += 1
        heapq.heappush(self._heap, (deadline, next(self._sequence), request))
        self._schedule(now, from_submit=True)
        try:
            score = await request.future
            if queue_waits is not None:
                queue_waits.append(request.dispatched - request.arrival)
            return score
        except asyncio.CancelledError:
            if request.queued:
                request.queued = False
                self._queued -= 1
                self._m_cancelled_before.inc()
                if len(self._heap) > 2 * self._queued + 64:
                    self._compact()
            raise

    def _start_estimate(self, now: float) -> float:
        """When a request submitted now would start: after a slot frees and the full
        batches queued ahead of it have run (every queued request counts as ahead:
        exact with one budget for all, pessimistic for a caller with a tighter
        deadline, which EDF serves first). From the latest predictions: a batch
        dispatched under predictions since expired is not held to them."""
        model = self.latency_model
        start = now
        if len(self._running) >= self.max_concurrent_batches:
            start = max(
                now,
                min(b.started + model.predict(len(b.requests)) for b in self._running),
            )
        ahead = self._queued // self.max_batch_size
        if ahead:
            start += ahead * model.predict(self.max_batch_size) / self.max_concurrent_batches
        return start

    def admits_by(self, deadline: float) -> bool:
        """Whether a request due by ``deadline`` (on :attr:`clock`) submitted now
        would be taken for the work ahead of it: the queue has room and, by the latest
        predictions, it would start and end in time (``submit``'s over-capacity rule)."""
        if self._queued >= self.max_queue:
            return False
        now = self.clock()
        return self._start_estimate(now) + self.latency_model.predict(1) <= deadline

    def _probe_due(self, now: float) -> bool:
        """Whether a request predicted to miss (with time left) may go anyway, to
        measure the backend: nothing queued or running, and nothing measured for
        ``PROBE_INTERVAL_S``."""
        return (
            not self._queued and not self._running and now - self._last_measured >= PROBE_INTERVAL_S
        )

    # -- decisions -----------------------------------------------------------------

    def _top(self) -> _Request | None:
        """The most urgent queued request, dropping entries no longer queued."""
        heap = self._heap
        while heap:
            request = heap[0][2]
            if request.queued:
                return request
            heapq.heappop(heap)
        return None

    def _schedule(self, now: float, *, from_submit: bool = False) -> None:
        """Expire, dispatch, or arm the one timer; called on every change.

        With an inline backend a submit does not dispatch at once: the batch runs on
        the next loop turn (``_on_flush``), so the requests submitted in this turn (the
        calls gRPC handed over together) share it. Otherwise an inline call, which
        blocks the loop, would always be a batch of one. Unless waiting cannot pay
        (``holds_for_a_batch``): then the call runs in the submit, and the caller gets
        its answer without giving up the loop."""
        model = self.latency_model
        one = model.predict(1)
        # Queued requests that could not make it even alone, now.
        hung: bool | None = None
        while (top := self._top()) is not None and now + one > top.deadline and not top.probe:
            heapq.heappop(self._heap)
            top.queued = False
            self._queued -= 1
            if hung is None:
                hung = self._slots_hung(now)
            self._answer_error(
                top,
                DeadlineUnreachable("queue", "deadline passed while queued", overdue=hung),
                "deadline_queue",
            )
        while self._queued and len(self._running) < self.max_concurrent_batches:
            if (
                self.max_delay_s > 0.0
                and self._queued < self.max_batch_size
                and self._queued < self.max_queue
            ):
                top = self._top()
                assert top is not None
                due = min(
                    self._window_start + self.max_delay_s,
                    top.deadline - model.predict(self._queued) - self.timer_slack_s,
                )
                if due - now > TIMER_GRAIN_S:
                    self._arm(due, now)
                    return
            if from_submit and self._infer_inline is not None and self.holds_for_a_batch:
                if self._flush is None:
                    assert self._loop is not None
                    self._flush = self._loop.call_soon(self._on_flush)
                return
            self._dispatch(now)
        if self._queued:
            # All slots busy: wake when the most urgent request becomes unreachable.
            top = self._top()
            assert top is not None
            self._arm(top.deadline - one, now)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running: work of lower priority on the same
        backend (the rollout's comparisons) may use it now."""
        return not self._queued and not self._running

    @property
    def holds_for_a_batch(self) -> bool:
        """Whether an inline submit waits a loop turn for others to share its batch:
        not without batching (batches of one), nor while a call of one costs less
        than ``defer_min_s`` (see ``DEFER_MIN_S``)."""
        return self.max_batch_size > 1 and self.single_call_s >= self.defer_min_s

    def _arm(self, when: float, now: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:
                return  # fires earlier and re-decides
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = when
        self._timer = self._loop.call_later(max(when - now, TIMER_GRAIN_S), self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _on_flush(self) -> None:
        self._flush = None
        if self._state == _RUNNING:
            self._schedule(self.clock())

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._state == _RUNNING:
            self._schedule(self.clock())

    def _dispatch(self, now: float) -> None:
        heap = self._heap
        requests: list[_Request] = []
        while heap and len(requests) < self.max_batch_size:
            request = heapq.heappop(heap)[2]
            if request.queued:
                request.queued = False
                requests.append(request)
        self._queued -= len(requests)
        if self._queued and self.max_delay_s > 0.0:
            self._window_start = min(entry[2].arrival for entry in heap if entry[2].queued)
        for request in requests:
            request.dispatched = now
        admitted = False
        if self._infer_inline is not None:
            requests = self._admit(requests, now)
            if not requests or self._call_inline(requests):
                return
            admitted = True  # the backend wants its thread now: a task awaits it
        batch = _Batch(requests, now)
        self._running.add(batch)
        assert self._loop is not None
        task = self._loop.create_task(self._run(batch, admitted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].queued]
        heapq.heapify(self._heap)

    # -- one batch -----------------------------------------------------------------

    async def _run(self, batch: _Batch, admitted: bool = False) -> None:
        try:
            await self._call(batch, admitted)
        finally:
            # Left unanswered only if the call was cancelled (stop's timeout, or the
            # backend raised CancelledError itself) or by a bug here.
            if self._state == _RUNNING:
                self._fail_batch(batch.requests, RuntimeError("the batch was abandoned"))
            else:
                for request in batch.requests:
                    self._answer_error(request, BatcherStopped("the batcher stopped"), "stopped")
            if batch.guard is not None:
                batch.guard.cancel()
            self._running.discard(batch)
            if self._state == _RUNNING:
                self._schedule(self.clock())

    def _admit(self, requests: list[_Request], now: float) -> list[_Request]:
        """The requests to run now as one batch: callers still waiting, less those
        that could not finish by their deadline even alone (answered at once), and
        sized so that the most urgent one finishes in time: the rest go back to the
        queue for the next batch. (Shedding the most urgent request to keep the
        batch whole would refuse a request that a smaller batch serves.)"""
        live = self._waiting(requests)
        # The batch is in deadline order: the unreachable ones are a prefix.
        model = self.latency_model
        one = model.predict(1)
        n, k = len(live), 0
        while k < n and now + one > live[k].deadline and not live[k].probe:
            self._answer_error(
                live[k],
                DeadlineUnreachable("dispatch", "cannot finish by the deadline"),
                "deadline_dispatch",
            )
            k += 1
        live = live[k:]
        if not live:
            return live
        # The largest size that the most urgent one's deadline allows (predictions
        # never decrease with size); at least one.
        slack = live[0].deadline - now
        size = max(1, bisect.bisect_right(range(1, len(live) + 1), slack, key=model.predict))
        if size < len(live):
            self._requeue(live[size:])
            live = live[:size]
        self._m_size.observe(len(live))
        for request in live:
            self._m_wait.observe(now - request.arrival)
        return live

    def _requeue(self, requests: list[_Request]) -> None:
        """Back in the queue, by their deadlines, for the next batch; answered
        BatcherStopped instead while the batcher stops. (A batch dispatched before a
        stop and admitted after it put them back in a queue the stop had already
        emptied: no batch ever took them, and their callers waited for good.)"""
        if self._state != _RUNNING:
            for request in requests:
                self._answer_error(request, BatcherStopped("the batcher stopped"), "stopped")
            return
        if not self._queued:
            self._window_start = requests[0].arrival
        for request in requests:
            request.queued = True
            heapq.heappush(self._heap, (request.deadline, next(self._sequence), request))
            self._window_start = min(self._window_start, request.arrival)
        self._queued += len(requests)

    def _waiting(self, requests: list[_Request]) -> list[_Request]:
        """Those whose caller still waits; the others were cancelled or answered."""
        live: list[_Request] = []
        for request in requests:
            if not request.future.done():
                live.append(request)
            elif request.future.cancelled():
                self._m_cancelled_before.inc()
        return live

    def _call_inline(self, live: list[_Request]) -> bool:
        """Run an admitted batch synchronously; False (nothing run) if the backend
        says its calls now belong in a thread. No deadline timer: nothing can answer
        a request while the loop is blocked in the call, so a late score is refused
        after it (``_finish``)."""
        assert self._infer_inline is not None
        started = self.clock()
        try:
            scores = self._infer_inline(_rows(live))
        except Exception as exc:
            self._backend_error(live, exc, started)
            return True
        if scores is None:
            return False
        if len(live) == 1:
            self._observe_single_call(self.clock() - started)
        self._finish(live, scores, started)
        return True

    def _call_alone(self, vector: Row, deadline: float) -> float | None:
        """One request's score from a batch of its own, run now, on the loop: what
        ``_dispatch``, ``_admit``, ``_call_inline`` and ``_finish`` do for a batch of one
        submitted to an idle batcher, less its request record, future and heap entry
        (a fifth of the batcher's CPU per request), and, where the backend scores a row
        as it is (``score_row_inline``), less the numpy arrays. The same metrics and
        errors, raised instead of set on a future; None, nothing run, when the backend
        says its calls now belong in a thread (then the request goes the queued way)."""
        assert self._infer_inline is not None
        started = self.clock()
        score_row = self._score_row_inline
        try:
            score = score_row(vector) if score_row is not None else None
            scores = self._infer_inline(_row(vector)) if score is None else None
        except Exception as exc:
            self._m_admitted_alone.count += 1  # as _admit counts a batch
            self._observe_backend_error(started)
            self._m_shed["backend_failed"].inc()
            raise self._backend_failed(exc) from exc
        if score is None and scores is None:
            return None
        ended = self.clock()
        # Judged against the prediction before this call's own time is folded in.
        overdue = ended > deadline and self._overdue(1, ended - started)
        self._m_admitted_alone.count += 1
        if scores is not None:
            checked = self._checked_scores(1, scores, started, ended)
            if checked is None:
                self._m_shed["backend_failed"].inc()
                raise self._backend_failed(_wrong_count(scores, 1))
            score = float(checked[0])
        else:
            self._alone_calls += 1
            self._observe_call(1, started, ended, not self._alone_calls % ALONE_SAMPLE_EVERY)
        self._observe_single_call(ended - started)
        if ended > deadline:
            self._m_late.inc()
            self._m_shed["deadline_in_flight"].inc()
            raise _finished_late(overdue)
        return score

    def _slots_hung(self, now: float) -> bool:
        """Every slot held by a batch overdue: a request that expires queued behind them
        waited on a hung backend, which must count against it (else a hung Triton with
        four slots took some 18 callers' whole budgets before its breaker opened)."""
        running = self._running
        return len(running) >= self.max_concurrent_batches and all(
            self._overdue(len(batch.requests), now - batch.started) for batch in running
        )

    def _overdue(self, n: int, seconds: float) -> bool:
        """Whether a call of ``n`` that took ``seconds`` is overdue (see
        ``DeadlineUnreachable``)."""
        return seconds > OVERDUE_FACTOR * self.latency_model.predict(n)

    def _observe_single_call(self, seconds: float) -> None:
        """Fold one call of one request's cost into ``single_call_s`` (capped, so one
        pause inside a cheap call does not start the holds)."""
        spent = min(seconds, _SINGLE_CAP * self.defer_min_s)
        average = self.single_call_s
        self.single_call_s = (
            spent if math.isinf(average) else _SINGLE_ALPHA * spent + (1 - _SINGLE_ALPHA) * average
        )

    async def _call(self, batch: _Batch, admitted: bool = False) -> None:
        now = self.clock()
        # Admitted at dispatch when an inline backend declined it; callers that went
        # away since still leave before the model call.
        queued = self._queued
        live = self._waiting(batch.requests) if admitted else self._admit(batch.requests, now)
        batch.requests = live
        if self._queued > queued:  # (never while stopping: ``_requeue`` answers them)
            self._schedule(now)  # requeued by ``_admit``: another slot may take them
        if not live:
            return
        assert self._loop is not None
        batch.guard = self._loop.call_later(
            max(live[0].deadline - now, 0.0), self._on_deadline, batch
        )
        started = self.clock()
        try:
            scores = await self._infer(_rows(live))
        except Exception as exc:
            self._backend_error(live, exc, started)
            return
        self._finish(live, scores, started)

    def _backend_error(self, live: list[_Request], exc: Exception, started: float) -> None:
        self._observe_backend_error(started)
        self._fail_batch(live, exc)

    def _observe_backend_error(self, started: float) -> None:
        self._m_backend.observe(self.clock() - started)
        self._m_failures["error"].inc()

    def _checked_scores(
        self, n: int, scores: np.ndarray, started: float, ended: float
    ) -> np.ndarray | None:
        """Account for a backend call of ``n`` that ran from ``started`` to ``ended``:
        its scores (None when not ``(n,)``, counted as a wrong count)."""
        scores = np.asarray(scores)
        counted = scores.shape == (n,)
        self._observe_call(n, started, ended, counted)
        if not counted:
            self._m_failures["wrong_count"].inc()
            return None
        return scores

    def _observe_call(self, n: int, started: float, ended: float, counted: bool = True) -> None:
        """A backend call of ``n`` that returned: its time, and, when it gave the
        right count of scores (and is sampled), the latency model's sample."""
        self._last_measured = ended
        elapsed = ended - started
        self._m_backend.observe(elapsed)
        if counted:
            self.latency_model.observe(n, elapsed)

    def _finish(self, live: list[_Request], scores: np.ndarray, started: float) -> None:
        """Answer a batch from its scores: each request in time gets its score."""
        n = len(live)
        ended = self.clock()
        # Judged against the prediction before this call's own time is folded in.
        overdue = self._overdue(n, ended - started)
        checked = self._checked_scores(n, scores, started, ended)
        if checked is None:
            self._fail_batch(live, _wrong_count(scores, n))
            return
        for request, score in zip(live, checked.tolist(), strict=True):
            future = request.future
            if future.done():
                if future.cancelled():
                    self._m_cancelled_during.inc()
                else:
                    self._m_late.inc()  # answered at its deadline already
            elif ended > request.deadline:
                self._m_late.inc()
                self._answer_error(request, _finished_late(overdue), "deadline_in_flight")
            else:
                future.set_result(score)

    def _on_deadline(self, batch: _Batch) -> None:
        """In-flight requests whose deadline (within a timer grain) has come."""
        batch.guard = None
        now = self.clock()
        requests = batch.requests
        i = batch.next_expiry
        overdue = self._overdue(len(requests), now - batch.started)
        while i < len(requests) and requests[i].deadline <= now + TIMER_GRAIN_S:
            self._answer_error(
                requests[i],
                DeadlineUnreachable(
                    "in_flight", "the backend is slower than the deadline", overdue=overdue
                ),
                "deadline_in_flight",
            )
            i += 1
        batch.next_expiry = i
        if i < len(requests):
            assert self._loop is not None
            batch.guard = self._loop.call_later(
                max(requests[i].deadline - now, TIMER_GRAIN_S), self._on_deadline, batch
            )

    def _fail_batch(self, requests: list[_Request], cause: BaseException) -> None:
        for request in requests:
            if not request.future.done():
                self._answer_error(request, self._backend_failed(cause), "backend_failed")

    def _backend_failed(self, cause: BaseException) -> BackendFailed:
        error = BackendFailed(f"backend {self.name!r} failed: {cause!r}")
        error.__cause__ = cause
        return error

    def _answer_error(self, request: _Request, error: BatcherError, reason: str) -> None:
        if not request.future.done():
            request.future.set_exception(error)
            self._m_shed[reason].inc()


def _wrong_count(scores: np.ndarray, n: int) -> ValueError:
    return ValueError(f"backend returned {np.shape(scores)} scores for {n} requests")


def _finished_late(overdue: bool) -> DeadlineUnreachable:
    return DeadlineUnreachable(
        "in_flight", "the backend finished after the deadline", overdue=overdue
    )

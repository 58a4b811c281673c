"""The deadline-aware batcher: hypothesis properties against a fake backend whose
latency and failures each scenario controls, plus unit tests of single decisions and
of the latency model.

Timing-robust by construction: properties are checked on the batcher's decisions and
on times recorded by the fake backend (a score implies the backend finished by the
request's deadline), never on how fast the test's own tasks wake up. The properties
run on uvloop (production), the plain tests on pytest-asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from streamscore.server.batcher import ALONE_SAMPLE_EVERY, DEFER_MIN_S, Batcher
from streamscore.server.eager import start_eagerly
from streamscore.server.errors import (
    BackendFailed,
    BatcherError,
    BatcherStopped,
    DeadlineUnreachable,
    Overloaded,
    QueueFull,
)
from streamscore.server.latency_model import LatencyModel, warm_up, warm_up_sizes

# Derandomized, so that CI runs the same cases every time; HYPOTHESIS_EXPLORE=1 draws
# new ones (run it a few times after changing the batcher).
EXPLORE = bool(os.environ.get("HYPOTHESIS_EXPLORE"))
PROPERTIES = settings(
    max_examples=50,
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

K = 3


def vector(i: int) -> np.ndarray:
    return np.array([i, 0.25, -1.0], dtype=np.float32)


def own_score(i: int) -> float:
    return i + 0.5


# -- the fake backend -------------------------------------------------------------------


@dataclass
class Call:
    ids: list[int]
    seq: int  # position among all test events (cancellations, calls)
    start: float
    mode: str
    end: float | None = None


class FakeBackend:
    """Latency and outcome per call from ``plan`` (cycled): ``ok`` returns ``id + 0.5``
    per row, ``fail`` raises, ``short``/``long`` return one score too few/many.

    ``infer_inline`` is the in-process twin (it blocks the loop for the latency, like
    a model computing on it), except for ``defer``: it declines (None, nothing run), as
    a backend whose calls moved to a thread does, and ``infer`` then runs it as ``ok``.
    """

    def __init__(
        self,
        plan: list[tuple[float, str]],
        events: itertools.count[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.events = events or itertools.count()
        self.clock = clock
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None  # when set, calls also wait for it
        self.row_calls = 0  # calls of score_row_inline that ran

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 2 and batch.shape[1] == K
        latency, mode = self.plan[len(self.calls) % len(self.plan)]
        call = Call([int(x) for x in batch[:, 0]], next(self.events), self.clock(), mode)
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(latency)
        finally:
            self.in_flight -= 1
        call.end = self.clock()
        return self._result(batch, mode)

    def infer_inline(self, batch: np.ndarray) -> np.ndarray | None:
        assert batch.dtype == np.float32 and batch.ndim == 2 and batch.shape[1] == K
        latency, mode = self.plan[len(self.calls) % len(self.plan)]
        if mode == "defer":
            return None
        self._compute([int(x) for x in batch[:, 0]], latency, mode)
        return self._result(batch, mode)

    def score_row_inline(self, row: tuple[float, ...]) -> float | None:
        """``infer_inline`` of one row as it is (a tuple of floats), its score a float;
        declines (None) the modes only a batch shows (``short``, ``long``) and
        ``defer``: ``infer_inline`` then has them."""
        assert type(row) is tuple and len(row) == K
        latency, mode = self.plan[len(self.calls) % len(self.plan)]
        if mode not in ("ok", "fail"):
            return None
        self.row_calls += 1
        self._compute([int(row[0])], latency, mode)
        if mode == "fail":
            raise RuntimeError("backend down")
        return row[0] + 0.5

    def _compute(self, ids: list[int], latency: float, mode: str) -> None:
        call = Call(ids, next(self.events), self.clock(), mode)
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            spin_until = time.perf_counter() + latency  # computes: CPU time, as a model's
            while time.perf_counter() < spin_until:
                pass
        finally:
            self.in_flight -= 1
        call.end = self.clock()

    @staticmethod
    def _result(batch: np.ndarray, mode: str) -> np.ndarray:
        scores = batch[:, 0] + np.float32(0.5)
        if mode == "fail":
            raise RuntimeError("backend down")
        if mode == "short":
            return scores[:-1]
        if mode == "long":
            return np.append(scores, np.float32(0.0))
        return scores


def seeded_model(
    max_batch_size: int, seconds: float, per_row_s: float = 0.0, **kwargs: float
) -> LatencyModel:
    model = LatencyModel(max_batch_size, **kwargs)  # type: ignore[arg-type]
    for size in warm_up_sizes(max_batch_size):
        model.seed(size, seconds + per_row_s * size)
    return model


def run_on_uvloop(main: Callable[[], object]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())  # type: ignore[arg-type]


# -- scenarios ------------------------------------------------------------------------


@dataclass
class Scenario:
    max_batch_size: int
    max_queue: int
    max_concurrent: int
    max_delay_s: float
    # What the seeded latency model believes (margin 1): base + per row * batch size.
    predicted_s: float
    predicted_per_row_s: float
    plan: list[tuple[float, str]]
    # (arrival offset s, budget s, cancel after s or None)
    requests: list[tuple[float, float, float | None]]
    stop_at_s: float | None
    # The backend has ``infer_inline`` (an in-process model); plans may then ``defer``.
    inline: bool = False
    # Inline calls of one cheaper than this run in the submit (0: always hold a turn;
    # 1 s: never, once a call of one was measured).
    defer_min_s: float = DEFER_MIN_S


MS = 0.001


@st.composite
def scenarios(
    draw: st.DrawFn, failures: bool = True, tight: bool = True, inline: bool | None = None
) -> Scenario:
    if inline is None:
        inline = draw(st.booleans())
    modes = ["ok"] * 10 + (["fail", "short", "long"] if failures else [])
    if inline:
        modes += ["defer"] * 3
    budgets = [0, 1, 2, 3, 5, 8, 12, 20, 30, 40, 60, 80] if tight else [2000]
    n = draw(st.integers(1, 24))
    requests = draw(
        st.lists(
            st.tuples(
                # Bursts (many at 0) and stragglers.
                st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3, 5, 8, 12]).map(lambda ms: ms * MS),
                st.sampled_from(budgets).map(lambda ms: ms * MS),
                # A third of the callers go away after 0-12 ms.
                st.integers(-24, 12).map(lambda ms: ms * MS if ms >= 0 else None)
                if tight
                else st.none(),
            ),
            min_size=n,
            max_size=n,
        )
    )
    return Scenario(
        max_batch_size=draw(st.integers(1, 6)),
        max_queue=draw(st.integers(1, 12)),
        max_concurrent=draw(st.integers(1, 3)),
        max_delay_s=draw(st.sampled_from([0.0, 0.0, 2 * MS, 5 * MS])),
        predicted_s=draw(st.sampled_from([0.0, 1 * MS, 3 * MS])),
        predicted_per_row_s=draw(st.sampled_from([0.0, 0.5 * MS, 1 * MS])),
        plan=draw(
            st.lists(
                st.tuples(
                    st.sampled_from([0, 0.5, 1, 2, 4, 8]).map(lambda ms: ms * MS),
                    st.sampled_from(modes),
                ),
                min_size=1,
                max_size=6,
            )
        ),
        requests=requests,
        # A third stop the batcher 0-40 ms in, the rest after every caller is done.
        stop_at_s=draw(st.integers(0, 120).map(lambda ms: ms * MS if ms <= 40 else None))
        if tight
        else None,
        inline=inline,
        defer_min_s=draw(st.sampled_from([DEFER_MIN_S, 0.0, 1.0])),
    )


@dataclass
class Record:
    deadline: float = 0.0
    queued_before: int = -1
    # Batches running when it was submitted.
    running_before: int = -1
    submitted: bool = False
    outcomes: list[tuple[str, object]] = field(default_factory=list)
    cancel_seq: int | None = None


async def play(sc: Scenario) -> tuple[Batcher, FakeBackend, list[Record], list[str]]:
    """Run one scenario to the end; check the sampled invariants on the way."""
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(str(context)))
    events = itertools.count()
    backend = FakeBackend(sc.plan, events)
    batcher = Batcher(
        backend.infer,
        name="property",
        max_batch_size=sc.max_batch_size,
        max_queue=sc.max_queue,
        max_concurrent_batches=sc.max_concurrent,
        max_delay_s=sc.max_delay_s,
        latency_model=seeded_model(
            sc.max_batch_size, sc.predicted_s, sc.predicted_per_row_s, margin=1.0
        ),
        n_inputs=K,
        infer_inline=backend.infer_inline if sc.inline else None,
        defer_min_s=sc.defer_min_s,
    )
    await batcher.start()
    records = [Record() for _ in sc.requests]
    stop_seq: list[int] = []
    violations: list[str] = []

    # Submits are refused at max_queue; the requests a batch's deadline cuts from it
    # at dispatch go back in past that bound (they were admitted): at most all but
    # one of each running batch.
    queue_bound = sc.max_queue + sc.max_concurrent * (sc.max_batch_size - 1)

    def check_invariants() -> None:
        queued, in_flight = batcher.queued, batcher.in_flight
        if queued > queue_bound:
            violations.append(f"queue {queued} > {queue_bound}")
        if in_flight > sc.max_concurrent or backend.in_flight > sc.max_concurrent:
            violations.append(f"{in_flight} batches in flight > {sc.max_concurrent}")
        if batcher.running and queued and in_flight < sc.max_concurrent:
            if batcher.dispatch_pending:
                return  # an inline batch goes on the next loop turn
            # Waiting with a free slot: only to grow a batch that can still grow, and
            # with the timer armed no later than max_delay from now.
            wakeup = batcher.next_wakeup
            if not (
                sc.max_delay_s > 0
                and queued < sc.max_batch_size
                and queued < sc.max_queue
                and wakeup is not None
                and wakeup <= batcher.clock() + sc.max_delay_s
            ):
                violations.append(
                    f"idle slot with {queued} queued, delay {sc.max_delay_s}, timer {wakeup}"
                )

    async def client(i: int, offset: float, budget: float) -> None:
        record = records[i]
        try:
            await asyncio.sleep(offset)
            record.queued_before = batcher.queued
            record.running_before = batcher.in_flight
            record.deadline = batcher.clock() + budget
            record.submitted = True
            score = await batcher.submit(vector(i), record.deadline)
        except asyncio.CancelledError:
            record.outcomes.append(("cancelled", None))
        except BatcherError as error:
            record.outcomes.append((type(error).__name__, error))
        else:
            record.outcomes.append(("score", score))
        check_invariants()

    tasks = [
        loop.create_task(client(i, offset, budget))
        for i, (offset, budget, _) in enumerate(sc.requests)
    ]

    def cancel(i: int) -> None:
        if tasks[i].cancel():
            records[i].cancel_seq = next(events)

    for i, (offset, _, cancel_after) in enumerate(sc.requests):
        if cancel_after is not None:
            loop.call_later(offset + cancel_after, cancel, i)

    async def stop_later(delay: float) -> None:
        await asyncio.sleep(delay)
        stop_seq.append(next(events))
        await batcher.stop()

    stopper = None if sc.stop_at_s is None else loop.create_task(stop_later(sc.stop_at_s))

    async def sample() -> None:
        while True:
            check_invariants()
            await asyncio.sleep(0)

    sampler = loop.create_task(sample())
    async with asyncio.timeout(20):
        await asyncio.gather(*tasks, return_exceptions=True)
        if stopper is not None:
            await stopper
        await batcher.stop()
    sampler.cancel()
    for task, record in zip(tasks, records, strict=True):
        if task.cancelled():  # cancelled before it first ran
            assert not record.outcomes and not record.submitted
            record.outcomes.append(("cancelled", None))
    check_invariants()
    assert not violations, violations[:5]
    assert batcher.queued == 0 and batcher.in_flight == 0
    with pytest.raises(BatcherStopped):
        await batcher.submit(vector(0), batcher.clock() + 1)
    await asyncio.sleep(0)  # let cancelled timer/handles settle before the loop closes
    return batcher, backend, records, loop_errors


def check_outcomes(sc: Scenario, backend: FakeBackend, records: list[Record]) -> None:
    calls_of: dict[int, list[Call]] = {}
    call: Call | None
    for call in backend.calls:
        assert 1 <= len(call.ids) <= sc.max_batch_size
        assert len(set(call.ids)) == len(call.ids)
        for i in call.ids:
            calls_of.setdefault(i, []).append(call)
    assert backend.max_in_flight <= sc.max_concurrent
    for i, record in enumerate(records):
        # Exactly one outcome per request; never run twice.
        assert len(record.outcomes) == 1, (i, record.outcomes)
        assert len(calls_of.get(i, [])) <= 1, (i, calls_of[i])
        kind, value = record.outcomes[0]
        call = calls_of[i][0] if i in calls_of else None
        if record.cancel_seq is not None and call is not None:
            # A cancelled caller leaves before the model call.
            assert call.seq < record.cancel_seq, (i, call, record.cancel_seq)
        if kind == "score":
            # Its own score, from a good call that finished by the deadline.
            assert value == own_score(i)
            assert call is not None and call.mode in ("ok", "defer")
            assert call.end is not None and call.end <= record.deadline
        elif kind == "BackendFailed":
            assert call is not None and call.mode not in ("ok", "defer")
        elif kind == "QueueFull":
            assert record.queued_before >= sc.max_queue
        elif kind == "BatcherStopped":
            assert sc.stop_at_s is not None
        elif kind == "Overloaded":
            # Shed for the work ahead of it, never with an idle backend and empty queue.
            assert record.queued_before > 0 or record.running_before > 0, (i, record)
        elif kind == "DeadlineUnreachable":
            assert isinstance(value, DeadlineUnreachable)
            assert value.stage in {"submit", "queue", "dispatch", "in_flight"}
        else:
            assert kind == "cancelled", kind
            assert record.cancel_seq is not None


# Found by HYPOTHESIS_EXPLORE: a stop just after a dispatch, the batch then cut by its
# deadline: the cut requests went back into the queue the stop had emptied, and their
# callers waited for good; and a cut batch's requests put back into a full queue.
STOPPED_AS_A_BATCH_IS_CUT = Scenario(
    max_batch_size=6,
    max_queue=3,
    max_concurrent=1,
    max_delay_s=0.005,
    predicted_s=0.0,
    predicted_per_row_s=0.001,
    plan=[(0.0, "ok")],
    requests=[(0.0, 0.0, 0.0)] * 2
    + [(0.0, 0.012, 0.003)]
    + [(0.0, 0.0, 0.0)] * 3
    + [(0.0, 0.012, None), (0.0, 0.003, None), (0.0, 0.0, 0.0), (0.0, 0.0, None)]
    + [(0.0, 0.0, 0.006), (0.0, 0.0, 0.0), (0.0, 0.0, 0.007), (0.0, 0.0, None)]
    + [(0.0, 0.0, 0.0)] * 2
    + [(0.0, 0.012, None)]
    + [(0.0, 0.0, 0.0)] * 2,
    stop_at_s=0.0,
)
CUT_INTO_A_FULL_QUEUE = Scenario(
    max_batch_size=2,
    max_queue=2,
    max_concurrent=1,
    max_delay_s=0.002,
    predicted_s=0.0,
    predicted_per_row_s=0.001,
    plan=[(0.0, "ok")],
    requests=[(0.0, 0.0, 0.0)] * 2
    + [(0.0, 0.008, 0.001)]
    + [(0.0, 0.0, 0.0)] * 3
    + [(0.0, 0.002, 0.001), (0.0, 0.003, 0.001), (0.0, 0.003, 0.001)],
    stop_at_s=0.001,
)


@PROPERTIES
@given(scenarios())
@example(STOPPED_AS_A_BATCH_IS_CUT)
@example(CUT_INTO_A_FULL_QUEUE)
def test_every_request_answered_once_within_limits_and_deadlines(sc: Scenario) -> None:
    async def main() -> None:
        _, backend, records, loop_errors = await play(sc)
        assert not loop_errors, loop_errors[:3]
        check_outcomes(sc, backend, records)

    run_on_uvloop(main)


@settings(PROPERTIES, max_examples=15)
@given(scenarios())
async def test_properties_hold_on_the_default_asyncio_loop(sc: Scenario) -> None:
    _, backend, records, loop_errors = await play(sc)
    assert not loop_errors, loop_errors[:3]
    check_outcomes(sc, backend, records)


@settings(PROPERTIES, max_examples=30)
@given(scenarios(failures=False, tight=False))
def test_loose_deadlines_healthy_backend_everything_scored(sc: Scenario) -> None:
    """Liveness: nothing is shed but for a full queue."""

    async def main() -> None:
        _, backend, records, loop_errors = await play(sc)
        assert not loop_errors
        check_outcomes(sc, backend, records)
        for i, record in enumerate(records):
            kind, _ = record.outcomes[0]
            assert kind in {"score", "QueueFull"}, (i, record.outcomes)
            # Not full when it arrived: admitted.
            assert (kind == "QueueFull") == (record.queued_before >= sc.max_queue)

    run_on_uvloop(main)


# -- single decisions -------------------------------------------------------------------


def make(
    backend: FakeBackend, *, predicted_s: float = 0.001, max_batch_size: int = 4, **kwargs: object
) -> Batcher:
    options: dict[str, object] = {"max_queue": 8, "n_inputs": K}
    options.update(kwargs)
    return Batcher(
        backend.infer,
        name="unit",
        max_batch_size=max_batch_size,
        latency_model=seeded_model(max_batch_size, predicted_s),
        **options,  # type: ignore[arg-type]
    )


async def test_lone_request_is_dispatched_at_once() -> None:
    backend = FakeBackend([(0.001, "ok")])
    batcher = make(backend)
    await batcher.start()
    submitted = batcher.clock()
    task = asyncio.create_task(batcher.submit(vector(7), submitted + 5))
    await asyncio.sleep(0)  # submit runs up to its await: the decision is taken there
    assert batcher.queued == 0 and batcher.in_flight == 1 and batcher.next_wakeup is None
    assert await task == own_score(7)
    assert backend.calls[0].start - submitted < 0.25  # generous: one loop iteration
    await batcher.stop()


async def test_delay_grows_a_batch_but_a_full_batch_goes_at_once() -> None:
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(backend, max_delay_s=10.0)
    await batcher.start()
    now = batcher.clock()
    tasks = [asyncio.create_task(batcher.submit(vector(i), now + 30)) for i in range(3)]
    await asyncio.sleep(0)
    assert batcher.queued == 3 and batcher.in_flight == 0
    wakeup = batcher.next_wakeup
    assert wakeup is not None and now + 9 < wakeup <= now + 10.001
    tasks.append(asyncio.create_task(batcher.submit(vector(3), now + 30)))
    await asyncio.sleep(0)
    assert batcher.queued == 0 and batcher.in_flight == 1
    assert await asyncio.gather(*tasks) == [own_score(i) for i in range(4)]
    assert [sorted(c.ids) for c in backend.calls] == [[0, 1, 2, 3]]
    await batcher.stop()


async def test_full_queue_means_nothing_more_can_come_so_no_wait() -> None:
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(backend, max_batch_size=8, max_queue=2, max_delay_s=10.0)
    await batcher.start()
    now = batcher.clock()
    tasks = [asyncio.create_task(batcher.submit(vector(i), now + 30)) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.in_flight == 1 and batcher.queued == 0
    await asyncio.gather(*tasks)
    await batcher.stop()


async def test_delay_is_capped_by_the_most_urgent_deadline() -> None:
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(backend, predicted_s=0.05, max_delay_s=10.0, timer_slack_s=0.05)
    await batcher.start()
    now = batcher.clock()
    score = await batcher.submit(vector(1), now + 0.3)
    started = backend.calls[0].start - now
    # Leaves at deadline - predicted(1) - slack = 0.3 - 0.0625 - 0.05; the slack absorbs
    # timer lateness (up to 50 ms here) so the request still makes it.
    assert 0.18 <= started < 0.3
    assert score == own_score(1)
    await batcher.stop()


async def test_queue_full_is_refused_at_once() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, max_batch_size=1, max_queue=2)
    await batcher.start()
    deadline = batcher.clock() + 30
    first = asyncio.create_task(batcher.submit(vector(0), deadline))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert batcher.in_flight == 1 and batcher.queued == 2
    assert not batcher.admits_by(deadline)  # what submit would say, asked ahead
    with pytest.raises(QueueFull):
        await batcher.submit(vector(3), deadline)
    backend.gate.set()
    assert await asyncio.gather(first, *queued) == [own_score(i) for i in range(3)]
    await batcher.stop()


async def test_unreachable_deadline_at_submit() -> None:
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(backend, predicted_s=0.01)
    await batcher.start()
    for budget in (-1.0, 0.0):
        with pytest.raises(DeadlineUnreachable) as caught:
            await batcher.submit(vector(0), batcher.clock() + budget)
        assert caught.value.stage == "submit"
        # What is left and what a call needs, never a negative time.
        assert "-" not in str(caught.value) and "0.012500s 'unit' needs" in str(caught.value)
    assert backend.calls == []
    # Time left, but less than predicted, and nothing measured lately: one goes anyway,
    # to measure the backend (here it is fast: the probe is answered in time; with
    # the seed's 10 ms, the slower of two measurements is not the estimate alone:
    # the next one goes too).
    assert await batcher.submit(vector(1), batcher.clock() + 0.005) == own_score(1)
    assert [c.ids for c in backend.calls] == [[1]]
    assert batcher.latency_model.predict(1) < 0.005
    assert await batcher.submit(vector(2), batcher.clock() + 0.005) == own_score(2)
    await batcher.stop()


async def test_a_probe_that_is_late_leaves_the_next_one_for_the_probe_interval() -> None:
    """A probe answered past its deadline says the backend is still slow: its
    measurement joins the others, and no request goes until PROBE_INTERVAL_S later."""
    backend = FakeBackend([(0.02, "ok")])
    batcher = make(backend, predicted_s=0.01)  # 12.5 ms predicted
    await batcher.start()
    with pytest.raises(DeadlineUnreachable):  # the probe: sent, answered late
        await batcher.submit(vector(1), batcher.clock() + 0.005)
    assert [c.ids for c in backend.calls] == [[1]]
    with pytest.raises(DeadlineUnreachable) as caught:
        await batcher.submit(vector(2), batcher.clock() + 0.005)
    assert caught.value.stage == "submit" and len(backend.calls) == 1
    await batcher.stop()


async def test_busy_slots_count_at_submit() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, predicted_s=0.1, max_batch_size=1)  # predicted(1) = 0.125
    await batcher.start()
    running = asyncio.create_task(batcher.submit(vector(0), batcher.clock() + 30))
    await asyncio.sleep(0)
    # Alone it would fit in 0.2 s, but the slot is predicted busy for 0.125 s first:
    # over capacity, shed at once (RESOURCE_EXHAUSTED), not a deadline fallback.
    with pytest.raises(Overloaded):
        await batcher.submit(vector(1), batcher.clock() + 0.2)
    backend.gate.set()
    await running
    await batcher.stop()


async def test_queued_batches_ahead_count_at_submit() -> None:
    backend = FakeBackend([(0.0, "ok")] * 4)
    backend.gate = asyncio.Event()
    # predicted(n) = 0.125 for every n (0.1 x the model's margin); batches of 2, one slot.
    batcher = make(backend, predicted_s=0.1, max_batch_size=2)
    await batcher.start()
    first = asyncio.create_task(batcher.submit(vector(0), batcher.clock() + 30))
    await asyncio.sleep(0)  # running, predicted busy ~0.125 s
    queued = [asyncio.create_task(batcher.submit(vector(i), batcher.clock() + 30)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert batcher.queued == 2
    # Busy slot (0.125) + one full batch ahead (0.125) + itself (0.125) = 0.375 s.
    now = batcher.clock()
    assert not batcher.admits_by(now + 0.35) and batcher.admits_by(now + 0.45)
    with pytest.raises(Overloaded):
        await batcher.submit(vector(3), batcher.clock() + 0.35)
    late = asyncio.create_task(batcher.submit(vector(4), batcher.clock() + 0.45))
    await asyncio.sleep(0)
    assert batcher.queued == 3  # admitted
    backend.gate.set()
    assert await asyncio.gather(first, *queued, late) == [own_score(i) for i in (0, 1, 2, 4)]
    await batcher.stop()


async def test_admitted_by_a_time_before_its_deadline_it_leaves_the_rest_of_the_queue() -> None:
    """``admit_by``: taken only if the work ahead ends it by then; once taken, it is
    held to its own deadline (a ScoreStream's message leaves room for other callers)."""
    backend = FakeBackend([(0.0, "ok")] * 2)
    backend.gate = asyncio.Event()
    batcher = make(backend, predicted_s=0.1, max_batch_size=1)  # predicted(1) = 0.125
    await batcher.start()
    running = asyncio.create_task(batcher.submit(vector(0), batcher.clock() + 30))
    await asyncio.sleep(0)  # the slot is predicted busy for 0.125 s, then 0.125 s more
    now = batcher.clock()
    with pytest.raises(Overloaded):  # by its deadline it fits, by admit_by it does not
        await batcher.submit(vector(1), now + 1.0, None, now + 0.2)
    taken = asyncio.create_task(batcher.submit(vector(2), now + 1.0, None, now + 0.3))
    await asyncio.sleep(0)
    assert batcher.queued == 1
    backend.gate.set()
    assert await asyncio.gather(running, taken) == [own_score(0), own_score(2)]
    await batcher.stop()


async def test_queued_request_expires_when_it_can_no_longer_make_it() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, max_batch_size=1)
    await batcher.start()
    now = batcher.clock()
    running = asyncio.create_task(batcher.submit(vector(0), now + 30))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineUnreachable) as caught:
        await batcher.submit(vector(1), now + 0.05)
    assert caught.value.stage == "queue"
    # Behind a call running far past its predicted 1 ms: the backend's failure (a
    # hung one must open the breaker, whose callers all expire queued).
    assert caught.value.overdue
    assert batcher.clock() - now < 1.0  # answered at its deadline, not when the slot freed
    assert batcher.queued == 0
    backend.gate.set()
    await running
    assert [c.ids for c in backend.calls] == [[0]]
    await batcher.stop()


async def test_slow_backend_answers_at_the_deadline_and_discards_the_late_score() -> None:
    late = REGISTRY.get_sample_value("streamscore_batch_late_results_total", {"model": "unit"})
    backend = FakeBackend([(0.5, "ok")])
    batcher = make(backend)
    await batcher.start()
    now = batcher.clock()
    with pytest.raises(DeadlineUnreachable) as caught:
        await batcher.submit(vector(0), now + 0.05)
    assert caught.value.stage == "in_flight"
    assert caught.value.overdue  # far past its predicted 1 ms: counts against the backend
    assert batcher.clock() - now < 0.4  # before the backend returned
    while batcher.in_flight:  # noqa: ASYNC110 (the batch ends, late: no event says so)
        await asyncio.sleep(0.01)
    after = REGISTRY.get_sample_value("streamscore_batch_late_results_total", {"model": "unit"})
    assert after == (late or 0.0) + 1
    await batcher.stop()


async def test_earliest_deadline_goes_first() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, max_batch_size=1)
    await batcher.start()
    now = batcher.clock()
    tasks = [asyncio.create_task(batcher.submit(vector(0), now + 30))]
    await asyncio.sleep(0)
    tasks += [
        asyncio.create_task(batcher.submit(vector(1), now + 20)),
        asyncio.create_task(batcher.submit(vector(2), now + 10)),
    ]
    await asyncio.sleep(0)
    backend.gate.set()
    await asyncio.gather(*tasks)
    assert [c.ids for c in backend.calls] == [[0], [2], [1]]
    await batcher.stop()


@pytest.mark.parametrize("inline", [False, True])
async def test_a_batch_is_sized_to_its_most_urgent_request(inline: bool) -> None:
    """A batch that would make its most urgent request miss runs smaller instead (the
    others wait for the next batch): shedding the urgent request to keep the batch
    whole would refuse a request that could be served."""
    backend = FakeBackend([(0.0, "ok")])
    # 126 ms for one, 251 for two, 376 for three, 501 for four (1.25 margin).
    batcher = Batcher(
        backend.infer,
        name="unit",
        max_batch_size=4,
        max_queue=8,
        n_inputs=K,
        latency_model=seeded_model(4, 0.001, per_row_s=0.1),
        infer_inline=backend.infer_inline if inline else None,
    )
    await batcher.start()
    now = batcher.clock()
    if not inline:  # a running batch, so that the next four queue together
        backend.gate = asyncio.Event()
        first = asyncio.create_task(batcher.submit(vector(9), now + 30))
        await asyncio.sleep(0)
    # Room for a batch of two by the urgent one's deadline, not for three.
    relaxed = [asyncio.create_task(batcher.submit(vector(i), now + 30)) for i in range(3)]
    urgent = asyncio.create_task(batcher.submit(vector(3), now + 0.3))
    await asyncio.sleep(0)
    assert batcher.queued == 4
    if not inline:
        assert backend.gate is not None
        backend.gate.set()
        assert await first == own_score(9)
    assert await urgent == own_score(3)
    assert await asyncio.gather(*relaxed) == [own_score(i) for i in range(3)]
    calls = [c.ids for c in backend.calls if c.ids != [9]]
    assert calls == [[3, 0], [1, 2]]
    await batcher.stop()


async def test_cancelled_callers_leave_before_the_model_call() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend)
    await batcher.start()
    deadline = batcher.clock() + 30
    first = asyncio.create_task(batcher.submit(vector(0), deadline))
    await asyncio.sleep(0)
    gone, kept = (asyncio.create_task(batcher.submit(vector(i), deadline)) for i in (1, 2))
    await asyncio.sleep(0)
    assert batcher.queued == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert batcher.queued == 1
    backend.gate.set()
    assert await first == own_score(0) and await kept == own_score(2)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert [c.ids for c in backend.calls] == [[0], [2]]
    await batcher.stop()


@pytest.mark.parametrize("mode", ["fail", "short", "long"])
async def test_backend_failure_fails_the_whole_batch(mode: str) -> None:
    backend = FakeBackend([(0.0, mode), (0.0, "ok")])
    batcher = make(backend, max_delay_s=10.0)
    await batcher.start()
    deadline = batcher.clock() + 30
    tasks = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in range(4)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BackendFailed) for r in results), results
    assert isinstance(results[0], BackendFailed)
    cause = results[0].__cause__
    assert isinstance(cause, RuntimeError if mode == "fail" else ValueError)
    # Still serving: the next (full) batch is fine.
    again = await asyncio.gather(*(batcher.submit(vector(i), deadline) for i in range(4, 8)))
    assert again == [own_score(i) for i in range(4, 8)]
    await batcher.stop()


async def test_stop_answers_the_queue_and_finishes_running_batches() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, max_batch_size=1)
    await batcher.start()
    deadline = batcher.clock() + 30
    running = asyncio.create_task(batcher.submit(vector(0), deadline))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in (1, 2)]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    for task in queued:
        with pytest.raises(BatcherStopped):
            await task
    assert not stopping.done()  # waits for the running batch
    backend.gate.set()
    assert await running == own_score(0)
    await stopping
    with pytest.raises(BatcherStopped):
        await batcher.submit(vector(3), deadline)
    await batcher.stop()  # twice is fine


async def test_a_call_started_eagerly_and_cancelled_at_once_leaves_the_queue() -> None:
    """ScoreStream starts each message's Score eagerly and cancels those it read ahead
    when the stream ends: one cancelled before its task ever ran stayed queued (its
    ``except CancelledError`` never ran) and was scored for nobody."""
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, max_batch_size=1)
    await batcher.start()
    deadline = batcher.clock() + 30
    first = asyncio.create_task(batcher.submit(vector(0), deadline))
    await asyncio.sleep(0)
    gone = start_eagerly(batcher.submit(vector(1), deadline))
    assert batcher.queued == 1
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queued == 0
    backend.gate.set()
    assert await first == own_score(0)
    assert [c.ids for c in backend.calls] == [[0]]
    await batcher.stop()


async def test_stop_timeout_abandons_a_hung_batch() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()  # never set
    batcher = make(backend)
    await batcher.start()
    running = asyncio.create_task(batcher.submit(vector(0), batcher.clock() + 30))
    await asyncio.sleep(0)
    await batcher.stop(timeout=0.01)
    with pytest.raises(BatcherStopped):
        await running


async def test_not_started_and_bad_vectors() -> None:
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(backend)
    with pytest.raises(BatcherStopped):
        await batcher.submit(vector(0), batcher.clock() + 1)
    await batcher.start()
    with pytest.raises(ValueError):
        await batcher.submit(np.zeros(K + 1, dtype=np.float32), batcher.clock() + 1)
    await batcher.stop()
    # Without n_inputs the first vector sets it.
    learning = Batcher(backend.infer, name="unit", max_batch_size=2, max_queue=2)
    await learning.start()
    with pytest.raises(ValueError):
        await learning.submit(np.zeros((1, K), dtype=np.float32), learning.clock() + 1)
    assert await learning.submit(vector(5), learning.clock() + 1) == own_score(5)
    assert learning.n_inputs == K
    with pytest.raises(ValueError):
        await learning.submit(np.zeros(K - 1, dtype=np.float32), learning.clock() + 1)
    await learning.stop()


async def test_a_batch_of_one_is_a_float32_copy_of_its_vector() -> None:
    seen: list[np.ndarray] = []

    async def infer(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        return np.full(len(batch), 0.5, dtype=np.float32)

    batcher = Batcher(infer, name="unit", max_batch_size=4, max_queue=4, n_inputs=K)
    await batcher.start()
    submitted = np.array([1.0, 2.0, 3.0])  # float64: the batch converts it
    assert await batcher.submit(submitted, batcher.clock() + 5) == 0.5
    (batch,) = seen
    assert batch.shape == (1, K) and batch.dtype == np.float32 and batch.flags.c_contiguous
    assert batch.tolist() == [[1.0, 2.0, 3.0]] and not np.shares_memory(batch, submitted)
    await batcher.stop()


async def test_inline_backend_batches_the_requests_of_one_loop_turn() -> None:
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(backend, max_batch_size=4, infer_inline=backend.infer_inline)
    await batcher.start()
    deadline = batcher.clock() + 5
    tasks = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in range(6)]
    await asyncio.sleep(0)  # every submit ran up to its await, in this one turn
    # Nothing ran yet: the batch waits for the next turn, so the six share batches.
    assert batcher.queued == 6 and batcher.dispatch_pending and not backend.calls
    assert await asyncio.gather(*tasks) == [own_score(i) for i in range(6)]
    assert [c.ids for c in backend.calls] == [[0, 1, 2, 3], [4, 5]]
    # Inline: no task, so nothing is ever "in flight" between loop turns.
    assert batcher.in_flight == 0 and not batcher.dispatch_pending
    await batcher.stop()


async def test_cheap_inline_backend_answers_in_the_submit_without_a_loop_turn() -> None:
    backend = FakeBackend([(0.0, "ok")])
    # Cheap next to the bar: a fake's call of one takes ~0.1 ms, loaded CI more.
    batcher = make(backend, max_batch_size=4, infer_inline=backend.infer_inline, defer_min_s=0.05)
    await batcher.start()
    deadline = batcher.clock() + 5
    assert batcher.holds_for_a_batch  # cost unknown: hold, as for a costly model
    assert await batcher.submit(vector(0), deadline) == own_score(0)
    assert batcher.single_call_s < 0.05 and not batcher.holds_for_a_batch
    turned: list[bool] = []
    asyncio.get_running_loop().call_soon(turned.append, True)
    assert await batcher.submit(vector(1), deadline) == own_score(1)
    assert not turned  # answered without giving up the loop
    # Concurrent callers each run alone: holding them would cost more than it saves.
    tasks = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in range(2, 6)]
    assert await asyncio.gather(*tasks) == [own_score(i) for i in range(2, 6)]
    assert [c.ids for c in backend.calls] == [[i] for i in range(6)]
    await batcher.stop()


async def test_calls_alone_feed_the_latency_model_one_in_so_many() -> None:
    """A call alone is measured every time (the backend histogram, the hold rule's
    cost), and is the latency model's sample one time in ``ALONE_SAMPLE_EVERY``."""
    backend = FakeBackend([(0.0, "ok")])
    batcher = make(
        backend,
        max_batch_size=4,
        infer_inline=backend.infer_inline,
        score_row_inline=backend.score_row_inline,
        defer_min_s=0.05,
    )
    batcher.single_call_s = 0.0  # measured cheap: every submit runs alone
    samples: list[tuple[int, float]] = []
    observe = batcher.latency_model.observe

    def spy(n: int, seconds: float) -> None:
        samples.append((n, seconds))
        observe(n, seconds)

    batcher.latency_model.observe = spy  # type: ignore[method-assign]
    await batcher.start()
    calls = 4 * ALONE_SAMPLE_EVERY
    before = REGISTRY.get_sample_value("streamscore_backend_seconds_count", {"model": "unit"}) or 0
    for i in range(calls):
        assert await batcher.submit(tuple(vector(i).tolist()), batcher.clock() + 5) == own_score(i)
    after = REGISTRY.get_sample_value("streamscore_backend_seconds_count", {"model": "unit"})
    assert backend.row_calls == calls and after == before + calls
    assert len(samples) == 4 and all(n == 1 and s >= 0 for n, s in samples)
    assert 0 < batcher.single_call_s < 0.05
    await batcher.stop()


async def test_warm_up_measures_a_call_of_one_for_the_hold_rule() -> None:
    rows = np.stack([vector(i) for i in range(4)])
    cheap = FakeBackend([(0.0, "ok")])
    batcher = make(cheap, max_batch_size=4, infer_inline=cheap.infer_inline, defer_min_s=0.05)
    assert batcher.holds_for_a_batch  # unknown
    await batcher.warm_up(rows, sizes=[1, 2, 4])
    assert batcher.single_call_s < 0.05 and not batcher.holds_for_a_batch
    costly = FakeBackend([(20 * DEFER_MIN_S, "ok")])
    batcher = make(costly, max_batch_size=4, infer_inline=costly.infer_inline)
    await batcher.warm_up(rows, sizes=[1, 2, 4])
    assert batcher.single_call_s >= DEFER_MIN_S and batcher.holds_for_a_batch
    # Without a size-1 warm-up batch nothing is known: hold, as before.
    unknown = make(cheap, max_batch_size=4, infer_inline=cheap.infer_inline, defer_min_s=0.05)
    await unknown.warm_up(rows, sizes=[4])
    assert unknown.holds_for_a_batch


BATCHER_SERIES = (
    ("streamscore_batch_size_count", {}),
    ("streamscore_batch_size_sum", {}),
    ("streamscore_batch_queue_wait_seconds_count", {}),
    ("streamscore_backend_seconds_count", {}),
    ("streamscore_batch_late_results_total", {}),
    ("streamscore_backend_failures_total", {"kind": "error"}),
    ("streamscore_backend_failures_total", {"kind": "wrong_count"}),
    ("streamscore_batch_shed_requests_total", {"reason": "backend_failed"}),
    ("streamscore_batch_shed_requests_total", {"reason": "deadline_in_flight"}),
)


@pytest.mark.parametrize("rows", [False, True], ids=["arrays", "rows"])
@pytest.mark.parametrize("mode", ["ok", "fail", "short", "long", "late"])
async def test_a_call_alone_answers_like_the_queued_path(mode: str, rows: bool) -> None:
    """An idle batcher runs a cheap inline call of one without its queue (no request
    record, future or heap entry); the caller sees the same score or error, and the
    same series move, as when the request goes through the queue (a batcher that
    holds for a batch: there the call runs on the next loop turn). ``rows``: the
    vector is a tuple of floats and the backend scores a row as it is
    (``score_row_inline``): a call alone goes that way, unless the backend declines
    it, and a queued one makes its batch of the tuple."""

    def series(name: str) -> list[float]:
        return [
            REGISTRY.get_sample_value(metric, {"model": name, **labels}) or 0.0
            for metric, labels in BATCHER_SERIES
        ]

    async def outcome(name: str, alone: bool) -> tuple[object, list[float], bool]:
        # "late": the call blocks the loop 30 ms against a 10 ms budget.
        backend = FakeBackend([(0.03, "ok")] if mode == "late" else [(0.0, mode)])
        batcher = Batcher(
            backend.infer,
            name=name,
            max_batch_size=4,
            max_queue=8,
            n_inputs=K,
            latency_model=seeded_model(4, 0.001),
            infer_inline=backend.infer_inline,
            score_row_inline=backend.score_row_inline if rows else None,
            defer_min_s=1.0 if alone else 0.0,
        )
        batcher.single_call_s = 0.0  # measured cheap: holds only where the bar is 0
        assert batcher.holds_for_a_batch is not alone
        await batcher.start()
        before = series(name)
        turned: list[bool] = []
        asyncio.get_running_loop().call_soon(turned.append, True)
        budget = 0.01 if mode == "late" else 5.0
        submitted = tuple(vector(7).tolist()) if rows else vector(7)
        try:
            result: object = await batcher.submit(submitted, batcher.clock() + budget)
        except BatcherError as error:
            cause = error.__cause__
            result = (type(error).__name__, getattr(error, "stage", None), type(cause).__name__)
        moved = [a - b for a, b in zip(series(name), before, strict=True)]
        assert [c.ids for c in backend.calls] == [[7]]
        row_path = rows and alone and mode in ("ok", "fail", "late")
        assert backend.row_calls == (1 if row_path else 0)
        await batcher.stop()
        return result, moved, bool(turned)

    tag = f"{mode}-{'rows' if rows else 'arrays'}"
    alone, alone_moved, alone_turned = await outcome(f"alone-{tag}", alone=True)
    queued, queued_moved, queued_turned = await outcome(f"queued-{tag}", alone=False)
    assert alone == queued and alone_moved == queued_moved
    assert not alone_turned and queued_turned  # alone: answered without a loop turn
    expected = {
        "ok": own_score(7),
        "fail": ("BackendFailed", None, "RuntimeError"),
        "short": ("BackendFailed", None, "ValueError"),
        "long": ("BackendFailed", None, "ValueError"),
        "late": ("DeadlineUnreachable", "in_flight", "NoneType"),
    }
    assert alone == expected[mode]
    assert alone_moved[:4] == [1, 1, 1, 1]  # one batch of one, one wait, one call


async def test_costly_inline_backend_holds_a_loop_turn_to_batch() -> None:
    # Computes on the loop 2 ms a call: far over the bar, even with CI's preemptions.
    backend = FakeBackend([(20 * DEFER_MIN_S, "ok")])
    batcher = make(backend, max_batch_size=4, infer_inline=backend.infer_inline)
    await batcher.start()
    deadline = batcher.clock() + 5
    assert await batcher.submit(vector(0), deadline) == own_score(0)
    assert batcher.single_call_s >= DEFER_MIN_S and batcher.holds_for_a_batch
    tasks = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in range(1, 7)]
    assert await asyncio.gather(*tasks) == [own_score(i) for i in range(1, 7)]
    assert [c.ids for c in backend.calls] == [[0], [1, 2, 3, 4], [5, 6]]
    await batcher.stop()


async def test_an_inline_call_that_blocks_the_loop_without_computing_holds_too() -> None:
    """The hold rule times a call of one by the batcher's clock: a backend call that
    blocks the loop 2 ms waiting (a sleep, not computation) costs what one computing
    2 ms costs, so co-arriving requests are held to share a batch."""
    backend = FakeBackend([(0.0, "ok")])

    def blocking_infer_inline(batch: np.ndarray) -> np.ndarray | None:
        time.sleep(20 * DEFER_MIN_S)
        return backend.infer_inline(batch)

    batcher = make(backend, max_batch_size=4, infer_inline=blocking_infer_inline)
    await batcher.start()
    deadline = batcher.clock() + 5
    assert await batcher.submit(vector(0), deadline) == own_score(0)
    assert batcher.single_call_s >= DEFER_MIN_S and batcher.holds_for_a_batch
    tasks = [asyncio.create_task(batcher.submit(vector(i), deadline)) for i in range(1, 7)]
    assert await asyncio.gather(*tasks) == [own_score(i) for i in range(1, 7)]
    assert [c.ids for c in backend.calls] == [[0], [1, 2, 3, 4], [5, 6]]
    await batcher.stop()


async def test_without_batching_an_inline_call_never_waits_for_a_turn() -> None:
    backend = FakeBackend([(3 * DEFER_MIN_S, "ok")])  # costly, but batches are of one
    batcher = make(backend, max_batch_size=1, infer_inline=backend.infer_inline)
    await batcher.start()
    assert not batcher.holds_for_a_batch
    turned: list[bool] = []
    asyncio.get_running_loop().call_soon(turned.append, True)
    assert await batcher.submit(vector(0), batcher.clock() + 5) == own_score(0)
    assert not turned and [c.ids for c in backend.calls] == [[0]]
    await batcher.stop()


async def test_inline_backend_that_declines_runs_its_batch_in_a_task_once() -> None:
    def count() -> float:
        labels = {"model": "declines"}
        return REGISTRY.get_sample_value("streamscore_batch_size_count", labels) or 0.0

    backend = FakeBackend([(0.0, "defer")])
    before = count()
    batcher = Batcher(
        backend.infer,
        name="declines",
        max_batch_size=4,
        max_queue=8,
        infer_inline=backend.infer_inline,
        latency_model=seeded_model(4, 0.001),
    )
    await batcher.start()
    deadline = batcher.clock() + 5
    scores = await asyncio.gather(*(batcher.submit(vector(i), deadline) for i in range(3)))
    assert scores == [own_score(i) for i in range(3)]
    assert [c.ids for c in backend.calls] == [[0, 1, 2]]  # by infer, after the decline
    assert count() - before == 1  # admitted once, not again by the task
    await batcher.stop()


async def test_inline_score_after_the_deadline_is_refused() -> None:
    backend = FakeBackend([(0.03, "ok")])  # blocks the loop 30 ms; predicted 1 ms
    batcher = make(backend, infer_inline=backend.infer_inline)
    await batcher.start()
    with pytest.raises(DeadlineUnreachable) as caught:
        await batcher.submit(vector(1), batcher.clock() + 0.01)
    assert caught.value.stage == "in_flight" and caught.value.overdue
    assert len(backend.calls) == 1  # it ran: the late score was discarded
    await batcher.stop()


async def test_a_request_expiring_behind_a_call_within_its_time_is_not_overdue() -> None:
    backend = FakeBackend([(0.0, "ok")])
    backend.gate = asyncio.Event()
    batcher = make(backend, predicted_s=0.5, max_batch_size=1)  # a slow, healthy backend
    await batcher.start()
    now = batcher.clock()
    running = asyncio.create_task(batcher.submit(vector(0), now + 30))
    await asyncio.sleep(0)
    one = batcher.latency_model.predict(1)
    with pytest.raises(DeadlineUnreachable) as caught:
        # Admitted behind the running call, then expires queued (at about ``one``
        # from now) while that call is still within twice its predicted time.
        await batcher.submit(vector(1), now + 2 * one + 0.05)
    assert (caught.value.stage, caught.value.overdue) == ("queue", False)
    backend.gate.set()
    await running
    await batcher.stop()


@pytest.mark.parametrize("inline", [False, True])
async def test_a_tight_deadline_missed_in_flight_is_not_the_backends_failure(
    inline: bool,
) -> None:
    """A call that runs a little past its predicted time, and past a caller's deadline
    set just beyond that prediction, is a tight deadline on a busy CPU, not a failing
    backend: not overdue, so it does not count towards opening the breaker (callers
    with 2-6 ms deadlines opened a healthy Triton's breaker for everyone)."""
    backend = FakeBackend([(0.03, "ok")])
    options = {"infer_inline": backend.infer_inline} if inline else {}
    batcher = make(backend, predicted_s=0.02, **options)
    await batcher.start()
    predicted = batcher.latency_model.predict(1)
    with pytest.raises(DeadlineUnreachable) as caught:
        await batcher.submit(vector(1), batcher.clock() + predicted + 0.002)
    assert caught.value.stage == "in_flight" and not caught.value.overdue
    await batcher.stop()


async def test_metrics_are_recorded() -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "metrics", **labels}) or 0.0

    before = (
        value("streamscore_batch_size_count"),
        value("streamscore_batch_size_sum"),
        value("streamscore_batch_queue_wait_seconds_count"),
        value("streamscore_backend_seconds_count"),
        value("streamscore_batch_shed_requests_total", reason="deadline_submit"),
    )
    backend = FakeBackend([(0.0, "ok")])
    batcher = Batcher(backend.infer, name="metrics", max_batch_size=4, max_queue=8, max_delay_s=1)
    await batcher.start()
    deadline = batcher.clock() + 30
    await asyncio.gather(*(batcher.submit(vector(i), deadline) for i in range(4)))
    with pytest.raises(DeadlineUnreachable):
        await batcher.submit(vector(0), batcher.clock() - 1)
    after = (
        value("streamscore_batch_size_count"),
        value("streamscore_batch_size_sum"),
        value("streamscore_batch_queue_wait_seconds_count"),
        value("streamscore_backend_seconds_count"),
        value("streamscore_batch_shed_requests_total", reason="deadline_submit"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 4, 4, 1, 1]
    await batcher.stop()


def model_series(model: str) -> list[str]:
    return [
        sample.name
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("model") == model
    ]


async def test_a_versions_series_leave_with_its_last_batcher() -> None:
    """Every model version ever loaded kept its ~84 series on /metrics until a restart
    (an hourly retrain: ~2,000 more a day). A hot reload of one version runs two
    batchers of its name for a moment: the series stay while either runs."""
    old, new = (
        Batcher(
            FakeBackend([(0.0, "ok")] * 2).infer, name="reloaded:1", max_batch_size=4, max_queue=8
        )
        for _ in range(2)
    )
    for batcher in (old, new):
        await batcher.start()
        await batcher.submit(vector(0), batcher.clock() + 30)
    series = model_series("reloaded:1")
    assert len(series) > 40 and "streamscore_batch_shed_requests_total" in series, series
    await old.stop()
    assert model_series("reloaded:1") == series
    await new.stop()
    await new.stop()  # twice: nothing more to release
    assert model_series("reloaded:1") == []
    # Loaded again later: counted afresh.
    again = Batcher(
        FakeBackend([(0.0, "ok")]).infer, name="reloaded:1", max_batch_size=4, max_queue=8
    )
    await again.start()
    await again.submit(vector(0), again.clock() + 30)
    value = REGISTRY.get_sample_value("streamscore_batch_size_count", {"model": "reloaded:1"})
    assert value == 1
    await again.stop()


# -- latency model ------------------------------------------------------------------------


def test_latency_model_default_before_observations() -> None:
    model = LatencyModel(16, default_s=0.002, margin=1.5, extra_s=0.001)
    assert model.predict(1) == model.predict(16) == pytest.approx(0.004)
    assert model.measured() == {}


def test_latency_model_interpolates_between_measured_buckets() -> None:
    model = LatencyModel(16, margin=1.0)
    model.seed(1, 0.001)
    model.seed(8, 0.008)
    assert model.measured() == {1: 0.001, 8: 0.008}
    assert model.predict(1) == pytest.approx(0.001)
    assert model.predict(2) == pytest.approx(0.002)
    assert model.predict(4) == pytest.approx(0.004)
    assert model.predict(8) == pytest.approx(0.008)
    assert model.predict(16) == pytest.approx(0.008)  # above every measurement: flat
    model = LatencyModel(16, margin=2.0, extra_s=0.5)
    model.seed(4, 0.01)
    assert model.predict(1) == pytest.approx(0.52)  # below every measurement: the smallest


def test_latency_model_uses_a_high_quantile_of_a_recent_window() -> None:
    model = LatencyModel(4, window=20, quantile=0.95, margin=1.0)
    for _ in range(19):
        model.observe(1, 0.001)
    model.observe(1, 0.1)  # one outlier in 20 is above the 95th percentile
    assert model.predict(1) == pytest.approx(0.001)
    model.observe(1, 0.1)  # two are not
    assert model.predict(1) == pytest.approx(0.1)
    small = LatencyModel(4, window=3, quantile=1.0, margin=1.0)
    for seconds in (0.5, 0.001, 0.002, 0.003):
        small.observe(2, seconds)
    assert small.predict(2) == pytest.approx(0.003)  # the 0.5 left the window


@settings(max_examples=200, deadline=None, derandomize=not EXPLORE, database=None)
@given(
    st.integers(1, 300),
    st.lists(st.tuples(st.integers(1, 300), st.floats(0, 1)), max_size=30),
)
def test_latency_model_predictions_never_decrease_with_size(
    max_batch_size: int, observations: list[tuple[int, float]]
) -> None:
    model = LatencyModel(max_batch_size)
    for size, seconds in observations:
        model.observe(min(size, max_batch_size), seconds)
    predictions = [model.predict(n) for n in range(1, max_batch_size + 1)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(predictions))
    assert all(p >= 0 for p in predictions)


async def test_warm_up_seeds_every_size() -> None:
    sizes: list[int] = []

    async def infer(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch[:, 0]

    model = LatencyModel(5)
    predicted = await warm_up(infer, np.ones((2, K), dtype=np.float32), model, repeats=2)
    assert warm_up_sizes(5) == [1, 2, 4, 5]
    assert sorted(predicted) == [1, 2, 4, 5]
    assert sizes == [1, 1, 1, 2, 2, 2, 4, 4, 4, 5, 5, 5]  # one untimed call, then timed
    assert sorted(model.measured()) == [1, 2, 4]

    async def wrong(batch: np.ndarray) -> np.ndarray:
        return batch[:-1, 0]

    with pytest.raises(BackendFailed):
        await warm_up(wrong, np.ones(K, dtype=np.float32), LatencyModel(2))


async def test_one_slow_call_does_not_refuse_requests_forever() -> None:
    # A cold start measured one 10 ms call; the budget is 5 ms. Without expiry the
    # model would refuse every request and so never measure the backend again.
    backend = FakeBackend([(0.0, "ok")] * 4)
    model = LatencyModel(1, max_age_s=0.05)
    model.observe(1, 0.010)
    batcher = Batcher(
        backend.infer, name="unit", max_batch_size=1, max_queue=8, latency_model=model, n_inputs=K
    )
    await batcher.start()
    # Nothing measured lately: the first goes anyway, a probe, answered in time (the
    # fake is fast): measured again, fast, the slow call is no longer the estimate
    # alone, and the next goes too.
    assert await batcher.submit(vector(0), batcher.clock() + 0.005) == own_score(0)
    assert model.predict(1) < 0.005
    assert await batcher.submit(vector(1), batcher.clock() + 0.005) == own_score(1)
    await batcher.stop()


def clocked_batcher(
    now: list[float], model: LatencyModel, max_batch_size: int
) -> tuple[Batcher, FakeBackend]:
    """A batcher, its fake backend and its model on a clock moved by hand (``now``)."""

    def clock() -> float:
        return now[0]

    backend = FakeBackend([(0.0, "ok")], clock=clock)
    batcher = Batcher(
        backend.infer,
        name="unit",
        max_batch_size=max_batch_size,
        max_queue=64,
        latency_model=model,
        n_inputs=K,
        clock=clock,
    )
    return batcher, backend


async def calls_ended(backend: FakeBackend) -> None:
    """Wait (up to 5 s) until the backend has no call running."""
    for _ in range(500):
        if not backend.in_flight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a backend call is still running after 5 s")


async def test_one_cold_call_among_few_measurements_refuses_nothing() -> None:
    """Audit AR's F4: a version warmed up fast (on rows unlike the ones served), then
    a call as cold as a first call down a path the warm-up never took (audit AR: 396
    ms, then 24-35 ms). It was the high quantile of the few measurements there were:
    every request was refused until a probe or its expiry, and a canary that fit its
    50 ms budget was rolled back on the refusals. One slow call refuses nothing; a
    second one does, where the budget is shorter than it."""
    warm = [(0.0, "ok")] * 4  # one untimed call and three timed, a batch of one
    backend = FakeBackend([*warm, (0.0, "ok"), (0.1, "ok"), (0.0, "ok"), (0.03, "ok")])
    batcher = Batcher(
        backend.infer,
        name="unit",
        max_batch_size=1,
        max_queue=8,
        latency_model=LatencyModel(1),
        n_inputs=K,
    )
    await batcher.warm_up(np.ones((1, K), dtype=np.float32))
    await batcher.start()
    assert await batcher.submit(vector(0), batcher.clock() + 0.05) == own_score(0)
    with pytest.raises(DeadlineUnreachable) as late:  # the cold call: answered late
        await batcher.submit(vector(1), batcher.clock() + 0.05)
    assert late.value.stage != "submit"
    await calls_ended(backend)  # its call went on past the deadline
    assert await batcher.submit(vector(2), batcher.clock() + 0.05) == own_score(2)
    assert await batcher.submit(vector(3), batcher.clock() + 0.05) == own_score(3)  # 30 ms
    # Two calls over 20 ms now: a 20 ms budget is refused at submit.
    with pytest.raises(DeadlineUnreachable) as refused:
        await batcher.submit(vector(4), batcher.clock() + 0.02)
    assert refused.value.stage == "submit"
    assert len(backend.calls) == 8
    await batcher.stop()


async def test_a_backend_slow_on_every_call_is_refused_from_its_second_slow_call() -> None:
    """The other side of the rule above: a version slower than the budget on every
    real input (warm-up fast) costs two late answers, then requests are refused at
    submit (a probe every PROBE_INTERVAL_S measures it again)."""
    backend = FakeBackend([(0.0, "ok")] * 4 + [(0.03, "ok")] * 8)
    batcher = Batcher(
        backend.infer,
        name="unit",
        max_batch_size=1,
        max_queue=8,
        latency_model=LatencyModel(1),
        n_inputs=K,
    )
    await batcher.warm_up(np.ones((1, K), dtype=np.float32))
    await batcher.start()
    stages = []
    for i in range(4):
        with pytest.raises(DeadlineUnreachable) as missed:
            await batcher.submit(vector(i), batcher.clock() + 0.02)
        stages.append(missed.value.stage)
        await calls_ended(backend)
    assert stages[2:] == ["submit", "submit"] and "submit" not in stages[:2], stages
    assert len(backend.calls) == 4 + 2
    await batcher.stop()


async def test_a_slow_warm_up_does_not_refuse_requests_forever() -> None:
    """Every warm-up call slow (a pause at start): the seeds stand in for buckets once
    their observations expire, but not above what a fresh measurement of a smaller
    batch says, scaled linearly, so requests reach the backend again."""
    now = [0.0]
    model = seeded_model(8, 0.300, max_age_s=2.0, clock=lambda: now[0])
    batcher, _ = clocked_batcher(now, model, max_batch_size=8)
    await batcher.start()
    now[0] = 10.0  # the warm-up's measurements are stale: they stand in, nothing fresher
    assert await batcher.submit(vector(0), now[0] + 0.05) == own_score(0)  # a probe
    # Measured: a batch of one is predicted from the probe, the larger ones from it
    # scaled (not from their 300 ms warm-ups).
    tasks = [asyncio.create_task(batcher.submit(vector(i), now[0] + 0.05)) for i in range(8)]
    assert await asyncio.gather(*tasks) == [own_score(i) for i in range(8)]
    assert model.predict(8) < 0.05
    await batcher.stop()


async def test_a_running_batch_is_not_held_to_predictions_since_expired() -> None:
    """A batch dispatched under a stale slow prediction: a request arriving while it
    runs is judged by the latest predictions, not refused as over capacity by the
    old ones (a stream's messages were, with nothing queued)."""
    now = [0.0]
    model = LatencyModel(1, max_age_s=2.0, clock=lambda: now[0])
    model.observe(1, 0.200)  # a pause long ago
    batcher, backend = clocked_batcher(now, model, max_batch_size=1)
    backend.gate = asyncio.Event()
    await batcher.start()
    now[0] = 10.0
    first = asyncio.create_task(batcher.submit(vector(0), now[0] + 30))
    await asyncio.sleep(0)
    assert batcher.in_flight == 1  # dispatched while 200 ms was still predicted
    second = asyncio.create_task(batcher.submit(vector(1), now[0] + 0.05))
    await asyncio.sleep(0)
    backend.gate.set()
    assert await first == own_score(0) and await second == own_score(1)
    await batcher.stop()


def test_expired_buckets_fall_back_to_their_warm_up_measurement() -> None:
    """An expiry (a slow call of one refusing requests) must not leave a large batch
    predicted from small ones: it falls back to what the warm-up measured for it, and
    a batch that cannot make its deadline is not sent."""
    clock = [0.0]
    model = LatencyModel(8, max_age_s=10.0, margin=1.0, clock=lambda: clock[0])
    model.seed(1, 0.010)
    model.seed(8, 0.045)
    clock[0] = 5.0
    model.observe(1, 0.200)  # pauses inside two calls of one
    model.observe(1, 0.200)
    assert model.predict(1) == 0.200
    clock[0] = 20.0
    assert model.expire()
    assert model.predict(1) == 0.010 and model.predict(8) == 0.045
    plain = LatencyModel(8, max_age_s=10.0, margin=1.0, clock=lambda: clock[0])
    plain.observe(8, 0.045)  # not a warm-up measurement: nothing stands in for it
    clock[0] = 40.0
    assert plain.expire() and plain.measured() == {}


def test_a_seed_standing_in_is_capped_by_fresh_smaller_batches() -> None:
    clock = [0.0]
    model = LatencyModel(8, max_age_s=1.0, margin=1.0, clock=lambda: clock[0])
    model.seed(1, 0.300)
    model.seed(8, 0.400)  # a slow warm-up
    clock[0] = 5.0
    assert model.expire()
    assert model.predict(1) == 0.300 and model.predict(8) == 0.400  # nothing fresher
    model.observe(1, 0.002)  # measured lately: fast
    assert model.predict(1) == 0.002
    assert model.predict(8) == pytest.approx(0.016)  # 8 x the fresh batch of one


def test_expire_drops_only_old_observations() -> None:
    clock = [0.0]
    model = LatencyModel(4, max_age_s=10.0, margin=1.0, clock=lambda: clock[0])
    model.observe(1, 0.5)
    model.observe(1, 0.5)  # (one slow call alone would not be the estimate)
    clock[0] = 8.0
    model.observe(1, 0.001)
    model.observe(4, 0.002)
    assert model.predict(1) == 0.5 and not model.expire()
    clock[0] = 10.5
    assert model.expire() and model.predict(1) == 0.001 and model.predict(4) == 0.002
    clock[0] = 30.0
    assert model.expire() and model.measured() == {}

"""A ScoreStream's pacing of its read-ahead (``ScoringService._score_paced``), as pure
logic: ``score`` stands in for the batcher, shedding or admitting as a test scripts it.
The same behaviour against a real server and a slow model is in test_overload.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streamscore.server.errors import DeadlineUnreachable, InvalidRequest, Overloaded
from streamscore.server.scoring import STREAM_QUEUE_SHARE, ScoringService, _ReadAhead

CONTEXT = SimpleNamespace(time_remaining=lambda: None)


class Backend:
    """``score`` as the stream sees it: each call asks ``decide`` (the request, the
    number of this stream's calls admitted and not ended), then sheds, or waits for
    the test to end the call (``end``)."""

    def __init__(self, decide: Callable[[str, int], bool]) -> None:
        self.decide = decide
        self.tries: list[str] = []
        self.admitted: dict[str, asyncio.Future[bytes]] = {}
        self.most_admitted = 0
        # each try's wait since the read (ns) and share of the model's queue
        self.waits: list[int] = []
        self.shares: list[float] = []

    async def score(
        self,
        request: str,
        *_: Any,
        validated: bool,
        waited_ns: int,
        queue_share: float,
    ) -> bytes:
        self.tries.append(request)
        self.waits.append(waited_ns)
        self.shares.append(queue_share)
        if not self.decide(request, len(self.admitted)):
            raise Overloaded(f"over capacity ({request})")
        done = asyncio.get_running_loop().create_future()
        self.admitted[request] = done
        self.most_admitted = max(self.most_admitted, len(self.admitted))
        try:
            return await done
        finally:
            del self.admitted[request]

    def end(self, request: str) -> None:
        self.admitted[request].set_result(request.encode())

    def fail(self, request: str, error: Exception) -> None:
        self.admitted[request].set_exception(error)


def paced(
    backend: Backend,
    ahead: _ReadAhead,
    request: str,
    first_try: asyncio.Future[bytes] | None = None,
    read_at: float | None = None,
) -> asyncio.Task[bytes]:
    """A message read ahead (at ``read_at``, on ``time.perf_counter``: now by
    default), its Score started, as the service does."""
    service: Any = SimpleNamespace(score=backend.score)
    task = asyncio.ensure_future(
        ScoringService._score_paced(
            service,
            request,  # type: ignore[arg-type]
            CONTEXT,
            None,
            ahead,
            time.perf_counter() if read_at is None else read_at,
            first_try=first_try,
        )
    )
    ahead.add((request, 0.0, task))  # type: ignore[arg-type]
    return task


_FIRSTS: list[asyncio.Task[bytes]] = []  # (referenced while they run)


def stretch(backend: Backend, first_try: asyncio.Future[bytes]) -> _ReadAhead:
    """A stretch read ahead, whose first message's Score (``first_try``) began before
    it, in turn."""
    ahead = _ReadAhead()
    _FIRSTS.append(paced(backend, ahead, "first", first_try=first_try))
    return ahead


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_shed_with_none_of_its_own_being_scored_the_message_ends_the_stream() -> None:
    answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    answered.set_result(b"first")
    backend = Backend(lambda request, admitted: False)
    task = paced(backend, stretch(backend, answered), "m1")
    await asyncio.wait((task,), timeout=1)
    assert isinstance(task.exception(), Overloaded)
    assert backend.tries == ["m1"]


async def test_shed_while_its_own_are_scored_a_message_tries_again_when_one_ends() -> None:
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    backend = Backend(lambda request, admitted: first.done())  # shed while it is in
    ahead = stretch(backend, first)
    task = paced(backend, ahead, "m1")
    await turns()
    assert backend.tries == ["m1"] and not task.done()  # waits: the first is being scored
    first.set_result(b"first")
    await turns()
    assert backend.tries == ["m1", "m1"]
    backend.end("m1")
    assert await task == b"m1"


async def test_a_try_beside_its_own_takes_a_share_of_the_queue_its_timings_from_the_read() -> None:
    """Audit AX: a stream sent faster than the model took the whole queue (its retries
    took every room its own Scores left; unary calls at a tenth of capacity were
    refused), and an answer's timings left out its waits before its last try (answers
    came 2-3x the budget after their read, with a total_us under the budget)."""
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    backend = Backend(lambda request, admitted: first.done())  # shed while it is in
    ahead = stretch(backend, first)
    task = paced(backend, ahead, "m1", read_at=time.perf_counter())
    await turns()
    await asyncio.sleep(0.05)
    first.set_result(b"first")
    await turns()
    backend.end("m1")
    assert await task == b"m1"
    # Beside the first, a share; alone (the first has ended), the whole queue.
    assert backend.shares == [STREAM_QUEUE_SHARE, 1.0]
    # The second try's timings count its wait since the read (50 ms and more).
    first_wait, second_wait = backend.waits
    assert first_wait < 0.02e9 and second_wait >= 0.05e9


async def test_an_error_stops_the_messages_read_after_it() -> None:
    """A stream ends at its first error; the messages read after it were still
    scored (and their decisions recorded) for nobody (audit AX)."""
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    done.set_result(b"first")
    backend = Backend(lambda request, admitted: True)
    ahead = stretch(backend, done)
    failing, after = paced(backend, ahead, "m1"), paced(backend, ahead, "m2")
    await turns()
    assert set(backend.admitted) == {"m1", "m2"}
    backend.fail("m1", DeadlineUnreachable("submit", "late"))
    await asyncio.wait((failing, after), timeout=1)
    assert isinstance(failing.exception(), DeadlineUnreachable)
    assert after.cancelled() and ahead.stopped and not backend.admitted


async def test_an_error_leaves_the_messages_before_it_to_their_turn() -> None:
    """Audit AY: an error woke the messages before it that were waiting, to try once
    more at once; shed there, they ended the stream with RESOURCE_EXHAUSTED at a valid
    message, and the answers before it and the error's own status were lost."""
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    # m1 is shed while the first is being scored; m2 is taken.
    backend = Backend(lambda request, admitted: request == "m2" or first.done())
    ahead = stretch(backend, first)
    waiting, failing = paced(backend, ahead, "m1"), paced(backend, ahead, "m2")
    await turns()
    assert backend.tries == ["m1", "m2"] and set(backend.admitted) == {"m2"}
    error = InvalidRequest("transaction.event_time_ms", "too far ahead")
    backend.fail("m2", error)
    await turns()
    assert failing.exception() is error
    assert not waiting.done()  # shed again (the first is still in), it waits on
    assert ahead.stopped and not ahead.gave_up
    first.set_result(b"first")
    await turns()
    backend.end("m1")
    assert await waiting == b"m1"


async def test_the_first_message_shed_behind_its_streams_later_ones_tries_again() -> None:
    """The stretch's first message began in turn, before reading ahead; shed behind
    the messages read after it (a fallback's queue, on a 10 ms budget), it ended the
    stream with no answer at all (audit AO). It is paced like them."""
    first_try: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    backend = Backend(lambda request, admitted: True)
    ahead = _ReadAhead()
    first = paced(backend, ahead, "first", first_try=first_try)
    later = paced(backend, ahead, "m1")
    await turns()
    assert backend.tries == ["m1"]
    first_try.set_exception(Overloaded("over capacity: m1 ahead of it"))
    await turns()
    assert backend.tries == ["m1"] and not first.done()  # waits: m1 is being scored
    backend.end("m1")
    await turns()
    assert backend.tries == ["m1", "first"]
    backend.end("first")
    assert (await first, await later) == (b"first", b"m1")


class TwoWaiting:
    """Messages a and b, read while the stretch's first is being scored, both shed:
    both wait. ``room`` opens the backend to them."""

    def __init__(self) -> None:
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.room = False
        self.backend = Backend(lambda request, admitted: self.room)
        ahead = stretch(self.backend, self.first)
        self.a, self.b = paced(self.backend, ahead, "a"), paced(self.backend, ahead, "b")


async def test_each_score_that_ends_lets_one_waiting_message_try_again_in_order() -> None:
    waiting = TwoWaiting()
    first, backend, a, b = waiting.first, waiting.backend, waiting.a, waiting.b
    await turns()
    assert backend.tries == ["a", "b"]
    waiting.room = True
    first.set_result(b"first")
    await turns()
    assert backend.tries == ["a", "b", "a"]  # one ended: one tries, the first waiting
    backend.end("a")
    await turns()
    assert backend.tries == ["a", "b", "a", "b"]
    backend.end("b")
    assert (await a, await b) == (b"a", b"b")


async def test_shed_again_once_none_of_its_own_is_being_scored_ends_the_stream() -> None:
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    backend = Backend(lambda request, admitted: False)  # others' load: shed always
    task = paced(backend, stretch(backend, first), "m1")
    await turns()
    assert not task.done()
    first.set_result(b"first")
    await asyncio.wait((task,), timeout=1)
    assert isinstance(task.exception(), Overloaded)
    assert backend.tries == ["m1", "m1"]


async def test_a_message_cancelled_while_waiting_passes_its_turn_on() -> None:
    waiting = TwoWaiting()
    first, backend, a, b = waiting.first, waiting.backend, waiting.a, waiting.b
    await turns()
    a.cancel()
    await turns()
    waiting.room = True
    first.set_result(b"first")
    await turns()
    assert backend.tries == ["a", "b", "b"]  # the cancelled one's turn went to the next
    backend.end("b")
    assert await b == b"b"


async def run_to_the_end(
    backend: Backend, first: asyncio.Future[bytes], messages: int, ends: list[int]
) -> list[asyncio.Task[bytes]]:
    """A stretch of ``messages`` read ahead behind ``first``, which then ends; the
    backend then ends one admitted call a step, picked by ``ends``, until every
    message has ended (a bounded number of steps: none may wait for good)."""
    ahead = stretch(backend, first)
    tasks = [paced(backend, ahead, f"m{i}") for i in range(messages)]
    await turns()
    first.set_result(b"first")
    step = 0
    while not all(task.done() for task in tasks):
        await turns()
        if backend.admitted:
            pick = ends[step % len(ends)] % len(backend.admitted)
            backend.end(list(backend.admitted)[pick])
        step += 1
        assert step < 10_000, [task for task in tasks if not task.done()]
    return tasks


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 6),
    messages=st.integers(1, 40),
    ends=st.lists(st.integers(0, 5), min_size=1, max_size=20),
)
def test_a_stream_alone_against_any_capacity_is_answered_in_full(
    capacity: int, messages: int, ends: list[int]
) -> None:
    """The stream's own load only (the backend admits while fewer than ``capacity`` of
    its calls are in, in any order of endings): every message is answered, none is
    shed for good, and never more than ``capacity`` are in at once."""

    async def run() -> None:
        first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # The first message, scored before the stretch began, holds a place too.
        backend = Backend(lambda request, admitted: admitted + (not first.done()) < capacity)
        tasks = await run_to_the_end(backend, first, messages, ends)
        assert [task.result() for task in tasks] == [f"m{i}".encode() for i in range(messages)]
        assert backend.most_admitted <= capacity

    asyncio.run(run())


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 6),
    messages=st.integers(1, 30),
    admits=st.lists(st.booleans(), min_size=1, max_size=40),
    ends=st.lists(st.integers(0, 5), min_size=1, max_size=20),
)
def test_under_anyones_load_every_message_ends_and_the_first_error_ends_in_order(
    capacity: int, messages: int, admits: list[bool], ends: list[int]
) -> None:
    """Others' load too: a try within the stream's capacity is admitted or shed as
    ``admits`` says (then always admitted, the load gone). Every message ends, answered
    or RESOURCE_EXHAUSTED, however the shedding and the endings fall: none waits for
    good. (A message shed twice while a later one gave up waited forever, once the
    later one's error came after it in the stream's order: the stream hung, audit
    AO.)"""

    async def run() -> None:
        first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        tries = iter(admits)

        def decide(request: str, admitted: int) -> bool:
            if admitted + (not first.done()) >= capacity:
                return False
            return next(tries, True)

        tasks = await run_to_the_end(Backend(decide), first, messages, ends)
        # Answered in full, or up to the first message that gave up: the stream's
        # error, RESOURCE_EXHAUSTED; those read after it were stopped (cancelled).
        outcomes = ["cancelled" if t.cancelled() else t.exception() or t.result() for t in tasks]
        ended = next((i for i, o in enumerate(outcomes) if not isinstance(o, bytes)), None)
        if ended is None:
            assert outcomes == [f"m{i}".encode() for i in range(messages)]
        else:
            assert outcomes[:ended] == [f"m{i}".encode() for i in range(ended)]
            assert isinstance(outcomes[ended], Overloaded), outcomes

    asyncio.run(run())

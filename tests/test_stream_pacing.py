"""A ScoreStream's pacing of its read-ahead (``ScoringService._score_paced``), as pure
logic: ``score`` stands in for the batcher, shedding or admitting as a test scripts it.
The same behaviour against a real server and a slow model is in test_overload.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streamscore.server.errors import Overloaded
from streamscore.server.scoring import ScoringService, _ReadAhead

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

    async def score(self, request: str, *_: Any, validated: bool) -> bytes:
        self.tries.append(request)
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


def paced(backend: Backend, ahead: _ReadAhead, request: str) -> asyncio.Task[bytes]:
    service: Any = SimpleNamespace(score=backend.score)
    return asyncio.ensure_future(
        ScoringService._score_paced(service, request, CONTEXT, None, ahead)  # type: ignore[arg-type]
    )


def stretch(first_answer: asyncio.Future[bytes]) -> _ReadAhead:
    return _ReadAhead((None, 0.0, first_answer))  # type: ignore[arg-type]


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_shed_with_none_of_its_own_being_scored_the_message_ends_the_stream() -> None:
    answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    answered.set_result(b"first")
    backend = Backend(lambda request, admitted: False)
    task = paced(backend, stretch(answered), "m1")
    await asyncio.wait((task,), timeout=1)
    assert isinstance(task.exception(), Overloaded)
    assert backend.tries == ["m1"]


async def test_shed_while_its_own_are_scored_a_message_tries_again_when_one_ends() -> None:
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    ahead = stretch(first)
    backend = Backend(lambda request, admitted: first.done())  # shed while it is in
    task = paced(backend, ahead, "m1")
    await turns()
    assert backend.tries == ["m1"] and not task.done()  # waits: the first is being scored
    first.set_result(b"first")
    await turns()
    assert backend.tries == ["m1", "m1"]
    backend.end("m1")
    assert await task == b"m1"


class TwoWaiting:
    """Messages a and b, read while the stretch's first is being scored, both shed:
    both wait. ``room`` opens the backend to them."""

    def __init__(self) -> None:
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        ahead = stretch(self.first)
        self.room = False
        self.backend = Backend(lambda request, admitted: self.room)
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
    task = paced(backend, stretch(first), "m1")
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
        ahead = stretch(first)
        # The first message, scored before the stretch began, holds a place too.
        backend = Backend(lambda request, admitted: admitted + (not first.done()) < capacity)
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
            assert step < 10_000, "the stream stopped making progress"
        assert [task.result() for task in tasks] == [f"m{i}".encode() for i in range(messages)]
        assert backend.most_admitted <= capacity

    asyncio.run(run())

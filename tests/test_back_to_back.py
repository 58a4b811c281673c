"""``BackToBack``: bodies of calls that arrive together run in one row, each caller gets
its own body's result, error or cancel, and a body that waits goes on in a task."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import time
import warnings

import pytest

from streamscore.server.back_to_back import MAX_TURNS, BackToBack

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")


def never_crowded() -> BackToBack:
    return BackToBack(0)  # rows of the calls that arrived in the same turn


async def test_bodies_that_arrive_together_run_in_one_row_in_order() -> None:
    row = never_crowded()
    ran: list[int] = []

    async def body(n: int) -> int:
        ran.append(n)
        REQUEST.set(f"r{n}")
        return n * 10

    calls = [asyncio.ensure_future(row.run(body(n), 1.0)) for n in range(5)]
    await asyncio.sleep(0)  # the calls start: each waits in the row
    assert ran == []
    await asyncio.sleep(0)  # one turn: the row runs
    assert ran == [0, 1, 2, 3, 4]
    assert await asyncio.gather(*calls) == [0, 10, 20, 30, 40]
    assert REQUEST.get() == ""  # each set it in a context of its own


async def test_an_error_reaches_its_own_caller_only() -> None:
    row = never_crowded()

    async def body(n: int) -> int:
        if n == 1:
            raise ValueError("bad request 1")
        return n

    calls = (row.run(body(n), 1.0) for n in range(3))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad request 1"


async def test_a_body_that_waits_goes_on_in_a_task() -> None:
    row = never_crowded()
    pending: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> tuple[int, str]:
        REQUEST.set("set before the wait")
        return await pending, REQUEST.get()

    async def at_once() -> str:
        return "first"

    waiting = asyncio.ensure_future(row.run(waits(), 1.0))
    quick = asyncio.ensure_future(row.run(at_once(), 1.0))
    assert await quick == "first"  # not held back by the body before it that waits
    assert not waiting.done()
    pending.set_result(7)
    assert await waiting == (7, "set before the wait")


async def test_a_caller_gone_while_its_body_waits_cancels_the_body() -> None:
    row = never_crowded()
    pending: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def waits() -> int:
        try:
            return await pending
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    call = asyncio.ensure_future(row.run(waits(), 1.0))
    for _ in range(3):
        await asyncio.sleep(0)  # its body runs and waits
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(3):
        await asyncio.sleep(0)
    assert seen == ["cancelled"] and pending.cancelled()


async def test_a_caller_gone_before_its_turn_never_starts_its_body() -> None:
    row = never_crowded()
    ran: list[str] = []

    async def body() -> None:
        ran.append("ran")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail
        call = asyncio.ensure_future(row.run(body(), 1.0))
        await asyncio.sleep(0)  # waiting in the row
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0)
        gc.collect()
    assert ran == []


async def rows_of_staggered_calls(row: BackToBack, calls: int, patience_s: float = 1.0) -> int:
    """Calls arriving one loop turn apart: in how many rows their bodies ran."""
    turn = 0
    ran_in_turn: list[int] = []

    async def count_turns() -> None:
        nonlocal turn
        while True:
            turn += 1
            await asyncio.sleep(0)

    async def body(n: int) -> int:
        ran_in_turn.append(turn)
        return n

    async def arrive_later(n: int) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
        return await row.run(body(n), patience_s)

    ticker = asyncio.ensure_future(count_turns())
    try:
        assert await asyncio.gather(*(arrive_later(n) for n in range(calls))) == list(range(calls))
    finally:
        ticker.cancel()
    return len(set(ran_in_turn))


async def calls_at_once(row: BackToBack, calls: int) -> None:
    async def body() -> None:
        return None

    await asyncio.gather(*(row.run(body(), 1.0) for _ in range(calls)))


async def test_an_idle_server_runs_each_call_at_once() -> None:
    assert await rows_of_staggered_calls(BackToBack(8), 3) == 3


async def test_once_calls_arrive_together_a_row_waits_for_others_to_join() -> None:
    row = BackToBack(8)
    await calls_at_once(row, 2)  # a crowded loop: rows wait from now on
    assert await rows_of_staggered_calls(row, 3) == 1
    assert await rows_of_staggered_calls(row, 3) == 1


async def test_a_wait_that_gathers_no_other_call_stops_the_waiting() -> None:
    row = BackToBack(8)
    await calls_at_once(row, 2)
    await calls_at_once(row, 1)  # waited 8 turns alone
    assert await rows_of_staggered_calls(row, 3) == 3


async def test_a_row_in_probe_every_waits_while_the_waiting_is_off() -> None:
    row = BackToBack(8, probe_every=3)
    assert await rows_of_staggered_calls(row, 2) == 2  # rows 1 and 2: at once
    assert await rows_of_staggered_calls(row, 2) == 1  # row 3, the probe: gathers the next
    assert await rows_of_staggered_calls(row, 3) == 1  # and the waiting is on


async def test_a_row_runs_without_waiting_out_its_turns_once_full() -> None:
    row = BackToBack(MAX_TURNS, max_row=3)
    await calls_at_once(row, 2)
    ran: list[int] = []

    async def body(n: int) -> None:
        ran.append(n)

    calls = [asyncio.ensure_future(row.run(body(n), 1.0)) for n in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert ran == [0, 1, 2]
    await asyncio.gather(*calls)


async def test_a_failed_body_leaves_no_reference_cycle() -> None:
    """The error's traceback holds frames; none may hold the answer that holds the
    error (gc_policy: a cycle frozen in flight is never freed)."""
    row = never_crowded()

    async def refused() -> None:
        raise ValueError("bad request")

    async def caller() -> None:
        with pytest.raises(ValueError):
            await row.run(refused(), 1.0)

    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(*(caller() for _ in range(3)))
        await asyncio.sleep(0)
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_a_row_waits_no_longer_than_the_patience_of_its_calls() -> None:
    """Turns are as long as the other work on the loop makes them: here 5 ms each, so
    64 turns would be 320 ms; the row runs once its most impatient call's 12 ms are up."""
    row = BackToBack(64)
    await calls_at_once(row, 2)
    started: list[float] = []

    loop = asyncio.get_running_loop()
    busy = True

    def other_work() -> None:  # another part's, on the loop: 5 ms a turn
        time.sleep(0.005)
        if busy:
            loop.call_soon(other_work)

    async def body() -> None:
        started.append(time.perf_counter())

    loop.call_soon(other_work)
    try:
        await asyncio.sleep(0)
        called = time.perf_counter()
        await asyncio.gather(row.run(body(), 1.0), row.run(body(), 0.012))
    finally:
        busy = False
    assert len(started) == 2
    assert started[0] - called < 0.012 + 0.015, started[0] - called  # + up to 3 busy turns


async def test_no_patience_runs_the_row_at_its_first_turn() -> None:
    row = BackToBack(8)
    await calls_at_once(row, 2)  # rows wait, where the calls have patience
    assert await rows_of_staggered_calls(row, 3, patience_s=0.0) == 3


async def test_each_body_runs_in_its_own_callers_context() -> None:
    row = never_crowded()

    async def body() -> str:
        return REQUEST.get()

    async def caller(n: int) -> str:
        REQUEST.set(f"r{n}")
        return await row.run(body(), 1.0)

    assert await asyncio.gather(*(caller(n) for n in range(4))) == ["r0", "r1", "r2", "r3"]


def test_turns_are_bounded() -> None:
    with pytest.raises(ValueError, match="turns"):
        BackToBack(MAX_TURNS + 1)

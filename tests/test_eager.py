"""``start_eagerly``: a coroutine that never waits is done at once, without a task or
a loop turn; one that waits goes on in a task, with a task's results, errors, cancels
and context."""

from __future__ import annotations

import asyncio
import contextvars
import gc

import pytest

from streamscore.server.eager import start_eagerly

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")


async def immediate(value: int) -> int:
    REQUEST.set(f"r{value}")
    return value * 2


async def refused() -> int:
    raise ValueError("bad request")


async def waits(future: asyncio.Future[int]) -> tuple[int, str]:
    REQUEST.set("set before the wait")
    value = await future
    return value, REQUEST.get()


async def test_a_coroutine_that_never_waits_is_done_without_a_loop_turn() -> None:
    turned: list[bool] = []
    asyncio.get_running_loop().call_soon(turned.append, True)
    answer = start_eagerly(immediate(21))
    assert answer.done() and not isinstance(answer, asyncio.Task)
    assert await answer == 42
    assert not turned
    assert REQUEST.get() == ""  # what it set stayed in its own context


async def test_an_error_before_any_wait_is_the_futures_error() -> None:
    answer = start_eagerly(refused())
    assert answer.done()
    with pytest.raises(ValueError, match="bad request"):
        await answer


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_its_context() -> None:
    pending: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    answer = start_eagerly(waits(pending))
    assert isinstance(answer, asyncio.Task) and not answer.done()
    pending.set_result(7)
    assert await answer == (7, "set before the wait")
    assert REQUEST.get() == ""


async def test_the_error_of_what_it_waits_for_is_raised_inside_it() -> None:
    pending: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def recovers() -> str:
        try:
            await pending
        except KeyError:
            await asyncio.sleep(0)  # waits again, after the error
            return "recovered"
        return "no error"

    answer = start_eagerly(recovers())
    pending.set_exception(KeyError("gone"))
    assert await answer == "recovered"


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    pending: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cleaned: list[str] = []

    async def cleans_up() -> int:
        try:
            return await pending
        finally:
            cleaned.append("finally")

    answer = start_eagerly(cleans_up())
    await asyncio.sleep(0)
    answer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await answer
    assert answer.cancelled() and pending.cancelled() and cleaned == ["finally"]


async def test_a_cancel_after_its_wait_ended_still_reaches_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[int] = loop.create_future()
    seen: list[str] = []

    async def notes_the_cancel() -> int:
        value = await pending
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled in the sleep")
            raise
        return value

    answer = start_eagerly(notes_the_cancel())
    pending.set_result(1)
    await asyncio.sleep(0)  # the task saw the result and moved on to the sleep
    await asyncio.sleep(0)
    answer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await answer
    assert seen == ["cancelled in the sleep"]


async def test_a_task_cancelled_before_its_first_step_still_cancels_the_coroutine() -> None:
    """Cancelled before its task first ran (a ScoreStream ending cancels the Scores
    it read ahead, at once), the coroutine was left where it waited: its cancel
    handling never ran, and the error that what it waited for got in that same turn
    was never read (asyncio logged "never retrieved" at ERROR; audit AG)."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    seen: list[str] = []

    async def notes_the_cancel(future: asyncio.Future[int]) -> int:
        try:
            return await future
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    try:
        for fails in (True, False):
            pending: asyncio.Future[int] = loop.create_future()
            answer = start_eagerly(notes_the_cancel(pending))
            assert answer.cancel()  # before its task's first step
            if fails:
                pending.set_exception(ValueError("shed"))
            with pytest.raises(asyncio.CancelledError):
                await answer
            assert pending.done()  # cancelled, if it had not failed
            del pending, answer
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert seen == ["cancelled", "cancelled"]
    assert unhandled == []


async def test_many_waits_in_a_row_and_a_result() -> None:
    async def counts() -> int:
        total = 0
        for i in range(5):
            await asyncio.sleep(0)
            total += await asyncio.sleep(0.001, result=i)
        return total

    assert await start_eagerly(counts()) == 10

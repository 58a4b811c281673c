"""Start a coroutine now, on the caller's turn; a task carries it on only if it waits.

Python 3.12's ``asyncio.eager_task_factory`` in miniature, for the one place that
needs it on 3.11: ScoreStream starts each message's Score this way. A Score whose
model call runs inside the batcher's submit (a cheap in-process model) finishes
without waiting, so it costs no task and no loop turn; one that does wait (a batch in
a worker thread, Triton) is carried on by a task, as before.

The coroutine runs in its own copy of the caller's context, as a task's would, so
what it sets there (the request id that log lines carry) stays out of the caller's.
Until its first wait it runs inside the caller's task: code started this way must not
bind to the current task before waiting (``asyncio.timeout``, ``current_task``); the
Score path does neither.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = [
    "CANCELLED",
    "ENDED",
    "FAILED",
    "WAITS",
    "carry_on",
    "first_step",
    "settle",
    "start_eagerly",
]

T = TypeVar("T")

# How a coroutine's first step ended (``first_step``).
WAITS, ENDED, CANCELLED, FAILED = range(4)


def start_eagerly(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coro`` up to its first wait: a done future when it never waits, else a
    task that runs the rest (cancel it to cancel the coroutine, as with any task)."""
    context = contextvars.copy_context()
    outcome, value = first_step(coro, context)
    if outcome == WAITS:
        return carry_on(coro, value, context)
    done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    settle(done, outcome, value)
    return done


def first_step(coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> tuple[int, Any]:
    """Run ``coro`` in ``context`` up to its first wait: (WAITS, what it waits for),
    (ENDED, its result), (FAILED, its error) or (CANCELLED, None)."""
    try:
        return WAITS, context.run(coro.send, None)
    except StopIteration as finished:
        return ENDED, finished.value
    except asyncio.CancelledError:
        return CANCELLED, None
    except Exception as error:
        return FAILED, error


def settle(future: asyncio.Future[Any], outcome: int, value: Any) -> None:
    """``future`` as a first step that did not wait ended (``first_step``)."""
    if outcome == ENDED:
        future.set_result(value)
    elif outcome == FAILED:
        future.set_exception(value)
    else:
        future.cancel()


def carry_on(
    coro: Coroutine[Any, Any, T], waiting: Any, context: contextvars.Context
) -> asyncio.Task[T]:
    """A task that runs the rest of ``coro``, started in ``context`` and now waiting
    for ``waiting`` (what its last step yielded)."""
    task = asyncio.get_running_loop().create_task(_carry_on(coro, waiting), context=context)
    task.add_done_callback(lambda _: _unwind_if_never_resumed(coro, waiting, context))
    return task


def _unwind_if_never_resumed(
    coro: Coroutine[Any, Any, Any], waiting: Any, context: contextvars.Context
) -> None:
    """A task cancelled before its first step never runs ``_carry_on`` at all, so the
    cancel never reached the coroutine: it was left where it waited, its ``except
    CancelledError`` never run (the batcher's bookkeeping for a queued call, which was
    then scored for nobody) and the error of what it waited for, set in that same
    turn, never read (asyncio logged "Future exception was never retrieved" at ERROR).
    Done here as the task would have: what it waits for cancelled, or its error read,
    then the cancel thrown in where it waits."""
    if inspect.getcoroutinestate(coro) != inspect.CORO_SUSPENDED:
        return  # ``_carry_on`` ran it to its end
    if asyncio.isfuture(waiting) and not waiting.cancel() and not waiting.cancelled():
        waiting.exception()  # done meanwhile: read, as a task's wake-up reads it
    try:
        context.run(coro.throw, asyncio.CancelledError())
    except (asyncio.CancelledError, StopIteration):  # (an error of its own: logged)
        return
    coro.close()  # it waited again while unwinding: nothing will resume it


async def _carry_on(coro: Coroutine[Any, Any, T], waiting: Any) -> T:
    """What a task's steps do: wait for what the coroutine waits for, then resume it
    (a cancel of this task reaches the coroutine where it waits)."""
    while True:
        throw: BaseException | None = None
        try:
            if waiting is None:  # a bare yield (asyncio.sleep(0)): one loop turn
                await asyncio.sleep(0)
            elif not asyncio.isfuture(waiting):
                throw = RuntimeError(f"coroutine yielded {waiting!r}, not a future")
            else:
                waiting._asyncio_future_blocking = False  # taken, as a task takes it
                if not waiting.done():
                    await asyncio.wait((waiting,))
        except asyncio.CancelledError as cancel:
            # Cancel what it waits for, so that it sees the cancel there; if that is
            # already over, throw the cancel in instead.
            if not (asyncio.isfuture(waiting) and waiting.cancel()):
                throw = cancel
        try:
            waiting = coro.send(None) if throw is None else coro.throw(throw)
        except StopIteration as finished:
            return finished.value

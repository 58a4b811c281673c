"""Background tasks of long-lived parts: every one started with a failure path, every
one stopped the same way (cancel, then wait for it to end)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def start_background(
    coro: Coroutine[Any, Any, None],
    *,
    name: str,
    log: logging.Logger,
    failure: str,
    on_failure: Callable[[BaseException], None] | None = None,
    tracked: set[asyncio.Task[None]] | None = None,
) -> asyncio.Task[None]:
    """``coro`` as a task; should it end with an exception, ``on_failure`` gets it
    (a part that keeps it, to refuse or report) and ``failure`` is logged with it.
    ``tracked``: a set the task is in until it ends (a part's tasks of one kind, which
    its stop waits for or cancels)."""
    task = asyncio.create_task(coro, name=name)
    if tracked is not None:
        tracked.add(task)

    def on_done(done: asyncio.Task[None]) -> None:
        if tracked is not None:
            tracked.discard(done)
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            if on_failure is not None:
                on_failure(exc)
            log.error(failure, exc_info=exc)

    task.add_done_callback(on_done)
    return task


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: nothing) and wait until it has ended, whatever it raised:
    a part whose task failed earlier still stops without raising, so the parts
    stopped after it are stopped too."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def in_daemon_thread(fn: Callable[[], T], *, name: str) -> T:
    """``fn()`` in a thread of its own, off the event loop, that does not hold the
    process's exit. ``asyncio.to_thread``'s pool threads are joined at exit: a stop
    during a slow model load (a warm-up, a TensorRT engine build of minutes) waited
    for the load to finish, though its caller had long been cancelled. Cancelled,
    this returns at once; the thread's late result is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as raised:  # handed to the caller, whatever it is
            result, error = None, raised
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done

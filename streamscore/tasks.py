"""Background tasks of long-lived parts: every one started with a failure path, every
one stopped the same way (cancel, then wait for it to end)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any


def start_background(
    coro: Coroutine[Any, Any, None],
    *,
    name: str,
    log: logging.Logger,
    failure: str,
    on_failure: Callable[[BaseException], None] | None = None,
) -> asyncio.Task[None]:
    """``coro`` as a task; should it end with an exception, ``on_failure`` gets it
    (a part that keeps it, to refuse or report) and ``failure`` is logged with it."""
    task = asyncio.create_task(coro, name=name)

    def on_done(done: asyncio.Task[None]) -> None:
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

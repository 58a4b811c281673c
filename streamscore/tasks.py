"""Background tasks of long-lived parts: every one started with a failure path, every
one stopped the same way (cancel, then wait for it to end)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


def start_background(
    coro: Coroutine[Any, Any, None], *, name: str, log: logging.Logger, failure: str
) -> asyncio.Task[None]:
    """``coro`` as a task; should it end with an exception, ``failure`` is logged with
    it (the part's owner decides whether serving goes on)."""
    task = asyncio.create_task(coro, name=name)

    def on_done(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error(failure, exc_info=done.exception())

    task.add_done_callback(on_done)
    return task


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: nothing) and wait until it has ended, whatever it raised."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

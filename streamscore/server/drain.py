"""Calls that wait on their callers, cut off at a drain.

Some calls wait for their callers, not for us: a ScoreStream waiting for its next
message, a health Watch or a reflection stream. Left alone they would hold a drain
for its whole grace period, then be cut by gRPC (CANCELLED). A drain cancels the
task of each one that is waiting, and the call, seeing that it was cut off (not
cancelled by its caller or by gRPC), ends itself with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any


class DrainCut:
    """The tasks of calls now waiting on their callers, for a drain to cut off."""

    def __init__(self) -> None:
        self.draining = False
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()

    def enter(self, task: asyncio.Task[Any]) -> None:
        self._waiting.add(task)

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._waiting.discard(task)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The current task, waiting meanwhile (``enter`` and ``leave``: the same,
        without a generator, for a path taken per message)."""
        task = asyncio.current_task()
        assert task is not None
        self.enter(task)
        try:
            yield
        finally:
            self.leave(task)

    def cut_all(self) -> None:
        """The drain: every waiting task cancelled, and marked as cut off."""
        self.draining = True
        for task in self._waiting:
            self._cut.add(task)
            task.cancel()

    def was_cut(self, task: asyncio.Task[Any] | None) -> bool:
        """In a task's ``except CancelledError``: True (the cancel undone) when
        ``cut_all`` cancelled it, False for any other cancel, to be raised on."""
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        task.uncancel()
        return True

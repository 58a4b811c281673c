"""Unary Score calls that arrive close together run their bodies back to back.

Under load a Score's own work costs most in cache misses: its code and data, and
gRPC's code for the call around it, evicted by the work for other calls in between.
A unary call here waits for its answer in a row of calls, and one loop callback runs
the bodies of the whole row, one after the other; each caller then finishes its
call (gRPC's send) in turn, also back to back. At 64 calls in flight this took the
server's CPU per answer from 310-399 us to 276-320 us, and its answers per second
from 74-79 % of the echo server's to 86-97 % (BENCHMARKS.md, session 33).

gRPC hands the server its calls about one per loop turn, so a row that runs on the
next turn holds little more than one call (1.16 on average at 64 in flight). The
first call of a row therefore waits up to ``turns`` loop turns for others to join
it (rows of 4.6 with 32), and no longer than the patience of the calls in it (a
turn lasts as long as the other work on the loop makes it: ScoreStreams stretched
32 turns to tens of milliseconds, audit AW; the server gives each call at most 1 ms,
and at most a tenth of its budget). On an idle loop those turns cost CPU and gather
nothing, so rows wait only while waiting pays: a row that waited and gathered no
other call stops the waiting; calls that arrive in the same turn without it (the
loop is crowded) start it again, as does one row in ``probe_every`` while it is off.
Each body runs in a copy of its own caller's context, as a task would.

Each body starts eagerly, as ``eager.start_eagerly`` starts one: one that never waits
(an idle batcher's model call inline) ends within the callback; one that waits (a
batch, a thread, Triton) goes on in a task of its own. A caller that goes away
cancels its answer: a body not yet started then never starts, and one carried on by
a task is cancelled with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from streamscore.server.eager import WAITS, carry_on, first_step, settle

T = TypeVar("T")

# Loop turns a row may wait at most (a setting's bound): on an idle loop a turn is a
# few microseconds of CPU that gathers nothing.
MAX_TURNS = 256


class BackToBack:
    """``run`` a call's body in a row with the others waiting then; see the module."""

    def __init__(self, turns: int, *, max_row: int = 64, probe_every: int = 64) -> None:
        if not 0 <= turns <= MAX_TURNS or max_row < 1 or probe_every < 1:
            raise ValueError(f"0 <= turns <= {MAX_TURNS}, max_row >= 1 and probe_every >= 1")
        self.turns = turns
        self.max_row = max_row
        self.probe_every = probe_every
        # (body, its answer, its caller's context)
        self._waiting: list[
            tuple[Coroutine[Any, Any, Any], asyncio.Future[Any], contextvars.Context]
        ] = []
        self._turns_left = 0  # the row now waiting: loop turns it may still wait
        self._ends = 0.0  # ... and until when (time.perf_counter), at the latest
        self._waits = False  # whether rows wait: waiting gathered calls lately
        self._rows_unwaited = 0  # rows run at once since the last that waited

    async def run(self, body: Coroutine[Any, Any, T], patience_s: float) -> T:
        """``body``'s result, run in a row with the other bodies waiting then.
        ``patience_s``: how long this call may wait for others to join its row (its
        row runs when the first of its calls' patience runs out, or its turns do)."""
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # The caller's context, copied as a task copies it: its body runs in it.
        self._waiting.append((body, answer, contextvars.copy_context()))
        ends = time.perf_counter() + patience_s
        if len(self._waiting) == 1:
            self._start_row(answer.get_loop(), ends)
        elif ends < self._ends:
            self._ends = ends
        try:
            return await answer
        except asyncio.CancelledError:
            # Gone before its row ran: never started, now or later (a loop that
            # stops first would leave it "never awaited").
            if inspect.getcoroutinestate(body) == inspect.CORO_CREATED:
                body.close()
            raise
        finally:
            # This frame lives on in a raised error's traceback; without the answer
            # it leaves no cycle (answer -> error -> traceback -> frame -> answer)
            # for the cyclic collector (server/gc_policy.py, loadtest/gc_leaks.py).
            del answer

    def _start_row(self, loop: asyncio.AbstractEventLoop, ends: float) -> None:
        waits = self._waits or self._rows_unwaited + 1 >= self.probe_every
        self._turns_left = self.turns if waits else 0
        self._ends = ends
        self._rows_unwaited = 0 if waits else self._rows_unwaited + 1
        loop.call_soon(self._run_row, waits)

    def _run_row(self, waited: bool) -> None:
        waiting = self._waiting
        if self._turns_left and len(waiting) < self.max_row and time.perf_counter() < self._ends:
            self._turns_left -= 1
            asyncio.get_running_loop().call_soon(self._run_row, waited)
            return
        self._waiting = []
        value: Any = None
        if waited or len(waiting) > 1:
            self._waits = self.turns > 0 and len(waiting) > 1
        for body, answer, context in waiting:
            if answer.done():  # its caller went away before its turn
                body.close()
                continue
            outcome, value = first_step(body, context)
            if outcome != WAITS:
                settle(answer, outcome, value)
            else:
                task = carry_on(body, value, context)
                task.add_done_callback(functools.partial(_settle, answer))
                answer.add_done_callback(functools.partial(_cancel_if_gone, task))
        # An error's traceback keeps first_step's frame, and through it this one (a
        # frame holds its caller's): nothing of an answer may be left in it.
        waiting.clear()
        del body, answer, value, context


def _cancel_if_gone(task: asyncio.Task[Any], answer: asyncio.Future[Any]) -> None:
    """The caller went away (its answer cancelled): so does the body's task."""
    if answer.cancelled():
        task.cancel()


def _settle(answer: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """``answer`` given what the task carrying its body ended with."""
    if done.cancelled():
        answer.cancel()
        return
    error = done.exception()  # read even for a caller gone, as nobody else will
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())

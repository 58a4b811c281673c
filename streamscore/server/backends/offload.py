"""Run a blocking in-process model call inline while it is cheap, in a thread once not.

A small MLP answers in microseconds: a thread hand-off (and the GIL coming back after
it) would cost more than the call, so it runs on the event loop. A heavy model (or a
pathological one) would block the loop for every other request, the primary's
included, so its calls go to one worker thread; onnxruntime and torch release the GIL
while they compute. The choice follows a moving average of the call's cost (in the thread, its CPU
time, which does not count waiting for the GIL; on the loop, its wall time, see
``call_inline``), so a model that turns out cheap comes back to the loop and one that
turns heavy leaves it. Until the first call is measured the cost is unknown and the
call goes to the thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

__all__ = ["InlineOrThread"]

log = logging.getLogger("streamscore.models")

T = TypeVar("T")

# Above this CPU time per call a model leaves the event loop: 0.5 ms is a fifth of a
# typical 2-3 ms p99 budget share for features + model, and about 20 hand-offs' cost.
INLINE_LIMIT_S = 0.0005
# Weight of the newest sample in the moving average; a sample counts at most
# SPIKE_CAP x the limit, so one pause (a GC pass, a preemption) inside a cheap call
# cannot send the model to the thread, while a model that is really heavy crosses the
# limit within about six calls.
ALPHA = 0.05
SPIKE_CAP = 4.0
# A call over the cap held the loop for all of it. Now and then that is a pause (a GC
# pass, a preemption on a busy box); calls over the cap taking HEAVY_SHARE of the
# last HEAVY_WINDOW_S are a model heavy on some inputs, whose capped average can stay
# under the limit while each heavy call stalls every other request (audit AR: 25 ms
# on a fifth of the inputs took the primary's p99 from 3 ms to 32). It leaves the loop
# with its average set to EVICTED_FACTOR x the limit: about 90 cheap calls in the
# thread bring it back, and only while it has no more heavy ones. (Three such calls in
# 10 s were too few: pauses on a saturated box with two CPU hogs sent a cheap primary
# off the loop several times a minute; audit AS.)
HEAVY_WINDOW_S = 10.0
HEAVY_SHARE = 0.02
EVICTED_FACTOR = 100.0


class InlineOrThread:
    def __init__(
        self,
        name: str,
        *,
        inline_limit_s: float = INLINE_LIMIT_S,
        thread_setup: Callable[[], None] | None = None,
        label: str | None = None,
    ) -> None:
        self.name = name
        self.label = label or name  # what its log line names (a model and its fallback differ)
        self.inline_limit_s = inline_limit_s
        self._spike_cap_s = SPIKE_CAP * inline_limit_s
        self._thread_setup = thread_setup
        self._executor: ThreadPoolExecutor | None = None
        # Moving average of CPU seconds per call; unknown until the first one.
        self.cost_s = math.inf
        # Calls over the cap lately: (when, seconds), and their seconds' sum.
        self._heavy_calls: deque[tuple[float, float]] = deque()
        self._heavy_s = 0.0

    @property
    def inline(self) -> bool:
        return self.cost_s <= self.inline_limit_s

    async def call(self, fn: Callable[[], T]) -> T:
        if self.inline:  # so call_inline runs it (and its None is fn's)
            return cast(T, self.call_inline(fn))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"model-{self.name}",
                initializer=self._thread_setup,
            )
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn)

    def call_inline(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` now, on the calling thread, while calls are cheap enough to
        run inline; None, without calling it, once they belong in the worker thread
        (then ``await call(...)``). Lets the batcher run a cheap batch without a task.
        (Arguments rather than a closure, and no ``inline`` property call: this is on
        every request's path.)

        Timed on the wall clock, not the thread's CPU clock: what the loop loses to
        the call is its wall time (a kernel's own threads included); on the loop the
        call holds the GIL from start to end, so the two differ by a preemption of
        the process, which the cap absorbs like any other pause; and the CPU clock is
        a real syscall (~0.4 us here, two a call), the wall clock is not."""
        if self.cost_s > self.inline_limit_s:
            return None
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._count(time.perf_counter() - started)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        """A call timed on the thread's CPU clock: in the worker thread, waiting for
        the GIL (the loop holds it) is no cost of the model's."""
        started = time.thread_time()
        try:
            return fn(*args)
        finally:
            self._count(time.thread_time() - started)

    def _count(self, seconds: float) -> None:
        # Capped: one pause inside a cheap call must not send the model away.
        spent = seconds if seconds <= self._spike_cap_s else self._spike_cap_s
        # A float store is atomic under the GIL; losing one sample to a race between
        # the loop and the thread only delays the average by a call.
        self.cost_s = (
            spent if math.isinf(self.cost_s) else (ALPHA * spent + (1 - ALPHA) * self.cost_s)
        )
        if seconds > self._spike_cap_s:
            self._heavy_call(seconds)

    def _heavy_call(self, seconds: float) -> None:
        now = time.monotonic()
        heavy = self._heavy_calls
        heavy.append((now, seconds))
        self._heavy_s += seconds
        while now - heavy[0][0] > HEAVY_WINDOW_S:
            self._heavy_s -= heavy.popleft()[1]
        if self._heavy_s > HEAVY_SHARE * HEAVY_WINDOW_S:
            if self.inline:  # said once a stay in the thread, not each heavy call
                log.info(
                    "%s: model calls leave the event loop: %d of them took %.3g s "
                    "within %.3g s, each over %.3g ms",
                    self.label,
                    len(heavy),
                    self._heavy_s,
                    HEAVY_WINDOW_S,
                    self._spike_cap_s * 1e3,
                )
            self.cost_s = max(self.cost_s, EVICTED_FACTOR * self.inline_limit_s)

    def close(self) -> None:
        """Let the worker thread end once its current call returns (never blocks)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

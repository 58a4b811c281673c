"""Keep the feature state out of the cyclic garbage collector's way.

A serving process holds millions of small long-lived containers: each entity's
buckets, sets and dicts (about 14 tracked objects per entity). CPython's collector
re-traverses every object of the generations it collects, with the event loop stopped.
Measured (``python -m loadtest.gc_pauses --cards 300000``: 790k entities, 10.8M
tracked objects, new entities arriving at 2,000/s): with the collector alone, a middle
collection (generation 1) stopped the process for 0.56 s within 30 s, young ones for
up to 37 ms, and one full collection would have taken 7.2 s; every Score in flight
then misses its budget. With this policy the longest pause was 14 ms (the freezes'
own young collections, 4 ms on average) and a full collection took 0 ms.

The state needs no cycle detection: it is acyclic, and reference counting frees what
the replica drops. So the process moves long-lived objects to the collector's
permanent generation (``gc.freeze()``), which no collection visits:

* at start, one full collection (the modules and startup objects), then a freeze;
* then every ``interval_s``: a collection of the young generations (what was
  allocated since the last freeze, so their garbage cycles are freed first), then a
  freeze of the survivors. Automatic collections only ever see objects younger than
  one interval, and their pauses stay in milliseconds;
* once more when the replica has caught up, just before SERVING
  (``ScoringServer(gc_freezer=...)``), so the first pause while serving is not
  catch-up's.

The cost: an object frozen while alive that later dies inside a reference cycle is
never freed. The young collection before each freeze frees the cycles of calls
already over, so only a call in flight at a freeze is at risk, and only if it ends in
a cycle. Two kinds of call did: a refused one (``context.abort()`` keeps its exception
in grpc's call state, whose traceback leads back to it) and every ScoreStream (grpc's
request reader refers back to its owner); the scoring service now ends both without
a cycle. ``python -m loadtest.gc_leaks`` checks it: answered, refused, timed-out and
cancelled calls, unary and streamed, with a freeze every 10 ms, leave 0 objects (they
left 100-700 per 100 rounds before). ``gc_freeze_interval_s = 0`` turns the policy
off (CPython's collector as configured by ``gc_tuning``).

Every collection's pause is timed through ``gc.callbacks`` into
``streamscore_gc_pause_seconds{generation}``, whatever started it; the permanent
generation's size is ``streamscore_gc_frozen_objects`` (``collector.ServerCollector``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from streamscore.server.metrics import GC_PAUSE_SECONDS
from streamscore.tasks import cancel_and_wait, start_background

log = logging.getLogger("streamscore.gc")

_pause_started = 0.0
# One child per generation, made at import: the callback allocates nothing new.
_PAUSES = [GC_PAUSE_SECONDS.labels(str(generation)) for generation in range(3)]


def _time_pause(phase: str, info: dict[str, Any]) -> None:
    global _pause_started
    if phase == "start":
        _pause_started = time.perf_counter()
    else:
        _PAUSES[info["generation"]].observe(time.perf_counter() - _pause_started)


def watch_gc_pauses() -> None:
    """Time every collection from now on (once per process; later calls do nothing)."""
    if _time_pause not in gc.callbacks:
        gc.callbacks.append(_time_pause)


def freeze_young() -> None:
    """Collect the young generations, then move every survivor to the permanent one."""
    gc.collect(1)
    gc.freeze()


class LongLivedFreezer:
    """The policy above as a part of a process (``streamscore serve`` starts one
    first, before its server): ``start`` times pauses from then on, freezes what
    startup made and starts the periodic freeze; ``stop`` ends it (what was frozen
    stays frozen: it is the process's long-lived state). A process-wide choice, so
    not a part of ``ScoringServer``: a server embedded in another program (the tests)
    leaves that program's collector alone."""

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self.interval_s = interval_s
        self.freezes = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        watch_gc_pauses()
        if not self.interval_s:
            return
        gc.collect()
        gc.freeze()
        # Should it fail, serving goes on; pauses grow back to CPython's (logged, and
        # visible in streamscore_gc_pause_seconds).
        self._task = start_background(
            self._run(), name="gc-freezer", log=log, failure="the gc freezer stopped"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def freeze_now(self) -> None:
        """Freeze the young survivors now (nothing when the policy is off)."""
        if self.interval_s:
            freeze_young()
            self.freezes += 1

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.freeze_now()

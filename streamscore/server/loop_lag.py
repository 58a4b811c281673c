"""How late the serving event loop runs what is due, and whether our own work or the
machine made it late.

Every gRPC call, batch and fold runs on one event loop. A call that arrives while the
loop is busy waits before any of our timers start, so the server's own latency
histograms cannot show it; the client sees it. The probe here asks the loop to wake
it every ``interval_s`` and records how late it woke (``streamscore_event_loop_lag_
seconds``): that lateness is what any call arriving at that moment waited too.

Lateness has two causes that call for different fixes:

* **busy**: the loop thread was running (one long callback, or more work than the
  loop can do) or blocked in a call that should not be on the loop (a blocking read,
  a lock): either way this process's doing, and the fix is in it;
* **cpu_wait**: the thread was ready to run but waited for a CPU (other processes on
  the machine, CPU steal); the fix is more or quieter cores.

Linux counts the second per thread in ``/proc/self/task/<tid>/schedstat`` (time on a
CPU, time waiting on a run queue). Each probe reads it (one ``pread``, about 0.5 µs)
and splits its lateness: the run-queue wait since the last probe, up to the
lateness, is ``cpu_wait``; the rest is ``busy``
(``streamscore_event_loop_late_seconds_total{cause}``). The thread's CPU and run-queue
wait are counters too, for the loop's utilisation. Where schedstat is missing (not
Linux, or schedstats off) only the lag histogram is kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from streamscore.server.fastmetrics import FastCounter, FastHistogram
from streamscore.server.metrics import LATENCY_BUCKETS_S
from streamscore.tasks import cancel_and_wait, start_background

log = logging.getLogger("streamscore.loop")

LOOP_LAG_SECONDS = FastHistogram(
    "streamscore_event_loop_lag_seconds",
    "How late the serving event loop woke a probe due every interval: what a call "
    "arriving then waited before the server could start on it.",
    [],
    buckets=(*LATENCY_BUCKETS_S, 2.5, 5.0),
)
LOOP_LATE_SECONDS = FastCounter(
    "streamscore_event_loop_late_seconds_total",
    "The probes' lateness, split by cause: busy (the loop thread was running, or "
    "blocked: this process's doing) or cpu_wait (it was ready but waited for a CPU).",
    ["cause"],
)
LOOP_THREAD_SECONDS = FastCounter(
    "streamscore_event_loop_thread_seconds_total",
    "The serving loop thread's time on a CPU (state=running) and ready but waiting "
    "for one (state=cpu_wait), from Linux schedstat.",
    ["state"],
)


def _open_schedstat() -> int | None:
    """The calling thread's schedstat file, open for ``pread``; None where missing."""
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if _read_schedstat(fd) is None:
        os.close(fd)
        return None
    return fd


def _read_schedstat(fd: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds waiting on a run queue) of the thread so far."""
    try:
        fields = os.pread(fd, 128, 0).split()
        return int(fields[0]) / 1e9, int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def split_lateness(lateness_s: float, cpu_wait_s: float) -> tuple[float, float]:
    """(busy, cpu_wait) parts of a probe's lateness, given the thread's run-queue wait
    since the last probe: the wait counts first, up to the lateness (the loop was not
    idle while late, so any time not waiting for a CPU was its own: running or
    blocked)."""
    lateness_s = max(0.0, lateness_s)
    waited = min(lateness_s, max(0.0, cpu_wait_s))
    return lateness_s - waited, waited


class LoopLagMonitor:
    """The probe as a part of the server: ``start`` on the loop to watch, ``stop``.

    The probe is a task that sleeps ``interval_s`` at a time (0: no probe); should it
    fail, it logs and the metrics stop moving (serving goes on)."""

    def __init__(self, interval_s: float) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self.interval_s = interval_s
        self.probes = 0
        self._task: asyncio.Task[None] | None = None
        self._schedstat: int | None = None

    async def start(self) -> None:
        if not self.interval_s:
            return
        # Opened on the loop's own thread: schedstat is per thread.
        self._schedstat = _open_schedstat()
        self._task = start_background(
            self._run(), name="loop-lag", log=log, failure="the event-loop lag probe stopped"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        fd, self._schedstat = self._schedstat, None
        if fd is not None:
            os.close(fd)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        lag = LOOP_LAG_SECONDS.labels()
        busy, cpu_wait = LOOP_LATE_SECONDS.labels("busy"), LOOP_LATE_SECONDS.labels("cpu_wait")
        running, waiting = (
            LOOP_THREAD_SECONDS.labels("running"),
            LOOP_THREAD_SECONDS.labels("cpu_wait"),
        )
        fd = self._schedstat
        last = _read_schedstat(fd) if fd is not None else None
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lateness = max(0.0, loop.time() - due)
            lag.observe(lateness)
            self.probes += 1
            now = _read_schedstat(fd) if fd is not None else None
            previous, last = last, now if now is not None else last
            if now is None or previous is None:
                continue  # no schedstat: the lag alone, its cause unknown
            ran, waited = now[0] - previous[0], now[1] - previous[1]
            running.inc(ran)
            waiting.inc(waited)
            late_busy, late_waiting = split_lateness(lateness, waited)
            busy.inc(late_busy)
            cpu_wait.inc(late_waiting)

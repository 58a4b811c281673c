"""Open-loop load: constant arrival rate, latency from the intended send time.

A closed-loop client (send, wait, send) slows down with the server and so hides its
worst moments (coordinated omission). Here request i is due at ``start + i / rate``
whatever happened before; its latency runs from that due time to the answer, so a
stall shows up in every request that should have been sent during it. Requests still
in flight beyond ``max_in_flight`` are counted as dropped, not queued forever; those
still unanswered ``drain_timeout`` seconds after the last send, as errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram


def describe_error(error: object) -> str:
    """One line for a failed call: the gRPC status and details, not the whole repr."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"[:300]
    return " ".join(str(error).split())[:300]


@dataclass
class LoadResult:
    offered_rate: float
    seconds: float
    ok: int
    errors: int
    dropped: int
    histogram: HdrHistogram  # microseconds
    unanswered: int = 0  # of the errors: calls cut off by the drain timeout

    @property
    def achieved_rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def ms(self, percentile: float) -> float:
        return self.histogram.get_value_at_percentile(percentile) / 1000

    def summary(self) -> str:
        return (
            f"offered {self.offered_rate:,.0f}/s achieved {self.achieved_rate:,.0f}/s  "
            f"p50 {self.ms(50):.2f}  p90 {self.ms(90):.2f}  p99 {self.ms(99):.2f}  "
            f"p99.9 {self.ms(99.9):.2f}  max {self.ms(100):.2f} ms  "
            f"errors {self.errors} dropped {self.dropped}"
        )


def requests_in(rate: float, seconds: float, clients: int = 1, index: int = 0) -> int:
    """Client ``index``'s share of the ``rate * seconds`` requests of a step, shared so
    that the shares add up to it (each client's own ``int()`` lost up to one request
    per client, which read as the server falling behind at low rates)."""
    total = round(rate * seconds)
    return total // clients + (index < total % clients)


async def open_loop(
    call: Callable[[int], Awaitable[object]],
    rate: float,
    seconds: float,
    *,
    max_in_flight: int = 512,
    total: int | None = None,
    drain_timeout: float = 30.0,
) -> LoadResult:
    """Call ``call(i)`` at ``rate`` per second for ``seconds`` (``total`` calls, by
    default ``rate * seconds``); latency per intended send. Calls still unanswered
    ``drain_timeout`` seconds after the last send are cancelled and counted as
    errors (they were counted nowhere, and a step passed with calls never answered)."""
    histogram = HdrHistogram(1, 60_000_000, 3)
    if total is None:
        total = requests_in(rate, seconds)
    ok = errors = dropped = 0
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = time.perf_counter()

    async def one(i: int, due: float) -> None:
        nonlocal ok, errors
        try:
            await call(i)
        except Exception:
            errors += 1
            return
        ok += 1
        histogram.record_value(max(1, int((time.perf_counter() - due) * 1e6)))

    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            dropped += 1
            continue
        task = loop.create_task(one(i, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    unanswered = 0
    if in_flight:
        await asyncio.wait(in_flight, timeout=drain_timeout)
        left = list(in_flight)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        unanswered = len(left)
    return LoadResult(
        rate,
        time.perf_counter() - start,
        ok,
        errors + unanswered,
        dropped,
        histogram,
        unanswered,
    )


async def closed_loop(
    call: Callable[[int], Awaitable[object]],
    in_flight: int,
    seconds: float,
    *,
    offset: int = 0,
) -> LoadResult:
    """Keep ``in_flight`` calls going for ``seconds``: each caller sends its next call
    when its last one ends (answered or failed). The throughput a server gives at that
    concurrency, as DESIGN.md's "QPS at 64 in flight" measures it. Not for latency
    under a load the server does not set: a closed loop waits for the server, so a
    stall delays the sends that would have seen it (``open_loop`` is for that); its
    latencies run from each actual send. ``offered_rate`` is 0: nothing is offered."""
    if in_flight < 1:
        raise ValueError("in_flight must be >= 1")
    histogram = HdrHistogram(1, 60_000_000, 3)
    ok = errors = 0
    start = time.perf_counter()
    end = start + seconds
    sent = offset

    async def caller() -> None:
        nonlocal ok, errors, sent
        while (now := time.perf_counter()) < end:
            i, sent = sent, sent + 1
            try:
                await call(i)
            except Exception:
                errors += 1
                continue
            ok += 1
            histogram.record_value(max(1, int((time.perf_counter() - now) * 1e6)))

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return LoadResult(0.0, time.perf_counter() - start, ok, errors, 0, histogram)

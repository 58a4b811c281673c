"""The event-loop lag probe (server/loop_lag.py): it records how late the loop ran it,
and splits that lateness into the loop's own work and waiting for a CPU."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamscore.config import Settings
from streamscore.server.app import ScoringServer
from streamscore.server.loop_lag import (
    LOOP_LAG_SECONDS,
    LOOP_LATE_SECONDS,
    LOOP_THREAD_SECONDS,
    LoopLagMonitor,
    _open_schedstat,
    split_lateness,
)

seconds = st.floats(min_value=-1.0, max_value=10.0, allow_nan=False)


@given(lateness=seconds, cpu_wait=seconds)
def test_split_lateness_parts_are_non_negative_and_add_up(lateness: float, cpu_wait: float) -> None:
    busy, waited = split_lateness(lateness, cpu_wait)
    assert busy >= 0 and waited >= 0
    assert busy + waited == pytest.approx(max(0.0, lateness))
    assert waited <= max(0.0, cpu_wait)


def test_split_lateness_examples() -> None:
    assert split_lateness(0.010, 0.003) == pytest.approx((0.007, 0.003))
    assert split_lateness(0.010, 0.050) == pytest.approx((0.0, 0.010))
    assert split_lateness(0.0, 0.050) == (0.0, 0.0)


def spin(seconds_: float) -> None:
    """Run on the CPU (not sleep) for ``seconds_`` of this thread's CPU time: on a
    loaded box a wall-clock spin runs only part of its time, so its lateness would be
    put down to CPU wait rather than to the loop's own work."""
    end = time.thread_time() + seconds_
    while time.thread_time() < end:
        pass


def late(cause: str) -> float:
    return LOOP_LATE_SECONDS.labels(cause).value


def test_the_probe_needs_a_non_negative_interval() -> None:
    with pytest.raises(ValueError):
        LoopLagMonitor(-0.01)


async def test_interval_zero_runs_no_probe() -> None:
    monitor = LoopLagMonitor(0)
    await monitor.start()
    await asyncio.sleep(0.05)
    await monitor.stop()
    assert monitor.probes == 0


async def test_a_loop_held_by_our_own_work_is_late_and_busy() -> None:
    lag = LOOP_LAG_SECONDS.labels()
    count_before, sum_before = sum(lag.counts), lag.sum
    busy_before = late("busy")
    monitor = LoopLagMonitor(0.01)
    await monitor.start()
    try:
        await asyncio.sleep(0.05)
        spin(0.2)  # a callback that holds the loop for 200 ms
        await asyncio.sleep(0.05)
    finally:
        await monitor.stop()
    assert monitor.probes >= 5
    assert sum(lag.counts) - count_before == monitor.probes
    # One probe was due during the spin and ran after it.
    assert lag.sum - sum_before >= 0.15
    if _open_schedstat() is not None:
        assert late("busy") - busy_before >= 0.15


def hog(cpu: int, seconds_: float, spinning: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    spinning.set()
    spin(seconds_)


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """This process on one CPU for the test (restored after)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, before)


async def test_a_loop_that_waits_for_a_cpu_is_late_by_cpu_wait(one_cpu: int) -> None:
    if _open_schedstat() is None:
        pytest.skip("no per-thread schedstat (not Linux, or schedstats off)")
    waited_before, ran_before = late("cpu_wait"), late("busy")
    running_before = LOOP_THREAD_SECONDS.labels("running").value
    thread_wait_before = LOOP_THREAD_SECONDS.labels("cpu_wait").value
    # Another process spins on the same CPU: while our loop spins too, the scheduler
    # shares the CPU, so about half of the loop's lateness is waiting for it.
    context = multiprocessing.get_context("spawn")
    spinning = context.Event()
    other = context.Process(target=hog, args=(one_cpu, 1.5, spinning))
    monitor = LoopLagMonitor(0.01)
    await monitor.start()
    other.start()
    try:
        # The hog is up and spinning (a fixed 0.5 s was not always enough for a spawned
        # process to start on a loaded CI box: the loop then had the CPU to itself).
        assert await asyncio.to_thread(spinning.wait, 30)
        spin(0.4)
        await asyncio.sleep(0.05)
    finally:
        await monitor.stop()
        other.join(timeout=10)
    waited, busy = late("cpu_wait") - waited_before, late("busy") - ran_before
    assert waited >= 0.1, f"cpu wait {waited:.3f} s, busy {busy:.3f} s"
    assert busy >= 0.1, f"cpu wait {waited:.3f} s, busy {busy:.3f} s"
    assert LOOP_THREAD_SECONDS.labels("running").value - running_before >= 0.1
    # The lateness put down to cpu wait is at most the thread's wait for a CPU (the
    # split bounds it by the run-queue wait). The two are float sums of different
    # parts, so equal amounts may differ by rounding: CI once failed this by 2e-16.
    thread_waited = LOOP_THREAD_SECONDS.labels("cpu_wait").value - thread_wait_before
    assert thread_waited >= waited - 1e-9, (thread_waited, waited)


async def test_a_server_whose_start_fails_leaves_no_probe_running(tmp_path: Path) -> None:
    server = ScoringServer(Settings(port=0, model_repository=tmp_path / "no-models"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the missing repository raises
        await server.start()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop-lag"]


async def test_a_running_server_probes_its_loop(trained_model: Path) -> None:
    server = ScoringServer(
        Settings(
            port=0,
            model_repository=trained_model,
            loop_lag_interval_s=0.01,
            model_reload_interval_s=0,
        )
    )
    await server.start()
    try:
        await asyncio.sleep(0.2)
        assert server.loop_lag.probes >= 5
    finally:
        await server.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop-lag"]

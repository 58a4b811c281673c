"""In-process model calls: cheap ones stay on the event loop, heavy ones leave it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streamscore.server.backends.offload import InlineOrThread


def burn(seconds: float) -> int:
    """Spend about ``seconds`` of CPU time on this thread; returns the thread's id."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return threading.get_ident()


async def test_cheap_calls_run_inline_once_measured() -> None:
    calls = InlineOrThread("cheap")
    loop_thread = threading.get_ident()
    first = await calls.call(lambda: burn(0))
    assert first != loop_thread  # unknown cost: the first call goes to the thread
    assert calls.inline
    assert [await calls.call(lambda: burn(0)) for _ in range(5)] == [loop_thread] * 5
    calls.close()


async def test_one_slow_call_does_not_send_a_cheap_model_away() -> None:
    """A pause inside one cheap call (a GC pass, a preemption) counts at most
    SPIKE_CAP x the limit: the model stays on the loop; a model that really turned
    heavy still leaves within about six calls."""
    calls = InlineOrThread("spiky", inline_limit_s=0.001)
    await calls.call(lambda: burn(0))
    assert calls.inline
    await calls.call(lambda: burn(0.05))  # 50x the limit, once
    assert calls.inline, calls.cost_s
    heavy_calls = 0
    while calls.inline:
        await calls.call(lambda: burn(0.005))
        heavy_calls += 1
    assert heavy_calls <= 7, heavy_calls
    calls.close()


async def test_heavy_calls_leave_the_loop_and_it_keeps_ticking() -> None:
    calls = InlineOrThread("heavy", inline_limit_s=0.001)
    await calls.call(lambda: burn(0))
    assert calls.inline
    # A model that turns heavy: the moving average crosses the limit within a few
    # calls, and from then on the loop stays free while the model computes.
    while calls.inline:
        await calls.call(lambda: burn(0.02))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    thread = await calls.call(lambda: burn(0.1))
    ticking.cancel()
    assert thread != threading.get_ident()
    assert ticks >= 10, ticks  # the loop ran during the 100 ms call
    calls.close()


async def test_a_call_that_blocks_the_loop_without_computing_leaves_it() -> None:
    """On the loop a call is timed by the wall clock: what the loop loses to it. One
    that waits (a sleep here; a kernel's own threads, I/O) costs the loop as much as
    one that computes, and its thread CPU time (near 0) would have kept it inline."""
    calls = InlineOrThread("waits", inline_limit_s=0.001)
    await calls.call(lambda: burn(0))
    assert calls.inline
    waits = 0
    while calls.inline:
        assert calls.call_inline(time.sleep, 0.005) is None  # sleep's own answer
        waits += 1
        assert waits <= 7, calls.cost_s
    assert calls.cost_s > calls.inline_limit_s
    calls.close()


async def test_a_model_heavy_on_some_inputs_leaves_the_loop_until_it_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cheap on most inputs, 20x the limit on one in five: its capped average stays
    under the limit, and each heavy call held the loop for all of it (audit AR). Once
    its heavy calls have taken 2 % of the last 10 s it goes to the thread; there it
    stays while it has heavy calls, and comes back once it has had none for a while.
    A few pauses do not send it: five 10 ms ones (0.5 % of 10 s) left it on the loop."""
    caplog.set_level("INFO", logger="streamscore.models")
    calls = InlineOrThread("sometimes", inline_limit_s=0.001)
    await calls.call(lambda: burn(0))
    assert calls.inline
    for _ in range(5):
        await calls.call(lambda: burn(0.01))
        for _ in range(10):
            await calls.call(lambda: burn(0))
    assert calls.inline, calls.cost_s
    loop_thread = threading.get_ident()
    ran_on = [await calls.call(lambda i=i: burn(0.02 if i % 5 == 4 else 0)) for i in range(100)]
    # Out of the loop by the 8th heavy call (with the pauses' 50 ms: 210 ms), never back.
    assert loop_thread not in ran_on[40:], ran_on.count(loop_thread)
    assert not calls.inline
    # Said once, when it left: not at each heavy call after.
    left = [r for r in caplog.records if "leave the event loop" in r.getMessage()]
    assert len(left) == 1, [r.getMessage() for r in left]
    cheap = 0
    while not calls.inline:
        await calls.call(lambda: burn(0))
        cheap += 1
        assert cheap <= 200, calls.cost_s
    assert cheap >= 50, cheap  # not at once: a while without heavy calls
    calls.close()

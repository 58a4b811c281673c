"""The circuit breaker's state machine on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamscore.server.breaker import CircuitBreaker, Pass

CALL = Pass(probe=False)  # a call let through while closed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_probes_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=3, cooldown_s=1.0, max_cooldown_s=4.0, clock=clock)
    for _ in range(2):
        breaker.record_failure(allowed(breaker))
    breaker.record_success(allowed(breaker))  # not consecutive: the count starts again
    for _ in range(3):
        breaker.record_failure(allowed(breaker))
    assert breaker.state == "open" and breaker.allow() is None
    clock.now += 1.0
    assert breaker.state == "half_open"
    probe = allowed(breaker)
    assert probe.probe
    assert breaker.allow() is None  # only one at a time
    breaker.record_failure(probe)  # probe failed: open for twice as long
    assert breaker.state == "open" and breaker.cooldown_s == 2.0
    clock.now += 1.5
    assert breaker.allow() is None
    clock.now += 0.5
    breaker.record_success(allowed(breaker))
    assert breaker.state == "closed" and breaker.cooldown_s == 1.0 and breaker.allow()
    assert breaker.times_opened == 2


def allowed(breaker: CircuitBreaker) -> Pass:
    passed = breaker.allow()
    assert passed is not None
    return passed


def test_calls_in_flight_when_it_opened_do_not_reopen_it() -> None:
    """A hung backend: the calls let through before the breaker opened fail after it
    did. Each counted as a failed probe, reopening it with a doubled cooldown (one 4 s
    stall of Triton: 7 openings, a 10 s cooldown at once; audit AI)."""
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=3, cooldown_s=1.0, max_cooldown_s=30.0, clock=clock)
    in_flight = [allowed(breaker) for _ in range(8)]  # all let through while closed
    for call in in_flight:  # then they all fail, one after another
        breaker.record_failure(call)
        clock.now += 0.05
    assert breaker.times_opened == 1 and breaker.cooldown_s == 1.0
    clock.now += 1.0
    probe = allowed(breaker)  # the probe, on time
    breaker.release(in_flight[0])  # an old call shed meanwhile does not free the probe's place
    assert breaker.allow() is None
    breaker.record_failure(probe)  # the probe's failure does reopen it, for longer
    assert breaker.times_opened == 2 and breaker.cooldown_s == 2.0


def test_a_released_or_lost_probe_is_replaced() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, cooldown_s=1.0, clock=clock)
    breaker.record_failure(CALL)
    clock.now += 1.0
    breaker.release(allowed(breaker))  # shed: tells nothing, another caller may probe
    lost = allowed(breaker)
    clock.now += 1.0  # that probe never came back: after a cooldown, a new one
    probe = allowed(breaker)
    breaker.record_failure(lost)  # the lost one's late failure is not the probe's
    assert breaker.times_opened == 1
    breaker.record_failure(probe)
    assert breaker.times_opened == 2


def test_cooldown_is_capped() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, cooldown_s=1.0, max_cooldown_s=3.0, clock=clock)
    breaker.record_failure(CALL)
    for _ in range(5):
        clock.now += breaker.cooldown_s
        breaker.record_failure(allowed(breaker))
    assert breaker.cooldown_s == 3.0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures_to_open=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=2.0, max_cooldown_s=1.0)


@given(
    st.lists(
        st.tuples(st.sampled_from(["ok", "fail", "release", "lost"]), st.floats(0, 3)),
        max_size=60,
    )
)
def test_while_open_at_most_one_probe_per_cooldown(steps: list[tuple[str, float]]) -> None:
    """Time passes between calls, and a probe may be lost (never reported): while open,
    no call goes through within a cooldown of the opening, nor within one of a probe
    still out; a probe that reports lets the next caller decide again."""
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=2, cooldown_s=1.0, max_cooldown_s=8.0, clock=clock)
    opened: tuple[float, float] | None = None  # (when, its cooldown), as seen from outside
    probe_out: tuple[float, float] | None = None  # a probe never reported: (when, cooldown)
    for outcome, wait in steps:
        clock.now += wait
        was_closed = breaker.state == "closed"
        passed = breaker.allow()
        allowed = passed is not None
        assert allowed or not was_closed  # closed always lets calls through
        if not was_closed:
            assert opened is not None
            if clock.now - opened[0] < opened[1]:
                assert not allowed  # open: within the cooldown of its opening
            if probe_out is not None and clock.now - probe_out[0] < probe_out[1]:
                assert not allowed  # a probe is out
        if allowed and not was_closed:
            # A probe is out: nobody else gets through until it reports or a cooldown passes.
            assert breaker.allow() is None
        if passed is not None and outcome != "lost":
            {"ok": breaker.record_success, "fail": breaker.record_failure}.get(
                outcome, breaker.release
            )(passed)
            probe_out = None
        elif allowed and not was_closed:
            probe_out = (clock.now, breaker.cooldown_s)
        if breaker.state == "closed":
            opened = probe_out = None
        elif opened is None or (allowed and outcome == "fail" and not was_closed):
            opened = (clock.now, breaker.cooldown_s)  # opened, or opened again for longer
            probe_out = None
        assert 1.0 <= breaker.cooldown_s <= 8.0

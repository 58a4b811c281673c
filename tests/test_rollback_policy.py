"""The automatic rollback rule (``rollout_stats.RollbackPolicy``), as pure logic."""

from __future__ import annotations

from streamscore.server.rollout_stats import LatencyErrorWindow, RollbackPolicy


def window(answers: list[tuple[float, bool]], size: int = 2000) -> LatencyErrorWindow:
    w = LatencyErrorWindow(size)
    for latency_s, ok in answers:
        w.add(latency_s, ok)
    return w


POLICY = RollbackPolicy(
    min_requests=200, max_error_rate_margin=0.02, max_p99_ratio=2.0, max_p99_margin_s=0.005
)
FAST = [(0.001, True)] * 300  # 1 ms p99, no errors


def test_nothing_is_decided_before_enough_candidate_answers() -> None:
    failing = window([(0.5, False)] * 199)
    assert POLICY.should_roll_back(window(FAST), failing) is None
    failing.add(0.5, False)
    assert POLICY.should_roll_back(window(FAST), failing) is not None


def test_errors_beyond_the_margin_roll_back() -> None:
    # 4 errors in 200 (2 %) is within the margin over a clean primary; 5 is not.
    within = window([(0.001, True)] * 196 + [(0.001, False)] * 4)
    beyond = window([(0.001, True)] * 195 + [(0.001, False)] * 5)
    assert POLICY.should_roll_back(window(FAST), within) is None
    reason = POLICY.should_roll_back(window(FAST), beyond)
    assert reason is not None and "error rate" in reason
    # With no primary answers at all the baseline is no errors.
    assert POLICY.should_roll_back(window([]), beyond) is not None


def test_latency_beyond_both_the_ratio_and_the_margin_rolls_back() -> None:
    # The primary's p99 is 1 ms: the limit is max(2 ms, 6 ms) = 6 ms.
    assert POLICY.should_roll_back(window(FAST), window([(0.0059, True)] * 200)) is None
    reason = POLICY.should_roll_back(window(FAST), window([(0.0061, True)] * 200))
    assert reason is not None and "p99" in reason


def test_the_latency_rule_needs_enough_primary_answers() -> None:
    """A p99 of a handful of primary answers is noise (one lucky fast answer would
    roll back a healthy canary at 100 %, where the primary gets no live traffic)."""
    slow = window([(0.05, True)] * 200)
    assert POLICY.should_roll_back(window([(0.001, True)] * 199), slow) is None
    assert POLICY.should_roll_back(window([(0.001, True)] * 200), slow) is not None

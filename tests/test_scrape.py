"""The load tools' /metrics reader (loadtest/scrape.py): sums over label sets and a
histogram quantile over the window between two scrapes."""

from __future__ import annotations

import pytest

from loadtest.scrape import histogram_quantile, parse, total

BEFORE = """
# TYPE lag_seconds histogram
lag_seconds_bucket{le="0.001"} 90.0
lag_seconds_bucket{le="0.01"} 100.0
lag_seconds_bucket{le="+Inf"} 100.0
lag_seconds_count 100.0
lag_seconds_sum 0.1
# TYPE calls_total counter
calls_total{rpc="Score",code="OK"} 5.0
calls_total{rpc="Score",code="CANCELLED"} 1.0
calls_total{rpc="GetFeatures",code="OK"} 7.0
"""
AFTER = """
# TYPE lag_seconds histogram
lag_seconds_bucket{le="0.001"} 100.0
lag_seconds_bucket{le="0.01"} 190.0
lag_seconds_bucket{le="+Inf"} 200.0
lag_seconds_count 200.0
lag_seconds_sum 1.5
"""


def test_total_sums_the_label_sets_that_match() -> None:
    samples = parse(BEFORE)
    assert total(samples, "calls_total", rpc="Score") == 6.0
    assert total(samples, "calls_total", rpc="Score", code="OK") == 5.0
    assert total(samples, "calls_total") == 13.0
    assert total(samples, "calls_total", default=0, rpc="ScoreStream") == 0
    with pytest.raises(KeyError):
        total(samples, "calls_total", rpc="ScoreStream")


def test_histogram_quantile_reads_only_the_window_between_scrapes() -> None:
    before, after = parse(BEFORE), parse(AFTER)
    # In the window: 10 observations <= 1 ms, 80 in (1, 10] ms, 10 above 10 ms.
    assert histogram_quantile(before, after, "lag_seconds", 0.05) == 0.001
    assert histogram_quantile(before, after, "lag_seconds", 0.5) == 0.01
    assert histogram_quantile(before, after, "lag_seconds", 0.99) == float("inf")
    # Over everything since the start, the p50 is still in the first bucket.
    assert histogram_quantile({}, before, "lag_seconds", 0.5) == 0.001
    # No observations in the window: no quantile.
    assert histogram_quantile(after, after, "lag_seconds", 0.99) is None
    assert histogram_quantile({}, after, "absent", 0.99) is None

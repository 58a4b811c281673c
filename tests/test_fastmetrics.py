"""The lock-free hot-path metrics expose exactly what prometheus_client's would."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from streamscore.server.fastmetrics import FastCounter, FastHistogram, Tally
from streamscore.server.metrics import LATENCY_BUCKETS_S

# Values around, on and beyond the bucket bounds (a bound itself belongs to its bucket).
values = st.one_of(
    st.sampled_from(LATENCY_BUCKETS_S),
    st.floats(min_value=0.0, max_value=2.0, allow_nan=False),
)
label = st.sampled_from(["a", "b"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(label, label, values), max_size=60))
def test_histogram_exposition_matches_prometheus_client(observations):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("t_seconds", "doc", ["x", "y"], buckets=LATENCY_BUCKETS_S, registry=ours)
    reference = Histogram(
        "t_seconds", "doc", ["x", "y"], buckets=LATENCY_BUCKETS_S, registry=theirs
    )
    for x, y, value in observations:
        fast.labels(x, y).observe(value)
        reference.labels(x, y).observe(value)
    assert _samples(ours) == _samples(theirs)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(values, max_size=30),
    st.sampled_from((*LATENCY_BUCKETS_S, 0.0, 1.0, 0.0042)),
    st.sampled_from((*LATENCY_BUCKETS_S, 0.0, 1.0, 7.5)),
    st.integers(min_value=0, max_value=50),
)
def test_a_tally_counts_as_observations_of_its_value_in_each_histogram(
    observations, first_value, second_value, tallied
):
    """One tally given to two histograms (as the batcher gives its batches of one to
    the size and queue-wait histograms) exposes, in each, what that many
    ``observe(value)`` calls would, beside the plain observations."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally()
    for name, value in (("first", first_value), ("second", second_value)):
        fast = FastHistogram(name, "doc", ["x"], buckets=LATENCY_BUCKETS_S, registry=ours)
        fast.labels("a").add_tally(tally, value)
        plain = Histogram(name, "doc", ["x"], buckets=LATENCY_BUCKETS_S, registry=theirs)
        plain.labels("a")  # a series from the start, as the tally's histogram has
        for observed in observations:
            fast.labels("a").observe(observed)
            plain.labels("a").observe(observed)
        for _ in range(tallied):
            plain.labels("a").observe(value)
    tally.count += tallied
    # Counts exactly; sums to rounding (n * value against n additions of it).
    ours_lines, theirs_lines = _samples(ours), _samples(theirs)
    assert [_name(line) for line in ours_lines] == [_name(line) for line in theirs_lines]
    for mine, reference in zip(ours_lines, theirs_lines, strict=True):
        if "_sum" in _name(mine):
            assert float(mine.split()[-1]) == pytest.approx(float(reference.split()[-1]))
        else:
            assert mine == reference


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(label, st.integers(min_value=1, max_value=5)), max_size=40))
def test_counter_exposition_matches_prometheus_client(increments):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("t_answers_total", "doc", ["x"], registry=ours)
    reference = Counter("t_answers_total", "doc", ["x"], registry=theirs)
    for x, amount in increments:
        fast.labels(x).inc(amount)
        reference.labels(x).inc(amount)
    assert _samples(ours) == _samples(theirs)


def test_wrong_label_count_and_unsorted_buckets_are_refused():
    registry = CollectorRegistry()
    histogram = FastHistogram("u_seconds", "doc", ["x"], buckets=(0.1, 1.0), registry=registry)
    try:
        histogram.labels("a", "b")
    except ValueError as error:
        assert "expected labels" in str(error)
    else:
        raise AssertionError("two label values for one label name were accepted")
    try:
        FastHistogram("v_seconds", "doc", [], buckets=(1.0, 0.1), registry=None)
    except ValueError as error:
        assert "increasing" in str(error)
    else:
        raise AssertionError("unsorted buckets were accepted")


def _name(line: str) -> str:
    return line.rsplit(" ", 1)[0]


def _samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without prometheus_client's creation-time series."""
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if "_created" not in line)

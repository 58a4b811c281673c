"""Synthetic traffic: determinism, schema, ordering, rates and fraud-pattern footprints."""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamscore.traffic import (
    DEFAULT_START_MS,
    LabelledEvent,
    TrafficConfig,
    TrafficGenerator,
    generate_log,
)

FIELDS = {
    "event_id": str, "event_time_ms": int, "card_id": str, "merchant_id": str,
    "device_id": str, "ip": str, "amount_minor": int, "currency": str, "mcc": str,
    "country": str, "status": str,
}  # fmt: skip
PATTERNS = {
    "mcc": re.compile(r"\d{4}"),
    "country": re.compile(r"[A-Z]{2}"),
    "currency": re.compile(r"[A-Z]{3}"),
    "card_id": re.compile(r"card-\d{6}"),
    "merchant_id": re.compile(r"m-\d{4,}"),
    "device_id": re.compile(r"dev-[0-9a-f]{12}"),
    "ip": re.compile(r"(10\.\d{1,3}\.\d{1,3}|203\.0\.113)\.\d{1,3}"),
}
MINUTE_MS = 60_000
RATE, LONG_S = 100, 300  # 5 minutes: ~30k events, under a second to generate


@pytest.fixture(scope="module")
def long_log() -> list[LabelledEvent]:
    return generate_log(TrafficConfig(rate_per_s=RATE), LONG_S)


@pytest.fixture(scope="module")
def fraud_log() -> list[LabelledEvent]:
    # More fraud and fewer normal events: many episodes of every pattern, quickly.
    return generate_log(TrafficConfig(rate_per_s=40, fraud_fraction=0.3, seed=3), 450)


def check_schema(events: Iterable[LabelledEvent]) -> None:
    for labelled in events:
        event = labelled.event
        assert set(event) == set(FIELDS)
        for name, kind in FIELDS.items():
            assert type(event[name]) is kind, (name, event)
        assert event["amount_minor"] >= 0
        assert event["status"] in ("approved", "declined")
        for name, pattern in PATTERNS.items():
            assert pattern.fullmatch(event[name]), (name, event)
        assert all(0 <= int(part) <= 255 for part in event["ip"].split("."))
        assert labelled.pattern in ("normal", "card_testing", "spree", "device_farm")
        assert labelled.is_fraud == (labelled.pattern != "normal")


def max_in_window(times_and_keys: list[tuple[int, str]], window_ms: int) -> int:
    """Most distinct keys seen within any ``window_ms`` span (input sorted by time)."""
    best, lo = 0, 0
    for hi in range(len(times_and_keys)):
        while times_and_keys[hi][0] - times_and_keys[lo][0] > window_ms:
            lo += 1
        best = max(best, len({key for _, key in times_and_keys[lo : hi + 1]}))
    return best


def by_entity(
    events: Iterable[LabelledEvent], entity: str, key: str
) -> dict[str, list[tuple[int, str]]]:
    grouped: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for labelled in events:
        event = labelled.event
        grouped[event[entity]].append((event["event_time_ms"], event[key]))
    return grouped


def test_same_seed_same_events_other_seed_other_events() -> None:
    def config(seed: int) -> TrafficConfig:
        return TrafficConfig(rate_per_s=100, n_cards=1000, fraud_fraction=0.1, seed=seed)

    first = generate_log(config(7), 30)
    assert first == generate_log(config(7), 30)
    assert [e.pattern for e in first].count("normal") < len(first)
    other = generate_log(config(8), 30)
    assert [e.event for e in other] != [e.event for e in first]


def test_windows_stream_and_log_agree() -> None:
    config = TrafficConfig(rate_per_s=100, n_cards=1000, fraud_fraction=0.1, start_ms=5_000_000)
    log = generate_log(config, 60)
    generator = TrafficGenerator(config)
    windows = [generator.events_between(t, t + 7_000) for t in range(5_000_000, 5_060_000, 7_000)]
    # The last window runs past the log's end; everything before the end must match.
    joined = [e for e in itertools.chain.from_iterable(windows)
              if e.event["event_time_ms"] < 5_060_000]  # fmt: skip
    assert joined == log
    streamed = list(itertools.takewhile(
        lambda e: e.event["event_time_ms"] < 5_060_000, TrafficGenerator(config).stream()
    ))  # fmt: skip
    assert streamed == log
    with pytest.raises(ValueError):
        generator.events_between(5_000_000, 6_000_000)  # goes back in time


def test_schema_unique_ids_and_order(long_log: list[LabelledEvent]) -> None:
    check_schema(long_log)
    ids = [e.event["event_id"] for e in long_log]
    assert len(set(ids)) == len(ids)
    times = [e.event["event_time_ms"] for e in long_log]
    assert times == sorted(times)
    assert DEFAULT_START_MS <= times[0] and times[-1] < DEFAULT_START_MS + LONG_S * 1000
    # Stream order is also the backfill's (event_time_ms, event_id) order.
    keys = [(e.event["event_time_ms"], e.event["event_id"]) for e in long_log]
    assert keys == sorted(keys)


def test_matches_the_event_parser(long_log: list[LabelledEvent]) -> None:
    events = pytest.importorskip("streamscore.stream.events")
    for labelled in long_log[:2000]:
        events.event_from_dict(labelled.event)  # raises InvalidEvent on any schema breach


def test_rate_and_skew(long_log: list[LabelledEvent]) -> None:
    expected = RATE * LONG_S
    assert abs(len(long_log) - expected) < 0.03 * expected
    normal = [e.event for e in long_log if e.pattern == "normal"]
    declined = sum(e["status"] == "declined" for e in normal) / len(normal)
    assert 0.015 < declined < 0.04
    # Skew: the busiest cards and merchants take far more than an even share.
    cards = Counter(e["card_id"] for e in normal)
    merchants = Counter(e["merchant_id"] for e in normal)
    assert cards.most_common(1)[0][1] > 5 * len(normal) / 5000
    top_merchants = sum(n for _, n in merchants.most_common(10))
    assert top_merchants > 0.2 * len(normal)  # 2% of merchants, over 20% of traffic
    # Normal traffic uses only the card's own 1-2 devices.
    devices = by_entity((e for e in long_log if e.pattern == "normal"), "card_id", "device_id")
    assert max(len({d for _, d in v}) for v in devices.values()) <= 2


def test_fraud_fraction(long_log: list[LabelledEvent], fraud_log: list[LabelledEvent]) -> None:
    # By construction: episode rate x mean episode size sums to the fraud event rate.
    rates = TrafficGenerator(TrafficConfig(n_cards=10)).rates_per_ms()
    sizes = {"card_testing": 2 * 19, "spree": 7, "device_farm": 14 * 1.5}
    fraud_per_ms = sum(rates[p] * size for p, size in sizes.items())
    assert fraud_per_ms == pytest.approx(0.02 * 200 / 1000)
    assert rates["normal"] == pytest.approx(0.98 * 200 / 1000)
    # Measured: fraud comes in episodes of tens of events, so a 5-minute window at 2%
    # holds only ~20 episodes and is noisy; the 30% log holds ~200 and is tight.
    fraction = sum(e.is_fraud for e in long_log) / len(long_log)
    assert 0.01 < fraction < 0.035
    fraction = sum(e.is_fraud for e in fraud_log) / len(fraud_log)
    assert 0.24 < fraction < 0.36
    patterns = Counter(e.pattern for e in fraud_log)
    fraud = len(fraud_log) - patterns["normal"]
    for pattern, share in (("card_testing", 0.4), ("spree", 0.3), ("device_farm", 0.3)):
        assert abs(patterns[pattern] / fraud - share) < 0.1, patterns
    none = generate_log(TrafficConfig(rate_per_s=100, n_cards=500, fraud_fraction=0.0), 60)
    assert not any(e.is_fraud for e in none)
    only = generate_log(TrafficConfig(rate_per_s=20, n_cards=500, fraud_fraction=1.0), 60)
    assert only and all(e.is_fraud for e in only)


def test_card_testing_signature(fraud_log: list[LabelledEvent]) -> None:
    def small_attempts(pattern: str) -> int:
        small = [e for e in fraud_log
                 if e.pattern == pattern and 50 <= e.event["amount_minor"] <= 300]  # fmt: skip
        grouped = by_entity(small, "card_id", "event_id")
        return max((max_in_window(v, 5 * MINUTE_MS) for v in grouped.values()), default=0)

    assert small_attempts("card_testing") >= 8
    assert small_attempts("normal") < 4  # small amounts are rare in normal traffic
    testing = [e.event for e in fraud_log if e.pattern == "card_testing"]
    assert sum(e["status"] == "declined" for e in testing) > 0.5 * len(testing)


def test_spree_signature(fraud_log: list[LabelledEvent]) -> None:
    own_devices = by_entity((e for e in fraud_log if e.pattern == "normal"), "card_id", "device_id")
    spree = [e for e in fraud_log if e.pattern == "spree"]
    by_card_device: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for labelled in spree:
        event = labelled.event
        key = (event["card_id"], event["device_id"])
        by_card_device[key].append((event["event_time_ms"], event["merchant_id"]))
    # A card at many distinct merchants within minutes, from a device it never used before.
    best = 0
    for (card, device), seen in by_card_device.items():
        assert device not in {d for _, d in own_devices.get(card, [])}
        best = max(best, max_in_window(seen, 10 * MINUTE_MS))
    assert best >= 6
    normal = [e.event["amount_minor"] for e in fraud_log if e.pattern == "normal"]
    spree_amounts = [e.event["amount_minor"] for e in spree]
    assert sorted(spree_amounts)[len(spree_amounts) // 2] > 3 * sorted(normal)[len(normal) // 2]


def test_device_farm_signature(fraud_log: list[LabelledEvent]) -> None:
    farm = [e for e in fraud_log if e.pattern == "device_farm"]
    normal = [e for e in fraud_log if e.pattern == "normal"]

    def most_cards(events: list[LabelledEvent], entity: str) -> int:
        grouped = by_entity(events, entity, "card_id")
        return max(max_in_window(v, 10 * MINUTE_MS) for v in grouped.values())

    assert most_cards(farm, "device_id") >= 8  # one device, many cards
    assert most_cards(farm, "ip") >= 8  # or one IP, many cards
    assert most_cards(normal, "device_id") == 1  # a normal device belongs to one card
    assert most_cards(normal, "ip") < 8  # a few cards may share a carrier NAT address


def test_bad_config_rejected() -> None:
    for bad in ({"rate_per_s": 0}, {"n_cards": 0}, {"fraud_fraction": 1.5},
                {"spree_share": -1.0}):  # fmt: skip
        with pytest.raises(ValueError):
            TrafficConfig(**bad)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_cards=st.integers(1, 50),
    n_merchants=st.integers(1, 20),
    fraud_fraction=st.floats(0.0, 1.0),
    start_ms=st.integers(0, 2 * 10**12),
)
def test_any_config_gives_valid_ordered_events(
    seed: int, n_cards: int, n_merchants: int, fraud_fraction: float, start_ms: int
) -> None:
    config = TrafficConfig(rate_per_s=20, n_cards=n_cards, n_merchants=n_merchants,
                           fraud_fraction=fraud_fraction, seed=seed, start_ms=start_ms)  # fmt: skip
    log = generate_log(config, 20)
    check_schema(log)
    times = [e.event["event_time_ms"] for e in log]
    assert times == sorted(times)
    assert all(start_ms <= t < start_ms + 20_000 for t in times)
    assert len({e.event["event_id"] for e in log}) == len(log)

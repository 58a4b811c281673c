"""Property tests: FeatureStore against the brute-force reference (tests/reference.py).

Random event logs with few entities (so they collide), many time ties, times on and
next to bucket edges, large amounts and exact re-deliveries are folded into a
``FeatureStore``; every feature of every entity is then compared with the reference
at several query times, and fold outcomes with the reference lateness/duplicate rule.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamscore.stream.state as state_module
from streamscore.stream.features import (
    DAY,
    DEFAULT_PACK,
    ENTITY_FIELD,
    ENTITY_TYPES,
    HOUR,
    MINUTE,
    SECOND,
    request_features,
)
from streamscore.stream.state import DEFAULT_LATENESS_MS, FeatureStore, Fold, FoldRecord

import reference

CARDS = ("c0", "c1", "c2", "c3")
MERCHANTS = ("m0", "m1", "m2")
DEVICES = ("d0", "d1", "d2")
IPS = ("i0", "i1")
ENTITY_IDS = {"card": CARDS, "merchant": MERCHANTS, "device": DEVICES, "ip": IPS}

# Every resolution of the pack divides an hour, so hour multiples are edges of all.
GRIDS = (5 * SECOND, 10 * SECOND, MINUTE, 15 * MINUTE, HOUR)
LONGEST_WINDOW = max(f.window_ms for f in DEFAULT_PACK)

BASE = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# --- strategies -----------------------------------------------------------------------


@st.composite
def event_logs(draw, lateness_ms: int = DEFAULT_LATENESS_MS, max_events: int = 40) -> list[dict]:
    """Distinct events followed by exact re-deliveries, in generation (not time) order.

    Times: on and next to bucket edges, ties, clusters, runs of consecutive buckets,
    and exactly (or 1 ms off) ``lateness_ms`` away from an earlier event, to hit the
    lateness boundary. Each log uses a prefix of each id pool, so entities collide and
    some entities hold more buckets than a short window spans."""
    base = draw(st.sampled_from([0, 1_700_000_000_000 // DAY * DAY, -3 * DAY, 12_345_678_901]))
    span = draw(st.sampled_from([10 * MINUTE, 2 * HOUR, 6 * HOUR, 3 * DAY, 8 * DAY]))
    n = draw(st.integers(1, max_events))
    pools = {
        name: ids[: draw(st.integers(1, len(ids)))]
        for name, ids in (("card_id", CARDS), ("merchant_id", MERCHANTS), ("device_id", DEVICES))
    }
    pools["ip"] = IPS
    events: list[dict] = []
    for i in range(n):
        kind = draw(st.sampled_from(["edge", "edge", "near", "step", "tie", "late", "any"]))
        if kind == "tie" and events:
            time_ms = draw(st.sampled_from([e["event_time_ms"] for e in events]))
        elif kind == "late" and events:
            time_ms = draw(st.sampled_from([e["event_time_ms"] for e in events]))
            time_ms += draw(st.sampled_from([-lateness_ms, -lateness_ms - 1, -lateness_ms + 1]))
        elif kind == "step" and events:  # the next 5 s or 10 s bucket
            time_ms = events[-1]["event_time_ms"] + draw(st.sampled_from([5, 10])) * SECOND
        elif kind == "near" and events:
            time_ms = events[-1]["event_time_ms"] + draw(st.integers(-3 * MINUTE, 3 * MINUTE))
        elif kind == "any":
            time_ms = base + draw(st.integers(0, span))
        else:
            grid = draw(st.sampled_from(GRIDS))
            k = draw(st.integers(0, span // grid))
            time_ms = base + k * grid + draw(st.sampled_from([0, 0, -1, 1]))
        amount = draw(
            st.one_of(
                st.integers(0, 1_000),
                st.integers(0, 10**9),
                st.sampled_from([0, 10**9 - 1, 10**9]),
                st.integers(10**9 - 3, 10**9),  # large, tiny variance: float moments fail
            )
        )
        ids = {name: draw(st.sampled_from(pool)) for name, pool in pools.items()}
        events.append(
            {
                "event_id": f"e{i}",
                "event_time_ms": time_ms,
                **ids,
                "amount_minor": amount,
                "status": draw(st.sampled_from(["approved", "approved", "declined"])),
                # The payments partition, keyed by card as producers key.
                "source": CARDS.index(ids["card_id"]) % 2,
            }
        )
    redelivered = draw(st.lists(st.sampled_from(events), max_size=n // 2 + 1))
    return events + [dict(e) for e in redelivered]


def delays(n: int, lateness_ms: int):
    """Per-event arrival delays in [0, lateness]: arriving at time + delay keeps every
    event within lateness of the newest already folded (for every entity)."""
    delay = st.one_of(st.just(0), st.just(lateness_ms), st.integers(0, lateness_ms))
    return st.lists(delay, min_size=n, max_size=n)


def bounded_order(events: list[dict], delay: list[int]) -> list[dict]:
    """Arrival order by ``time + delay``; ties keep generation order."""
    order = sorted(range(len(events)), key=lambda i: events[i]["event_time_ms"] + delay[i])
    return [events[i] for i in order]


# --- helpers --------------------------------------------------------------------------


def fold_record(event: dict) -> FoldRecord:
    return FoldRecord(
        event_id=event["event_id"],
        time_ms=event["event_time_ms"],
        amount=event["amount_minor"],
        declined=event["status"] == "declined",
        merchant_id=event["merchant_id"],
        card_id=event["card_id"],
        source=event.get("source", 0),
    )


def fold_all(arrivals: list[dict], lateness_ms: int = DEFAULT_LATENESS_MS):
    """Fold every event into all four entity types; returns the store and the outcomes
    per (entity type, entity id), in arrival order."""
    store = FeatureStore(fold_horizon_ms=lateness_ms)
    outcomes: dict[tuple[str, str], list[str]] = {}
    for event in arrivals:
        record = fold_record(event)
        for entity_type in ENTITY_TYPES:
            entity_id = event[ENTITY_FIELD[entity_type]]
            outcome = store.fold(entity_type, entity_id, record)
            outcomes.setdefault((entity_type, entity_id), []).append(outcome.value)
    return store, outcomes


def query_times(events: list[dict], lateness_ms: int, extra: list[int]) -> list[int]:
    """Query times the store must answer: t >= newest event time - lateness."""
    newest = max(e["event_time_ms"] for e in events)
    low = newest - lateness_ms
    edge = newest // HOUR * HOUR
    candidates = {
        low,
        low + 1,
        newest - 1,
        newest,
        newest + 1,
        edge,
        edge - 1,
        edge + HOUR,
        edge + HOUR - 1,
        newest + LONGEST_WINDOW,  # the 7-day windows still see the newest bucket or not
        newest + LONGEST_WINDOW + HOUR,  # beyond every window: all empty
        newest + 30 * DAY,
    }
    candidates |= {e["event_time_ms"] + d for e in events for d in (-1, 0)}
    candidates |= {low + x for x in extra}
    return sorted(t for t in candidates if t >= low)


def assert_features_equal(got: dict[str, float], want: dict[str, float], context: str) -> None:
    """Every value exactly the reference's: counts, sums, maxima and distinct counts
    are exact integers, means and rates one correctly rounded division, the std the
    correctly rounded root (``statistics.pstdev``)."""
    assert got.keys() == want.keys(), context
    for name, value in want.items():
        assert got[name] == value, f"{context}: {name} = {got[name]!r}, reference {value!r}"


def check_store(store: FeatureStore, accepted: dict, times: list[int]) -> None:
    for entity_type, ids in ENTITY_IDS.items():
        for entity_id in ids:
            kept = accepted.get((entity_type, entity_id), [])
            for t in times:
                got = store.features(entity_type, entity_id, t)
                want = reference.features(kept, entity_type, entity_id, t)
                assert_features_equal(got, want, f"{entity_type}={entity_id} t={t}")


# --- properties -----------------------------------------------------------------------


@settings(BASE, max_examples=120)
@given(data=st.data())
def test_store_matches_reference_in_any_arrival_order(data):
    """Any arrival order: TOO_LATE / DUPLICATE / APPLIED follow the per-entity rule, and
    every feature equals the reference over the events the rule accepts."""
    lateness_ms = data.draw(st.sampled_from([DEFAULT_LATENESS_MS, 10 * MINUTE]), "lateness")
    events = data.draw(event_logs(lateness_ms), "events")
    if data.draw(st.booleans(), "bounded"):
        arrivals = bounded_order(events, data.draw(delays(len(events), lateness_ms), "delays"))
    else:
        arrivals = data.draw(st.permutations(events), "arrivals")

    store, outcomes = fold_all(arrivals, lateness_ms)

    accepted = {}
    for entity_type, ids in ENTITY_IDS.items():
        for entity_id in ids:
            want = reference.fold_outcomes(arrivals, entity_type, entity_id, lateness_ms)
            got = outcomes.get((entity_type, entity_id), [])
            assert got == [o for _, o in want], f"outcomes of {entity_type}={entity_id}"
            accepted[(entity_type, entity_id)] = [e for e, o in want if o == reference.APPLIED]

    extra = data.draw(st.lists(st.integers(0, 2 * DAY), max_size=3), "extra times")
    check_store(store, accepted, query_times(events, lateness_ms, extra))


@settings(BASE, max_examples=80)
@given(data=st.data())
def test_arrival_order_within_lateness_changes_nothing(data):
    """Two arrival orders, each within lateness: nothing is too late, every distinct
    event counts once, and every feature of every entity is identical in both."""
    lateness_ms = DEFAULT_LATENESS_MS
    events = data.draw(event_logs(lateness_ms), "events")
    first = bounded_order(events, data.draw(delays(len(events), lateness_ms), "delays 1"))
    second = bounded_order(events, data.draw(delays(len(events), lateness_ms), "delays 2"))

    store_1, outcomes_1 = fold_all(first, lateness_ms)
    store_2, outcomes_2 = fold_all(second, lateness_ms)
    for outcomes in (outcomes_1, outcomes_2):
        flat = [o for per_entity in outcomes.values() for o in per_entity]
        assert reference.TOO_LATE not in flat
        distinct = len({e["event_id"] for e in events})
        assert flat.count(reference.APPLIED) == distinct * len(ENTITY_TYPES)

    times = query_times(events, lateness_ms, [])
    for entity_type, ids in ENTITY_IDS.items():
        for entity_id in ids:
            for t in times:
                one = store_1.features(entity_type, entity_id, t)
                two = store_2.features(entity_type, entity_id, t)
                assert one == two, f"{entity_type}={entity_id} t={t}"
                want = reference.features(events, entity_type, entity_id, t)
                assert_features_equal(one, want, f"{entity_type}={entity_id} t={t}")


@settings(BASE, max_examples=60)
@given(events=event_logs(max_events=30))
def test_replay_scores_each_event_before_ingesting_it(events):
    """Replay in (event_time_ms, event_id) order, reading every entity's features as of
    each event's time before folding it: the values equal the reference over the
    events strictly before it (the backfill's definition); request features too."""
    ordered = sorted(events, key=lambda e: (e["event_time_ms"], e["event_id"]))
    store = FeatureStore()
    for i, event in enumerate(ordered):
        t = event["event_time_ms"]
        before = ordered[:i]
        for entity_type in ENTITY_TYPES:
            entity_id = event[ENTITY_FIELD[entity_type]]
            got = store.features(entity_type, entity_id, t)
            want = reference.features(before, entity_type, entity_id, t)
            assert_features_equal(got, want, f"event {i} {entity_type}={entity_id}")
            if entity_type == "card":
                mean = got["card_amount_mean_7d"]
                got_request = request_features(event["amount_minor"], t, mean)
                want_request = reference.request_features(event["amount_minor"], t, mean)
                assert got_request == want_request
        record = fold_record(event)
        for entity_type in ENTITY_TYPES:
            store.fold(entity_type, event[ENTITY_FIELD[entity_type]], record)


@settings(BASE, max_examples=80)
@given(data=st.data())
def test_sweeping_idle_entities_changes_no_answer_and_counts_nothing_twice(data):
    """Sweep every idle entity after every fold: every answer the store gives exactly
    (t >= watermark - lateness) is unchanged, and no event is applied twice."""
    lateness_ms = data.draw(st.sampled_from([DEFAULT_LATENESS_MS, 10 * MINUTE]), "lateness")
    events = data.draw(event_logs(lateness_ms), "events")
    arrivals = bounded_order(events, data.draw(delays(len(events), lateness_ms), "delays"))
    plain, _ = fold_all(arrivals, lateness_ms)
    swept = FeatureStore(fold_horizon_ms=lateness_ms)
    applied: dict[tuple[str, str], set[str]] = {}
    sweeps = 0
    for event in arrivals:
        record = fold_record(event)
        for entity_type in ENTITY_TYPES:
            entity_id = event[ENTITY_FIELD[entity_type]]
            if swept.fold(entity_type, entity_id, record) is Fold.APPLIED:
                ids = applied.setdefault((entity_type, entity_id), set())
                assert event["event_id"] not in ids, "applied twice"
                ids.add(event["event_id"])
            sweeps += swept.sweep_idle(entity_type, list(swept.entities[entity_type]))
    assert swept.watermark_ms == max(e["event_time_ms"] for e in events)
    floor = swept.watermark_ms - lateness_ms
    extra = data.draw(st.lists(st.integers(0, 2 * DAY), max_size=3), "extra times")
    for entity_type, ids in ENTITY_IDS.items():
        for entity_id in ids:
            for t in query_times(events, lateness_ms, extra):
                assert t >= floor
                got = swept.features(entity_type, entity_id, t)
                assert got == plain.features(entity_type, entity_id, t), (
                    f"{entity_type}={entity_id} t={t} after {sweeps} sweeps"
                )


def test_sweep_keeps_newest_time_and_refuses_unverifiable_redeliveries():
    store = FeatureStore(fold_horizon_ms=10 * MINUTE, skew_ms=0)
    ip = dict(event_id="a", time_ms=0, amount=5, declined=False, merchant_id="m", card_id="c")
    store.fold("ip", "i", FoldRecord(**ip))
    later = {**ip, "event_id": "b", "time_ms": 3 * HOUR}
    store.fold("card", "c", FoldRecord(**later))  # moves the watermark only
    assert store.sweep_idle("ip", ["i"]) == 1  # 1 h window + 10 min: long idle
    assert store.get("ip", "i") is None
    # Its newest time and its count of events folded stay (GetFeatures reads them).
    assert store.summary("ip", "i") == (0, 1)
    t = 3 * HOUR
    assert store.features("ip", "i", t)["ip_txn_count_5m"] == 0.0
    assert store.earliest_exact_ms("ip", "i") == t - 10 * MINUTE
    # The redelivered old event cannot be checked against its dropped key: refused.
    assert store.fold("ip", "i", FoldRecord(**ip)) is Fold.TOO_LATE
    assert store.fold("ip", "i", FoldRecord(**later)) is Fold.APPLIED
    assert store.features("ip", "i", t)["ip_txn_count_5m"] == 1.0
    assert store.summary("ip", "i") == (3 * HOUR, 2)  # counted on, never down


# Steps from an event's time that stay in, or cross, the buckets of the pack's
# resolutions (5 and 10 s, 1, 15 and 60 min), then come back: the cache must serve
# the same values only while no bucket changed.
CACHE_PROBES_MS = (0, 4_999, 5_000, 9_999, 10_000, 59_999, 60_000, 900_000, 3_600_000, 0)


@settings(BASE, max_examples=60)
@given(
    events=event_logs(max_events=30),
    repeats=st.integers(1, 3),
    by_finest_bucket=st.booleans(),
)
def test_cached_feature_values_equal_the_reference(events, repeats, by_finest_bucket):
    """The per-entity cache of windowed values (normally only for busy entities), on
    for every entity: the replay above, with each entity read several times as of the
    same instant, as of later instants in and across buckets, and after each fold as
    of the next one, still equals the reference. ``by_finest_bucket``: the pack's
    resolutions nest, so the finest bucket of t keys the cache (``cache_grain``, their
    greatest common divisor); off, a finer common divisor (1 s) keys it, as a pack
    whose resolutions do not nest has its grain below all of them."""
    ordered = sorted(events, key=lambda e: (e["event_time_ms"], e["event_id"]))
    with mock.patch.object(state_module, "CACHE_MIN_FOLDED", 0):
        store = FeatureStore()
        for entity_type, layout in store.layouts.items():
            assert layout.cache_grain == min(layout.resolutions)
            if not by_finest_bucket:
                store.layouts[entity_type] = dataclasses.replace(layout, cache_grain=1000)
        for i, event in enumerate(ordered):
            t = event["event_time_ms"]
            before = ordered[:i]
            for entity_type in ENTITY_TYPES:
                entity_id = event[ENTITY_FIELD[entity_type]]
                for probe in CACHE_PROBES_MS:
                    want = reference.features(before, entity_type, entity_id, t + probe)
                    for _ in range(repeats):
                        got = store.features(entity_type, entity_id, t + probe)
                        where = f"event {i} {entity_type}={entity_id} t+{probe}"
                        assert_features_equal(got, want, where)
                        got["card_txn_count_1h"] = -5.0  # a caller's change never leaks back
            record = fold_record(event)
            for entity_type in ENTITY_TYPES:
                store.fold(entity_type, event[ENTITY_FIELD[entity_type]], record)


@settings(BASE, max_examples=80)
@given(data=st.data())
def test_compiled_tiles_give_the_python_twins_features_bit_for_bit(data):
    """The store on the compiled tiles and on their Python twin (``reference=True``)
    fold any arrival order to the same outcomes and answer every query with the same
    floats, bit for bit, amounts up to int64's limit included (their sums overflow 64
    bits)."""
    events = data.draw(event_logs(), "events")
    for event in events:
        if data.draw(st.integers(0, 4), "huge amount") == 0:
            event["amount_minor"] = data.draw(st.integers(2**62, 2**63 - 1), "amount")
    arrivals = data.draw(st.permutations(events), "arrivals")
    compiled, python = FeatureStore(), FeatureStore(reference=True)
    for event in arrivals:
        record = fold_record(event)
        for entity_type in ENTITY_TYPES:
            entity_id = event[ENTITY_FIELD[entity_type]]
            assert compiled.fold(entity_type, entity_id, record) == python.fold(
                entity_type, entity_id, record
            )
    for t in query_times(events, DEFAULT_LATENESS_MS, []):
        for entity_type, ids in ENTITY_IDS.items():
            for entity_id in ids:
                got = compiled.features(entity_type, entity_id, t)
                want = python.features(entity_type, entity_id, t)
                assert {k: repr(v) for k, v in got.items()} == {
                    k: repr(v) for k, v in want.items()
                }, f"{entity_type}={entity_id} t={t}"


def test_a_shared_entity_folds_partitions_routed_hours_apart() -> None:
    """A backlog routed a partition at a time: four hours of partition 0's events, then
    the same four hours of partition 1's. The merchant both feed folds every one (the
    fold horizon counts from each partition's newest, not the merchant's), and its
    values equal the reference's; a redelivery is still counted once."""
    horizon = 2 * HOUR
    events = [
        {
            "event_id": f"b{i:03d}",
            "event_time_ms": 1_700_000_000_000 + i * MINUTE,
            "card_id": f"card{i % 8}",
            "merchant_id": "shop",
            "device_id": f"d{i % 8}",
            "ip": f"ip{i % 8}",
            "amount_minor": 100 + i,
            "status": "approved",
            "source": i % 2,
        }
        for i in range(240)
    ]
    arrivals = [e for e in events if e["source"] == 0] + [e for e in events if e["source"] == 1]
    store, outcomes = fold_all(arrivals + arrivals[100:110], horizon)
    assert outcomes[("merchant", "shop")].count(Fold.APPLIED.value) == 240
    assert outcomes[("merchant", "shop")].count(Fold.DUPLICATE.value) == 10
    assert store.summary("merchant", "shop")[1] == 240
    last = events[-1]["event_time_ms"]
    for t in (last, last - 100 * MINUTE, last - 119 * MINUTE):
        assert store.features("merchant", "shop", t) == reference.features(
            events, "merchant", "shop", t
        ), t


def test_a_copy_past_the_fold_horizon_counts_again_whatever_came_between() -> None:
    """README: a copy of an event id more than the fold horizon later counts again. It
    did only when another event had come in between (ids are let go lazily, when a
    later event is folded); alone, it was taken for a duplicate."""
    horizon = 2 * HOUR
    t0 = 1_700_000_000_000

    def event(event_id: str, time_ms: int) -> dict:
        return {
            "event_id": event_id,
            "event_time_ms": time_ms,
            "card_id": "c",
            "merchant_id": "m",
            "device_id": "d",
            "ip": "i",
            "amount_minor": 100,
            "status": "approved",
        }

    alone = [event("A", t0), event("A", t0 + 3 * HOUR)]
    between = [event("A", t0), event("B", t0 + 150 * MINUTE), event("A", t0 + 3 * HOUR)]
    for log, count in ((alone, 2.0), (between, 3.0)):
        store, _ = fold_all(log, horizon)
        values = store.features("card", "c", t0 + 3 * HOUR + 1)
        assert values["card_txn_count_24h"] == count, log
        assert values["card_seconds_since_last"] == 0.001, log
    # Within the horizon a copy is a duplicate, whatever its time.
    store, outcomes = fold_all([event("A", t0), event("A", t0 + HOUR)], horizon)
    assert outcomes[("card", "c")] == [Fold.APPLIED.value, Fold.DUPLICATE.value]

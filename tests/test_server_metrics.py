"""The gauges the server collector reads at scrape time from the live parts."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from streamscore.server.collector import ServerCollector
from streamscore.server.metrics import ScoreMetrics
from streamscore.stream.state import FeatureStore, FoldRecord

HOUR = 3_600_000


def test_fold_outcomes_are_exposed_per_outcome() -> None:
    """Applied, duplicate and too-late folds each have a series, so an entity refusing
    an entry (partitions far apart in event time) is visible, not silent."""
    store = FeatureStore()

    def fold(event_id: str, time_ms: int) -> None:
        store.fold("merchant", "m1", FoldRecord(event_id, time_ms, 100, False, "m1", "c1"))

    fold("e1", 10 * HOUR)
    fold("e1", 10 * HOUR)  # a redelivery
    fold("e2", 13 * HOUR)
    fold("e3", 10 * HOUR)  # three hours behind the merchant's newest: past the 2 h horizon
    lines = scrape(store)
    assert 'streamscore_replica_fold_outcomes_total{outcome="applied"} 2.0' in lines
    assert 'streamscore_replica_fold_outcomes_total{outcome="duplicate"} 1.0' in lines
    assert 'streamscore_replica_fold_outcomes_total{outcome="too_late"} 1.0' in lines
    assert "# TYPE streamscore_replica_fold_outcomes_total counter" in lines  # only grows
    assert 'streamscore_decisions_total{outcome="published"} 7.0' in lines
    assert 'streamscore_decisions_total{outcome="failed"} 2.0' in lines
    assert "streamscore_decisions_queued 3.0" in lines


def test_idle_entities_swept_and_kept_are_exposed() -> None:
    """Swept entities are kept (their newest event time) for the process's life: the
    count is what an operator watches for that memory."""
    store = FeatureStore()
    store.fold("merchant", "m1", FoldRecord("e1", 10 * HOUR, 100, False, "m1", "c1"))
    later = 10 * HOUR + 9 * 24 * HOUR  # past every window of m1's newest event
    store.fold("card", "c1", FoldRecord("e2", later, 100, False, "m1", "c1"))
    assert store.sweep_idle("merchant", ["m1"]) == 1
    lines = scrape(store, entities_swept=1)
    assert "streamscore_entities 1.0" in lines
    assert "streamscore_entities_idle 1.0" in lines
    assert "streamscore_replica_entities_swept_total 1.0" in lines


def scrape(store: FeatureStore, **replica_values: object) -> list[str]:
    """The collector's lines for a server on ``store``, its replica's values given."""
    replica = SimpleNamespace(
        entries_folded=4,
        bad_records=0,
        seconds_since_fetch=lambda: 0.1,
        lag=lambda: 0,
        caught_up=True,
        fetching_lean=True,
        lean_fallbacks=0,
        log_resets=0,
        entities_swept=0,
    )
    vars(replica).update(replica_values)
    server = SimpleNamespace(
        rollouts=None,
        decisions=SimpleNamespace(published=7, dropped=1, failed=2, queued=3),
        models=SimpleNamespace(loaded=list, reloads=0, reload_failures=0),
        service=None,
        replica=replica,
        store=store,
    )
    registry = CollectorRegistry()
    registry.register(ServerCollector(server))
    return generate_latest(registry).decode().splitlines()


def test_degraded_and_answer_series_are_exported_before_the_first_one() -> None:
    """An alert on rate() of a series that does not exist sees no data, not 0: the
    known reasons and the primary's decisions are exported at 0 from the start."""
    ScoreMetrics()
    for reason in ("FEATURES_STALE", "FALLBACK_MODEL", "DEADLINE_FALLBACK"):
        sample = {"reason": reason}
        assert REGISTRY.get_sample_value("streamscore_degraded_answers_total", sample) is not None
    for decision in ("APPROVE", "REVIEW", "DECLINE"):
        labels = {"variant": "primary", "decision": decision}
        assert REGISTRY.get_sample_value("streamscore_answers_total", labels) is not None

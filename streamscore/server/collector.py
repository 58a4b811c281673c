"""Gauges and counters read at scrape time from the live server (``/metrics``).

Pulled, not pushed: nothing on the Score path updates them, and a scrape sees the
same numbers as ``streamscore rollout show``. Runs on prometheus_client's HTTP thread,
never on the event loop: each part reads what the loop keeps (over copies made in C
where the loop may change it meanwhile).
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from streamscore.server.app import ScoringServer
    from streamscore.server.decisions import DecisionLog
    from streamscore.server.repository import ModelRegistry
    from streamscore.server.rollout import RolloutManager
    from streamscore.server.scoring import ScoringService
    from streamscore.stream.replica import FeatureReplica
    from streamscore.stream.state import FeatureStore


class ServerCollector:
    """The rollout's comparisons, the decision log, each loaded version (drift,
    breaker, what computes it), the GC's frozen objects, calls in flight, and the
    feature replica and store."""

    def __init__(self, server: ScoringServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        parts: list[Iterator[Metric]] = [_version_metrics(server.models), _gc_metrics()]
        if server.rollouts is not None:
            parts.append(_rollout_metrics(server.rollouts))
        if server.decisions is not None:
            parts.append(_decision_metrics(server.decisions))
        if server.service is not None:
            parts.append(_rpc_metrics(server.service))
        if server.replica is not None:
            parts.append(_replica_metrics(server.replica, server.store))
        return itertools.chain.from_iterable(parts)


def _rollout_metrics(rollouts: RolloutManager) -> Iterator[Metric]:
    stats = GaugeMetricFamily(
        "streamscore_rollout_candidate",
        "Candidate (canary/shadow) vs primary: agreement, score diff, PSI, p99, errors.",
        labels=["version", "variant", "stat"],
    )
    for version, variant, values in rollouts.candidate_stats():
        for name, value in values.items():
            stats.add_metric([version, variant, name], value)
    yield stats
    yield _gauge(
        "streamscore_rollout_canary_percent",
        "Percent of cards sent to the canary.",
        rollouts.state.canary_percent,
    )
    yield _counter(
        "streamscore_rollout_rollbacks",
        "Canary rollbacks made by this process (manual and automatic).",
        rollouts.rollbacks_made,
    )
    yield _counter(
        "streamscore_shadow_dropped",
        "Shadow requests dropped (queue full).",
        rollouts.shadow_dropped,
    )


def _decision_metrics(decisions: DecisionLog) -> Iterator[Metric]:
    published = CounterMetricFamily(
        "streamscore_decisions",
        "Decisions for the decision log, by outcome: published; dropped (the "
        "queue was full, or the log had stopped); failed (a publish failed; its "
        "batch is retried, so a decision can be published after failing).",
        labels=["outcome"],
    )
    for outcome in ("published", "dropped", "failed"):
        published.add_metric([outcome], getattr(decisions, outcome))
    yield published
    yield _gauge(
        "streamscore_decisions_queued",
        "Decisions recorded and not yet published (grows while the broker is down; "
        "dropped past the queue's bound, and at a stop that could not publish them).",
        decisions.queued,
    )


def _version_metrics(registry: ModelRegistry) -> Iterator[Metric]:
    yield _counter(
        "streamscore_model_reloads",
        "Versions loaded and swapped in while serving (a new version published, or one "
        "replaced in place).",
        registry.reloads,
    )
    yield _counter(
        "streamscore_model_reload_failures",
        "Versions published or replaced that failed to load while serving (the one "
        "loaded before still answers; the reason is logged): alert on its increase.",
        registry.reload_failures,
    )
    drift = GaugeMetricFamily(
        "streamscore_drift_psi",
        'PSI of each input feature and of the score (feature="score") over the '
        "version's recent requests, against its training baseline.",
        labels=["version", "feature"],
    )
    breaker_open = GaugeMetricFamily(
        "streamscore_backend_breaker_open",
        "1 while a version's circuit breaker sends its calls to the fallback.",
        labels=["version"],
    )
    breaker_opened = CounterMetricFamily(
        "streamscore_backend_breaker_openings",
        "Times a version's circuit breaker opened.",
        labels=["version"],
    )
    compute = GaugeMetricFamily(
        "streamscore_model_compute_info",
        "1 per loaded version: its backend, and what computes its small batches "
        '(compute="dense": the compiled dense kernel; otherwise the backend itself).',
        labels=["version", "backend", "compute"],
    )
    for name, version in registry.loaded():
        try:
            served = registry.get(name, version)
        except KeyError:  # unloaded on the loop since it was listed
            continue
        backend = served.backend
        compute.add_metric([version, backend.kind, getattr(backend, "compute", backend.kind)], 1.0)
        if served.drift is not None:
            for feature, value in served.drift.psi().items():
                drift.add_metric([version, feature], value)
        breaker_open.add_metric([version], float(served.breaker.state != "closed"))
        breaker_opened.add_metric([version], served.breaker.times_opened)
    yield from (compute, drift, breaker_open, breaker_opened)


def _gc_metrics() -> Iterator[Metric]:
    yield _gauge(
        "streamscore_gc_frozen_objects",
        "Objects in the garbage collector's permanent generation, which no collection "
        "traverses (the frozen feature state; server/gc_policy.py).",
        gc.get_freeze_count(),
    )


def _rpc_metrics(service: ScoringService) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily(
        "streamscore_rpc_in_flight",
        "Calls being handled (a ScoreStream counts once).",
        labels=["rpc"],
    )
    for rpc, rpc_metrics in service.rpc_metrics.items():
        in_flight.add_metric([rpc], rpc_metrics.in_flight)
    yield in_flight


def _replica_metrics(replica: FeatureReplica, store: FeatureStore) -> Iterator[Metric]:
    for name, help_, count in (
        ("streamscore_replica_entries_folded", "Fold entries folded.", replica.entries_folded),
        (
            "streamscore_replica_bad_records",
            "Unreadable entity-events records.",
            replica.bad_records,
        ),
        (
            "streamscore_replica_entities_swept",
            "Entities idle past every window, swept out of memory to their newest "
            "event time (streamscore_entities_idle holds what is left of them).",
            replica.entities_swept,
        ),
        (
            "streamscore_replica_log_resets",
            "Partitions found with a log end behind what was folded (the broker lost "
            "its log): folded again from the new log's start.",
            replica.log_resets,
        ),
        (
            "streamscore_replica_lean_fallbacks",
            "Times the replica's lean fetch met an unclean answer and handed "
            "fetching back to the consumer (tried again 30 s later).",
            replica.lean_fallbacks,
        ),
    ):
        yield _counter(name, help_, count)
    for name, help_, value in (
        (
            "streamscore_replica_seconds_since_fetch",
            "Feature freshness: seconds since the broker last answered a fetch "
            "for every partition.",
            replica.seconds_since_fetch(),
        ),
        (
            "streamscore_replica_lag_records",
            "Consumer lag: entity-events records in the log not folded yet.",
            replica.lag(),
        ),
        (
            "streamscore_replica_caught_up",
            "1 once the replica reached the log end seen at start.",
            float(replica.caught_up),
        ),
        (
            "streamscore_replica_fetching_lean",
            "1 while the replica fetches with its own Fetch requests "
            "(kafka_lean_fetch), 0 while the consumer's fetcher does.",
            float(replica.fetching_lean),
        ),
        ("streamscore_entities", "Entities held in memory.", len(store)),
        (
            "streamscore_entities_idle",
            "Entities swept as idle, kept as their newest event time and count "
            "(about 180 bytes each, for the process's life).",
            store.idle_count(),
        ),
    ):
        yield _gauge(name, help_, value)
    outcomes = CounterMetricFamily(
        "streamscore_replica_fold_outcomes",
        "Events folded into one entity each, by outcome: applied; duplicate (a "
        "redelivery); too_late (older than the entity's newest event from its "
        "partition minus fold_horizon_ms, which only payments partitions that "
        'far apart in event time can send: README, "Partitions far apart").',
        labels=["outcome"],
    )
    for outcome, count in store.counts.items():
        outcomes.add_metric([outcome.value], float(count))
    yield outcomes


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_)
    family.add_metric([], float(value))
    return family


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    """A count that only grows, exported as a counter (``name`` + ``_total``)."""
    family = CounterMetricFamily(name, help_)
    family.add_metric([], float(value))
    return family

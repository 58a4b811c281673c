"""Prometheus metrics of the serving process: per RPC, per stage, the batcher's, and
gauges of the server.

Defined once, at import, on the default registry; batcher series carry the ``model``
label (the batcher's name), so several batchers share these objects. Buckets are sized
for a sub-millisecond hot path: 25 µs to 1 s for times, powers of two for batch sizes.
Hot-path series are ``fastmetrics`` ones: lock-free, observed on the event loop only,
and their ``labels()`` is one dict lookup. Rare events (sheds, failures) stay
prometheus_client counters, bound to their labels once by their users.
"""

from __future__ import annotations

import collections
import contextlib

from prometheus_client import Counter

from streamscore.server.fastmetrics import CounterChild, FastCounter, FastHistogram, HistogramChild

# 25 µs .. 1 s, roughly x2 per step with extra resolution around 0.1-5 ms.
LATENCY_BUCKETS_S = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

BATCH_SIZE = FastHistogram(
    "streamscore_batch_size",
    "Requests per backend call (after shedding and cancellations).",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
)
BATCH_QUEUE_WAIT = FastHistogram(
    "streamscore_batch_queue_wait_seconds",
    "Time from a request's arrival in the batcher to the start of its backend call.",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
BACKEND_SECONDS = FastHistogram(
    "streamscore_backend_seconds",
    "Duration of one backend call (one batch), failures included.",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
SHED_REASONS = (
    "queue_full",
    "overloaded",
    "deadline_submit",
    "deadline_queue",
    "deadline_dispatch",
    "deadline_in_flight",
    "stopped",
    "backend_failed",
)
SHED_REQUESTS = Counter(
    "streamscore_batch_shed_requests_total",
    "Requests the batcher answered without a score, by reason.",
    ["model", "reason"],
)
# before_model: left the queue or the batch before the call.
CANCEL_STAGES = ("before_model", "during_model")
CANCELLED_REQUESTS = Counter(
    "streamscore_batch_cancelled_requests_total",
    "Requests whose caller went away, by the stage they were at.",
    ["model", "stage"],
)
LATE_RESULTS = Counter(
    "streamscore_batch_late_results_total",
    "Scores computed after their request's deadline and therefore discarded.",
    ["model"],
)
# error: the backend raised; wrong_count: result shape != batch size.
FAILURE_KINDS = ("error", "wrong_count")
BACKEND_FAILURES = Counter(
    "streamscore_backend_failures_total",
    "Failed backend calls (each fails every request of its batch), by kind.",
    ["model", "kind"],
)
# Batchers holding each model label's series: a version's series leave /metrics with
# its last batcher (a hot reload of one version runs two for a moment), else every
# version ever loaded kept ~84 series until a restart.
_MODEL_SERIES_USERS: collections.Counter[str] = collections.Counter()


def hold_model_series(model: str) -> None:
    _MODEL_SERIES_USERS[model] += 1


def release_model_series(model: str) -> None:
    """One batcher of ``model`` stopped; with the last, its series go."""
    _MODEL_SERIES_USERS[model] -= 1
    if _MODEL_SERIES_USERS[model] > 0:
        return
    del _MODEL_SERIES_USERS[model]
    for histogram in (BATCH_SIZE, BATCH_QUEUE_WAIT, BACKEND_SECONDS):
        histogram.remove(model)
    labels = [
        (LATE_RESULTS, ()),
        *((SHED_REQUESTS, (reason,)) for reason in SHED_REASONS),
        *((CANCELLED_REQUESTS, (stage,)) for stage in CANCEL_STAGES),
        *((BACKEND_FAILURES, (kind,)) for kind in FAILURE_KINDS),
    ]
    for counter, rest in labels:
        with contextlib.suppress(KeyError):  # never used
            counter.remove(model, *rest)


# generation: 0, 1, 2. Observed from gc.callbacks, in whichever thread collects:
# lock-free is safe there (collections never overlap, so neither do observations),
# and a lock would deadlock when a collection starts inside its own observe.
GC_PAUSE_SECONDS = FastHistogram(
    "streamscore_gc_pause_seconds",
    "Pauses of the cyclic garbage collector (every thread of the process waits), by "
    "generation collected.",
    ["generation"],
    buckets=(*LATENCY_BUCKETS_S, 2.5, 5.0, 10.0),
)


RPC_SECONDS = FastHistogram(
    "streamscore_rpc_seconds",
    "Server time per call (per message for ScoreStream), by RPC and status code; "
    "_count is the number of calls.",
    ["rpc", "code"],
    buckets=LATENCY_BUCKETS_S,
)
# stage: features (assembly from the feature store), model (batcher queue + backend
# call, or the fallback); variant: primary, canary.
STAGE_SECONDS = FastHistogram(
    "streamscore_stage_seconds",
    "Score time per stage and variant.",
    ["stage", "variant"],
    buckets=LATENCY_BUCKETS_S,
)
ANSWERS = FastCounter(
    "streamscore_answers_total",
    "Scores answered, by variant and decision.",
    ["variant", "decision"],
)
# reason: FEATURES_STALE, FALLBACK_MODEL, DEADLINE_FALLBACK.
DEGRADED = FastCounter(
    "streamscore_degraded_answers_total", "Degraded answers, by reason.", ["reason"]
)


class RpcMetrics:
    """One RPC's series; ``in_flight`` is a plain count, read by the drain and, at
    scrape time, by ``collector.ServerCollector`` (``streamscore_rpc_in_flight``)."""

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self.in_flight = 0
        # Its histogram by status code, found once per code rather than per call.
        self._seconds: dict[str, HistogramChild] = {}

    def enter(self) -> None:
        self.in_flight += 1

    def exit(self) -> None:
        self.in_flight -= 1

    def observe(self, code: str, seconds: float) -> None:
        child = self._seconds.get(code)
        if child is None:
            child = self._seconds[code] = RPC_SECONDS.labels(self.rpc, code)
        child.observe(seconds)


class ScoreMetrics:
    """Per answered score: stage times, decision and degradation counts."""

    def __init__(self) -> None:
        # (features time, model time, answers) by (variant, decision), found once.
        self._series: dict[tuple[str, str], tuple[HistogramChild, HistogramChild, CounterChild]]
        self._series = {}
        # Every known series exported from the start, at 0: an alert on rate() or
        # increase() sees 0, not "no data", until the first degraded answer.
        for reason in ("FEATURES_STALE", "FALLBACK_MODEL", "DEADLINE_FALLBACK"):
            DEGRADED.labels(reason)
        for decision in ("APPROVE", "REVIEW", "DECLINE"):
            ANSWERS.labels("primary", decision)

    def observe(
        self,
        variant: str,
        decision: str,
        features_s: float,
        model_s: float,
        degraded: list[str],
    ) -> None:
        series = self._series.get((variant, decision))
        if series is None:
            series = self._series[(variant, decision)] = (
                STAGE_SECONDS.labels("features", variant),
                STAGE_SECONDS.labels("model", variant),
                ANSWERS.labels(variant, decision),
            )
        features, model, answers = series
        features.observe(features_s)
        model.observe(model_s)
        answers.inc()
        for reason in degraded:
            DEGRADED.labels(reason).inc()

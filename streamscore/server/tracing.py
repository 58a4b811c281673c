"""Optional OpenTelemetry spans for Score: one span per request with a child span per
stage (features, model), parented to the caller's trace when its gRPC metadata
carries one (W3C ``traceparent``).

Off by default (``tracing = false``); when on, spans go to the global tracer provider,
which the deployment configures (``opentelemetry-instrument``, or the SDK with an
exporter of its choice). Needs ``opentelemetry-api`` (``pip install
'streamscore[otel]'``); without it, turning tracing on is an error at start.

The stages are timed anyway (``Timings`` in the response), so the spans are made
after the fact from those timestamps: nothing is added to the hot path but one
``is None`` check when tracing is off, and no context is entered or left per stage
when it is on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

__all__ = ["ScoreTracer"]


class ScoreTracer:
    def __init__(self) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ValueError(
                "tracing needs opentelemetry-api: pip install 'streamscore[otel]'"
            ) from error
        self._trace = trace
        self._propagate = propagate
        self._tracer = trace.get_tracer("streamscore")

    def parent(self, metadata: Iterable[tuple[str, Any]] | None) -> Any:
        """The caller's trace context from its gRPC metadata (None without one)."""
        if not metadata:
            return None
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        return self._propagate.extract(carrier) if carrier else None

    def record(
        self,
        parent: Any,
        attributes: dict[str, Any],
        started_ns: int,
        features_started_ns: int,
        features_done_ns: int,
        model_done_ns: int,
        ended_ns: int,
    ) -> None:
        """Spans from ``time.perf_counter_ns`` stamps taken while serving: the call's
        from its start, its stages from theirs (a unary call's wait in its row, before
        its features, is in the call's span only)."""
        to_epoch = time.time_ns() - time.perf_counter_ns()
        root = self._tracer.start_span(
            "streamscore.Score",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=started_ns + to_epoch,
        )
        inside = self._trace.set_span_in_context(root)
        for name, start, end in (
            ("features", features_started_ns, features_done_ns),
            ("model", features_done_ns, model_done_ns),
        ):
            stage = self._tracer.start_span(name, context=inside, start_time=start + to_epoch)
            stage.end(end_time=end + to_epoch)
        root.end(end_time=ended_ns + to_epoch)

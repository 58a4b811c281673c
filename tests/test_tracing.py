"""OpenTelemetry: with tracing on, each Score makes a server span (child of the
caller's trace) with the features and model stages as child spans."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.server.app import ScoringServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_score_spans_follow_the_callers_trace(trained_model: Path, tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    server = ScoringServer(
        Settings(port=0, model_repository=repository, model_reload_interval_s=0, tracing=True)
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            request = pb.ScoreRequest(
                request_id="traced-1",
                transaction=pb.Transaction(card_id="c-1", merchant_id="m-1", amount_minor=100),
            )
            reply = await stub.Score(request, metadata=(("traceparent", TRACEPARENT),), timeout=5)
            untraced = await stub.Score(request, timeout=5)
    finally:
        await server.stop()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "streamscore.Score"]
    assert len(roots) == 2
    traced = next(s for s in roots if format(s.context.trace_id, "032x") == TRACE_ID)
    assert traced.parent is not None and traced.kind == trace.SpanKind.SERVER
    assert traced.attributes["streamscore.request_id"] == "traced-1"
    assert traced.attributes["streamscore.decision"] == pb.Decision.Name(reply.decision)
    stages = {s.name: s for s in spans if s.parent and s.parent.span_id == traced.context.span_id}
    assert set(stages) == {"features", "model"}
    assert traced.start_time <= stages["features"].start_time <= stages["features"].end_time
    assert stages["features"].end_time <= stages["model"].start_time + 1
    assert stages["model"].end_time <= traced.end_time
    # Without a traceparent the request starts its own trace.
    other = next(s for s in roots if s is not traced)
    assert other.parent is None and untraced.request_id == "traced-1"

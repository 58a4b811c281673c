"""The gRPC server in process, over real gRPC on loopback, without Kafka.

Feature state is folded straight into the server's store, so these tests pin down
the API behaviour (validation, replay mode, decisions, streaming) independently of
the stream pipeline, which the end-to-end test covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.loopback_process import find_free_port
from streamscore.server.app import ScoringServer, _listen
from streamscore.server.backends.onnx_backend import OnnxBackend
from streamscore.server.errors import InvalidRequest
from streamscore.server.model import ModelMetadata, Thresholds, latest_version
from streamscore.server.scoring import READ_AHEAD_TASK, STREAM_READ_AHEAD
from streamscore.server.validation import MAX_ID_LENGTH, validate_score_request
from streamscore.server.wire import parse_score_request
from streamscore.stream.backfill import fold_event
from streamscore.stream.events import event_from_dict
from streamscore.stream.features import MINUTE

import reference

T0 = 1_700_000_000_000


def event(
    i: int, t: int, amount: int, card: str = "c-1", merchant: str = "m-1", status: str = "approved"
) -> dict:
    return {
        "event_id": f"e-{i}",
        "event_time_ms": t,
        "card_id": card,
        "merchant_id": merchant,
        "device_id": "d-1",
        "ip": "203.0.113.9",
        "amount_minor": amount,
        "currency": "EUR",
        "mcc": "5411",
        "country": "DE",
        "status": status,
    }


EVENTS = [
    event(1, T0 - 50 * MINUTE, 1_000),
    event(2, T0 - 30 * MINUTE, 2_500, merchant="m-2", status="declined"),
    event(3, T0 - 2 * MINUTE, 400),
    event(4, T0 - 1 * MINUTE, 9_000, card="c-2"),
]


@contextlib.asynccontextmanager
async def served_server(
    repository: Path, replay: bool, **settings: Any
) -> AsyncIterator[tuple[ScoringServer, pb_grpc.ScoringStub]]:
    """A started server with EVENTS folded in, and a stub talking to it over loopback."""
    server = ScoringServer(Settings(port=0, model_repository=repository, replay=replay, **settings))
    await server.start()
    try:
        for raw in EVENTS:
            fold_event(server.store, event_from_dict(raw))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, pb_grpc.ScoringStub(channel)
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def served(repository: Path, replay: bool) -> AsyncIterator[pb_grpc.ScoringStub]:
    async with served_server(repository, replay) as (_, stub):
        yield stub


@pytest.fixture
async def replay_stub(trained_model: Path) -> AsyncIterator[pb_grpc.ScoringStub]:
    async with served(trained_model, replay=True) as stub:
        yield stub


@pytest.fixture
async def live_stub(trained_model: Path) -> AsyncIterator[pb_grpc.ScoringStub]:
    async with served(trained_model, replay=False) as stub:
        yield stub


def transaction(**overrides: object) -> pb.Transaction:
    fields: dict[str, object] = dict(
        transaction_id="t-1",
        card_id="c-1",
        merchant_id="m-3",
        device_id="d-1",
        ip="203.0.113.9",
        amount_minor=5_000,
        currency="EUR",
        mcc="5411",
        country="DE",
        event_time_ms=T0,
    )
    fields.update(overrides)
    # event_time_ms=None: not set (it has presence: 0 is a time).
    return pb.Transaction(**{k: v for k, v in fields.items() if v is not None})  # type: ignore[arg-type]


async def test_replay_score_uses_request_time_and_model_thresholds(
    replay_stub: pb_grpc.ScoringStub, trained_model: Path
) -> None:
    response = await replay_stub.Score(
        pb.ScoreRequest(request_id="r-1", transaction=transaction(), include_features=True)
    )
    expected = reference.features(EVENTS, "card", "c-1", T0)
    for name, value in expected.items():
        assert response.features[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name
    assert response.features["card_txn_count_1h"] == 3
    assert response.features["card_seconds_since_last"] == 120.0
    assert response.features["hour_of_day"] == (T0 // 3_600_000) % 24
    # The score is the model's on exactly these features, and the decision its thresholds'.
    # The served backend is the metadata's default, onnxruntime, on model.onnx.
    directory = latest_version(trained_model, "fraud_mlp")
    metadata = ModelMetadata.load(directory / "metadata.json")
    assert metadata.backend == "onnxruntime"
    model = OnnxBackend(directory / "model.onnx", len(metadata.inputs), 1)
    model.load()
    vector = np.array([[response.features[n] for n in metadata.inputs]], dtype=np.float32)
    assert response.score == pytest.approx(float(model.run(vector)[0]), rel=1e-6)
    assert response.decision == metadata.thresholds.decide(response.score)
    assert response.model.version == metadata.version
    assert response.timings.total_us >= response.timings.features_us + response.timings.model_us


async def test_time_zero_is_a_time_not_a_missing_one(replay_stub: pb_grpc.ScoringStub) -> None:
    """event_time_ms and as_of_ms have presence: 0 is 1970's first millisecond, here
    far behind this store's events (OUT_OF_RANGE), not "not set" (required)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay_stub.Score(pb.ScoreRequest(transaction=transaction(event_time_ms=0)))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert (caught.value.details() or "").startswith("transaction.event_time_ms: 0 is more")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay_stub.GetFeatures(
            pb.FeaturesRequest(entity_type="card", entity_id="c-1", as_of_ms=0)
        )
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert (caught.value.details() or "").startswith("as_of_ms: 0 is more")


async def test_features_only_when_asked(replay_stub: pb_grpc.ScoringStub) -> None:
    response = await replay_stub.Score(pb.ScoreRequest(request_id="r", transaction=transaction()))
    assert len(response.features) == 0


async def test_a_live_server_refuses_as_of_ms(live_stub: pb_grpc.ScoringStub) -> None:
    """It answered as of its clock, without a word, a caller who asked for another
    time (the answer's as_of_ms alone said so)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_stub.GetFeatures(
            pb.FeaturesRequest(entity_type="card", entity_id="c-1", as_of_ms=1_000)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("as_of_ms: honoured in replay mode only")
    reply = await live_stub.GetFeatures(pb.FeaturesRequest(entity_type="card", entity_id="c-1"))
    assert abs(reply.as_of_ms - time.time() * 1000) < 60_000  # unset: the server clock


async def test_get_features_as_of_in_replay_mode(replay_stub: pb_grpc.ScoringStub) -> None:
    as_of = T0 - 40 * MINUTE
    reply = await replay_stub.GetFeatures(
        pb.FeaturesRequest(entity_type="card", entity_id="c-1", as_of_ms=as_of)
    )
    assert reply.as_of_ms == as_of
    assert dict(reply.features) == pytest.approx(reference.features(EVENTS, "card", "c-1", as_of))
    assert reply.events_folded == 3 and reply.newest_event_time_ms == T0 - 2 * MINUTE
    unknown = await replay_stub.GetFeatures(pb.FeaturesRequest(entity_type="ip", entity_id="x"))
    assert unknown.events_folded == 0 and unknown.features["ip_txn_count_5m"] == 0
    # No newest event is unset, not 0 (an event at the epoch's first millisecond).
    assert reply.HasField("newest_event_time_ms")
    assert not unknown.HasField("newest_event_time_ms")


async def test_replay_reads_beyond_the_fold_horizon_are_refused(
    replay_stub: pb_grpc.ScoringStub,
) -> None:
    # The server keeps 2 h (the fold horizon) behind its newest event (idle entities
    # are swept from memory relative to it).
    watermark = max(e["event_time_ms"] for e in EVENTS)
    too_old = watermark - 2 * 60 * MINUTE - 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay_stub.GetFeatures(
            pb.FeaturesRequest(entity_type="card", entity_id="c-1", as_of_ms=too_old)
        )
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert (caught.value.details() or "").startswith("as_of_ms:")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay_stub.Score(pb.ScoreRequest(transaction=transaction(event_time_ms=too_old)))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert (caught.value.details() or "").startswith("transaction.event_time_ms:")
    # Exactly at the horizon is still answered.
    at_horizon = too_old + 1
    reply = await replay_stub.GetFeatures(
        pb.FeaturesRequest(entity_type="card", entity_id="c-1", as_of_ms=at_horizon)
    )
    assert dict(reply.features) == pytest.approx(
        reference.features(EVENTS, "card", "c-1", at_horizon)
    )


async def test_live_mode_uses_server_clock(live_stub: pb_grpc.ScoringStub) -> None:
    before = time.time_ns() // 1_000_000
    reply = await live_stub.GetFeatures(pb.FeaturesRequest(entity_type="card", entity_id="c-1"))
    assert reply.as_of_ms >= before  # (as_of_ms is refused outside replay mode)
    # T0 is long ago: every window is empty now, but the last event is still known.
    assert reply.features["card_txn_count_24h"] == 0
    assert reply.features["card_seconds_since_last"] == pytest.approx(
        (reply.as_of_ms - (T0 - 2 * MINUTE)) / 1000
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ScoreRequest(request_id="r"), "transaction"),
        (pb.ScoreRequest(transaction=transaction(card_id="")), "transaction.card_id"),
        (pb.ScoreRequest(transaction=transaction(merchant_id="")), "transaction.merchant_id"),
        (pb.ScoreRequest(transaction=transaction(amount_minor=-1)), "transaction.amount_minor"),
        (pb.ScoreRequest(transaction=transaction(event_time_ms=-1)), "transaction.event_time_ms"),
        (pb.ScoreRequest(transaction=transaction(event_time_ms=None)), "transaction.event_time_ms"),
        (pb.ScoreRequest(transaction=transaction(ip="x" * 1000)), "transaction.ip"),
        (pb.ScoreRequest(transaction=transaction(card_id="c" * 257)), "transaction.card_id"),
        (pb.ScoreRequest(transaction=transaction(country="D" * 300)), "transaction.country"),
        (pb.ScoreRequest(request_id="r" * 1000, transaction=transaction()), "request_id"),
    ],
)
async def test_invalid_score_requests_name_the_field(
    replay_stub: pb_grpc.ScoringStub, request_: pb.ScoreRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay_stub.Score(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}:")


async def test_a_live_event_time_far_ahead_of_the_clock_is_refused(
    live_stub: pb_grpc.ScoringStub,
) -> None:
    """Live, an event time more than the allowed skew ahead of the server's clock is
    refused, as such an event is dead-lettered: mostly a unit mistake (here
    microseconds), which would skew the hour-of-day input. Within the skew it is
    answered. One before 2000 (seconds read as milliseconds) is refused too."""
    now_ms = int(time.time() * 1000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_stub.Score(pb.ScoreRequest(transaction=transaction(event_time_ms=now_ms * 1000)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("transaction.event_time_ms:") and "ahead" in details, details
    answer = await live_stub.Score(
        pb.ScoreRequest(transaction=transaction(event_time_ms=now_ms + 60_000))
    )
    assert 0.0 <= answer.score <= 1.0
    # Seconds, not milliseconds (and 0): 1970, which no payment scored now has.
    for wrong in (now_ms // 1000, 0):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live_stub.Score(pb.ScoreRequest(transaction=transaction(event_time_ms=wrong)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.startswith("transaction.event_time_ms:") and "before 2000" in details
    old = await live_stub.Score(
        pb.ScoreRequest(transaction=transaction(event_time_ms=now_ms - 30 * 86_400_000))
    )
    assert 0.0 <= old.score <= 1.0  # a month late is late, not a unit mistake


def test_lengths_are_checked_per_field_in_characters() -> None:
    # Every field at the limit (in characters; "é" is two bytes in UTF-8): the whole
    # request is several times the limit, which alone must not refuse it.
    at_limit = pb.ScoreRequest(
        request_id="r" * MAX_ID_LENGTH,
        transaction=transaction(card_id="c" * MAX_ID_LENGTH, ip="é" * MAX_ID_LENGTH),
    )
    assert at_limit.ByteSize() > 4 * MAX_ID_LENGTH
    validate_score_request(parse_score_request(at_limit.SerializeToString()), replay=True)
    over = pb.ScoreRequest(transaction=transaction(device_id="é" * (MAX_ID_LENGTH + 1)))
    with pytest.raises(InvalidRequest) as refused:
        validate_score_request(parse_score_request(over.SerializeToString()), replay=True)
    assert refused.value.field == "transaction.device_id"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.FeaturesRequest(entity_type="planet", entity_id="x"), "entity_type"),
        (pb.FeaturesRequest(entity_type="card"), "entity_id"),
        (pb.FeaturesRequest(entity_type="card", entity_id="c", as_of_ms=-3), "as_of_ms"),
    ],
)
async def test_invalid_features_requests_name_the_field(
    replay_stub: pb_grpc.ScoringStub, request_: pb.FeaturesRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replay_stub.GetFeatures(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}:")


async def test_score_stream_answers_in_order_and_stops_at_a_bad_request(
    replay_stub: pb_grpc.ScoringStub,
) -> None:
    good = [
        pb.ScoreRequest(request_id=f"s-{i}", transaction=transaction(amount_minor=i * 100))
        for i in range(5)
    ]
    answers = [r async for r in replay_stub.ScoreStream(iter(good))]
    assert [a.request_id for a in answers] == [g.request_id for g in good]
    assert [a.features for a in answers] == [pb.ScoreResponse().features] * 5

    bad = [*good[:2], pb.ScoreRequest(request_id="bad-one", transaction=transaction(card_id=""))]
    call = replay_stub.ScoreStream(iter(bad))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in call:
            received.append(answer.request_id)
    assert received == ["s-0", "s-1"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transaction.card_id" in (caught.value.details() or "")
    assert "bad-one" in (caught.value.details() or "")
    # A message without an id: its refusal names no id (not "request_id ''").
    unnamed = pb.ScoreRequest(transaction=transaction(card_id=""))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in replay_stub.ScoreStream(iter([unnamed])):
            pass
    assert caught.value.details() == "transaction.card_id: is required"


async def test_a_stream_refusal_names_a_long_request_id_clipped(
    replay_stub: pb_grpc.ScoringStub,
) -> None:
    # Echoed whole, an id of 20,000 characters made the status larger than gRPC's
    # metadata limit: the caller saw RESOURCE_EXHAUSTED, not the field refused.
    long_id = "R" * 20_000
    for request in (
        pb.ScoreRequest(request_id=long_id, transaction=transaction()),  # too long
        pb.ScoreRequest(request_id=long_id, transaction=transaction(card_id="")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in replay_stub.ScoreStream(iter([request])):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.endswith(f"(request_id '{'R' * 64}... (20000 characters)')"), details
        assert len(details) < 200


async def test_score_stream_reads_ahead_and_still_answers_in_order(
    replay_stub: pb_grpc.ScoringStub,
) -> None:
    # More messages than the read-ahead, sent at once: they are scored concurrently
    # (and may share batches) but answered one for one, in order, each its own score.
    requests = [
        pb.ScoreRequest(request_id=f"ra-{i}", transaction=transaction(amount_minor=100 + i))
        for i in range(3 * STREAM_READ_AHEAD)
    ]
    answers = [r async for r in replay_stub.ScoreStream(iter(requests))]
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    singles = [await replay_stub.Score(r) for r in requests[:: STREAM_READ_AHEAD // 2]]
    # Batched or not, the same score (up to float rounding of batched kernels).
    expected = [a.score for a in answers[:: STREAM_READ_AHEAD // 2]]
    assert [a.score for a in singles] == pytest.approx(expected, abs=1e-6)


def read_ahead_running() -> bool:
    return any(task.get_name() == READ_AHEAD_TASK for task in asyncio.all_tasks())


async def test_score_stream_reads_ahead_only_while_answers_wait(trained_model: Path) -> None:
    # A cheap model answers each message as it is read: no read-ahead task. Then the
    # model moves to its worker thread mid-stream (every answer now waits): the stream
    # is read ahead. Then it moves back: the stream is answered in turn again. The
    # answers stay in order, one per message, each its unary score.
    async with served_server(trained_model, replay=True) as (server, stub):
        calls = server.models.primary.backend._calls  # type: ignore[attr-defined]
        inline_limit_s = calls.inline_limit_s
        requests = [
            pb.ScoreRequest(request_id=f"m-{i}", transaction=transaction(amount_minor=100 + i))
            for i in range(60)
        ]
        expected = [(await stub.Score(r)).score for r in requests]
        answered = {5: asyncio.Event(), 30: asyncio.Event()}

        async def sent() -> AsyncIterator[pb.ScoreRequest]:
            for i, request in enumerate(requests):
                if i in answered:
                    await answered[i].wait()  # every earlier message answered
                    # To the worker thread at 5, back on the loop at 30.
                    calls.inline_limit_s = 0.0 if i == 5 else inline_limit_s
                yield request

        answers: list[pb.ScoreResponse] = []
        read_ahead_seen = []
        async for answer in stub.ScoreStream(sent()):
            answers.append(answer)
            read_ahead_seen.append(read_ahead_running())
            if len(answers) in answered:
                answered[len(answers)].set()
        assert [a.request_id for a in answers] == [r.request_id for r in requests]
        assert [a.score for a in answers] == pytest.approx(expected, abs=1e-6)
        assert calls._executor is not None  # answers did wait: the model ran in its thread
        assert not any(read_ahead_seen[:5])  # in turn
        assert any(read_ahead_seen[5:30])  # read ahead while answers waited
        assert not any(read_ahead_seen[31:])  # handed back: in turn again
        assert not read_ahead_running()


async def test_score_streams_past_max_streams_are_refused_and_the_open_ones_go_on(
    trained_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that leaks streams (opens them, never closes) is bounded: past
    # max_streams a new one is refused at once, named, counted and warned of; the open
    # ones still answer, and a closed one makes room.
    def request(i: int) -> pb.ScoreRequest:
        return pb.ScoreRequest(request_id=f"o-{i}", transaction=transaction())

    async with served_server(trained_model, replay=True, max_streams=2) as (server, stub):
        metrics = server.service.rpc_metrics["ScoreStream"]

        def refusals() -> int:  # (the counter is the process's: earlier tests' count)
            histogram = metrics._seconds.get("RESOURCE_EXHAUSTED")
            return 0 if histogram is None else int(sum(histogram.snapshot()[0]))

        refused_before = refusals()
        first, second = stub.ScoreStream(), stub.ScoreStream()
        for i, call in enumerate((first, second)):
            await call.write(request(i))
            assert (await call.read()).request_id == f"o-{i}"
        refused = stub.ScoreStream()
        with caplog.at_level("WARNING", logger="streamscore.streams"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused.write(request(2))
                await refused.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams" in (caught.value.details() or "")
        assert "ScoreStream refused: 2 open" in caplog.text
        await second.write(request(3))
        assert (await second.read()).request_id == "o-3"
        await first.done_writing()
        assert await first.read() is grpc.aio.EOF
        deadline = time.monotonic() + 10
        while metrics.in_flight > 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        third = stub.ScoreStream()
        await third.write(request(4))
        assert (await third.read()).request_id == "o-4"
        assert refusals() - refused_before == 1
        for call in (second, third):
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF


async def test_one_connection_holds_at_most_max_calls_per_connection(
    trained_model: Path,
) -> None:
    """A client could take every ScoreStream slot of the server (``max_streams``) on
    one connection. Past ``max_calls_per_connection`` its further calls wait on its
    side; another connection is served meanwhile, and an ended stream makes room."""

    def request(i: int) -> pb.ScoreRequest:
        return pb.ScoreRequest(request_id=f"c-{i}", transaction=transaction())

    async with served_server(trained_model, replay=True, max_calls_per_connection=2) as (
        server,
        stub,
    ):
        first, second = stub.ScoreStream(), stub.ScoreStream()
        for i, call in enumerate((first, second)):
            await call.write(request(i))
            assert (await call.read()).request_id == f"c-{i}"
        waiting = stub.ScoreStream()
        write = asyncio.ensure_future(waiting.write(request(2)))
        answer = asyncio.ensure_future(waiting.read())
        await asyncio.sleep(1.0)
        assert not answer.done()  # held by the client: the connection is full
        # A connection of its own (channels to one target share one by default).
        own = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=own) as other:
            reply = await pb_grpc.ScoringStub(other).Score(request(3), timeout=5)
            assert reply.request_id == "c-3"
        await first.done_writing()
        assert await first.read() is grpc.aio.EOF
        await asyncio.wait_for(write, 5)
        assert (await asyncio.wait_for(answer, 5)).request_id == "c-2"
        for call in (second, waiting):
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF


def test_thresholds_decide() -> None:
    thresholds = Thresholds(review=0.3, decline=0.8)
    assert [thresholds.decide(s) for s in (0.0, 0.3, 0.79, 0.8, 1.0)] == [
        pb.APPROVE,
        pb.REVIEW,
        pb.REVIEW,
        pb.DECLINE,
        pb.DECLINE,
    ]
    with pytest.raises(ValueError):
        Thresholds(review=0.9, decline=0.1)


def test_model_metadata_round_trips(tmp_path: Path) -> None:
    metadata = ModelMetadata("m", "3", ("a", "b"), Thresholds(0.1, 0.5))
    metadata.dump(tmp_path / "metadata.json")
    assert ModelMetadata.load(tmp_path / "metadata.json") == metadata


def time_left_to_the_batcher(server: ScoringServer, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds each call's deadline left the primary's batcher, as it submits."""
    batcher = server.rollouts.primary_model().batcher
    left: list[float] = []
    submit = batcher.submit

    async def recording(vector: object, deadline: float, *rest: object) -> float:
        left.append(deadline - batcher.clock())
        return await submit(vector, deadline, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(batcher, "submit", recording)
    return left


async def test_the_batchers_deadline_counts_from_the_calls_start(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gRPC deadline capped by the budget, less what the call spent before its
    model call (here 30 ms of features): the batcher must not be promised time the
    caller no longer has."""
    from streamscore.server import scoring

    async with served_server(trained_model, replay=True) as (server, stub):
        left = time_left_to_the_batcher(server, monkeypatch)
        assemble = scoring.assemble_features

        def slow_features(*args: object, **kwargs: object) -> dict[str, float]:
            time.sleep(0.03)
            return assemble(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(scoring, "assemble_features", slow_features)
        await stub.Score(pb.ScoreRequest(transaction=transaction()), timeout=10)
        budget = server.settings.budget_ms / 1000
        assert len(left) == 1 and left[0] <= budget - 0.03, (left, budget)


async def test_a_calls_wait_before_its_body_counts_as_queue_and_against_its_budget(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unary call's wait in its row (here 30 ms before its body ran, as ``started``
    says) is in its answer's queue_us and total_us, not its features_us, and is no
    longer the batcher's to spend."""
    async with served_server(trained_model, replay=True) as (server, _):
        left = time_left_to_the_batcher(server, monkeypatch)
        request = parse_score_request(
            pb.ScoreRequest(request_id="r-1", transaction=transaction()).SerializeToString()
        )
        called = time.perf_counter_ns() - 30_000_000
        answer = pb.ScoreResponse.FromString(
            await server.service.score(request, None, None, started=called)
        )
        timings = answer.timings
        assert timings.queue_us >= 30_000 and timings.features_us < 30_000, timings
        assert timings.total_us >= timings.queue_us + timings.features_us, timings
        budget = server.settings.budget_ms / 1000
        assert len(left) == 1 and left[0] <= budget - 0.03, (left, budget)


async def test_a_stream_messages_wait_before_its_try_is_in_its_timings_not_its_budget(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ScoreStream message paced behind its own (here 30 ms since its read, as
    ``waited_ns`` says) has the whole budget for this try, and its answer's queue_us
    and total_us count the wait (audit AX: they had left it out)."""
    async with served_server(trained_model, replay=True) as (server, _):
        left = time_left_to_the_batcher(server, monkeypatch)
        request = parse_score_request(
            pb.ScoreRequest(request_id="r-1", transaction=transaction()).SerializeToString()
        )
        answer = pb.ScoreResponse.FromString(
            await server.service.score(request, None, None, waited_ns=30_000_000)
        )
        timings = answer.timings
        assert timings.queue_us >= 30_000 and timings.features_us < 30_000, timings
        assert timings.total_us >= timings.queue_us + timings.features_us, timings
        budget = server.settings.budget_ms / 1000
        assert len(left) == 1 and left[0] > budget - 0.02, (left, budget)


async def test_a_part_whose_stop_fails_leaves_the_rest_stopped(
    trained_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One part's stop raising (the model watcher re-raised an old error) ended the
    server's stop there: the models and the loop-lag probe after it kept running. The
    failure is logged, the parts after it stop, and a failed stop is raised at the end."""
    server = ScoringServer(Settings(port=0, model_repository=trained_model, kafka=""))
    await server.start()
    assert server.rollouts is not None

    async def fails() -> None:
        raise ValueError("stop failed")

    server.rollouts.stop = fails  # type: ignore[method-assign]
    primary = server.models.primary
    assert server.loop_lag._task is not None
    # A RuntimeError, not the ValueError itself: `serve` reads a ValueError as bad
    # settings (exit 2, which `serve --workers` takes for "no restart mends").
    with pytest.raises(RuntimeError, match="stopping the rollouts failed: ValueError"):
        await server.stop()
    assert server.models._primary is None and not primary.backend.started  # type: ignore[attr-defined]
    assert server.loop_lag._task is None
    assert "stopping the rollouts failed" in caplog.text


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("127.0.0.1", "Address already in use"),  # the port, taken below
        ("not.a.host.invalid", "host 'not.a.host.invalid' does not resolve"),
        ("192.0.2.1", "Cannot assign requested address"),  # not this machine's
    ],
)
async def test_a_listen_that_fails_says_why_as_the_os_does(host: str, says: str) -> None:
    """gRPC says only "Failed to bind to address"; the start added "(the port is in
    use?)" to every such failure, a host that does not resolve included (audit AG)."""
    server = grpc.aio.server()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] if host == "127.0.0.1" else 0
        with pytest.raises(OSError, match=f"cannot listen on {host}:{port}: {says}"):
            _listen(server, host, port, None)
    await server.stop(None)


@pytest.mark.parametrize("taken_setting", ["worker_port_base", "metrics_port"])
async def test_a_start_that_fails_on_a_port_never_takes_the_shared_ports_connections(
    trained_model: Path, taken_setting: str
) -> None:
    """A `serve --workers` process whose own port or metrics port another process held
    bound the shared port first, which took its share of the connections (gRPC listens
    as it binds) and failed them, at every restart; its own port taken, the shared one
    even stayed open after the failed start (audit AN). Those ports come first now."""
    port = find_free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(
            port=port,
            model_repository=trained_model,
            reuse_port=True,
            **{taken_setting: taken.getsockname()[1]},
        )
        server = ScoringServer(settings)
        with pytest.raises(OSError, match="Address already in use"):
            await server.start()
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))

"""End to end on real parts: tansu broker, Faust worker process, gRPC server process.

Events are produced with a plain Kafka client, folded in by the real pipeline, and
then checked over real gRPC (GetFeatures and Score) against values computed here,
independently, by the brute-force reference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.cli import main as cli_main
from streamscore.client import transaction_from_event, wait_serving
from streamscore.stream.features import MINUTE
from streamscore.stream.topics import DEAD_LETTER, PAYMENTS

import reference
from system import (
    KERNELS_AGREE,
    assert_features_match,
    make_event,
    model_score,
    publish,
    running_system,
    wait_folded,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
async def system(tmp_path: Path, trained_model: Path) -> AsyncIterator[tuple[str, str, Path]]:
    async with running_system(tmp_path, trained_model) as (bootstrap, targets):
        yield bootstrap, targets[0], trained_model


async def test_events_in_features_and_scores_out(system, tmp_path: Path) -> None:
    bootstrap, target, model_repository = system
    now = time.time_ns() // 1_000_000
    # Times well inside the windows (and away from window edges) so that the
    # windowed values cannot change while the test runs; seconds-since-last is
    # checked against the time the server says it used.
    events = [
        # Sent first: an event 90 minutes old is inside the 1 h allowed lateness only
        # while nothing newer than 30 minutes ago has been seen.
        make_event("card-A", "m-1", "dev-1", "10.0.0.1", now - 90 * MINUTE, 7_777),
        make_event("card-A", "m-1", "dev-1", "10.0.0.1", now - 20 * MINUTE, 1_250),
        make_event("card-A", "m-2", "dev-1", "10.0.0.1", now - 12 * MINUTE, 8_000, "declined"),
        make_event("card-A", "m-2", "dev-2", "10.0.0.2", now - 3 * MINUTE, 420),
        make_event("card-B", "m-2", "dev-2", "10.0.0.2", now - 2 * MINUTE, 99_999),
    ]
    duplicate = events[2]
    too_late = make_event("card-A", "m-1", "dev-1", "10.0.0.1", now - 70 * MINUTE, 1)
    malformed = [
        b'{"event_id": "bad-1", "amount_minor": -5',
        orjson.dumps({**events[0], "event_id": "bad-2", "amount_minor": -10}),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for event in [*events, duplicate, too_late]:
            await producer.send_and_wait(
                PAYMENTS, orjson.dumps(event), key=event["card_id"].encode()
            )
        for raw in malformed:
            await producer.send_and_wait(PAYMENTS, raw, key=b"card-A")
    finally:
        await producer.stop()

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        card_a = [e for e in events if e["card_id"] == "card-A"]
        reply = await wait_folded(stub, "card", "card-A", len(card_a))
        assert reply.events_folded == len(card_a)  # the duplicate was not counted
        assert reply.newest_event_time_ms == now - 3 * MINUTE
        expected = reference.features(events, "card", "card-A", reply.as_of_ms)
        assert expected["card_txn_count_1h"] == 3
        assert expected["card_amount_sum_1h"] == 1_250 + 8_000 + 420
        assert_features_match(dict(reply.features), expected)

        for entity_type, entity_id in [
            ("merchant", "m-2"),
            ("device", "dev-2"),
            ("ip", "10.0.0.2"),
        ]:
            reply = await wait_folded(stub, entity_type, entity_id, 2)
            assert_features_match(
                dict(reply.features),
                reference.features(events, entity_type, entity_id, reply.as_of_ms),
            )

        # Score a new transaction of card-A: served features equal the reference as of
        # the server's clock (bracketed by the times before and after the call).
        txn = make_event("card-A", "m-3", "dev-1", "10.0.0.1", now, 5_000)
        before = time.time_ns() // 1_000_000
        response = await stub.Score(
            pb.ScoreRequest(
                request_id="r-1", transaction=transaction_from_event(txn), include_features=True
            ),
            timeout=5,
        )
        after = time.time_ns() // 1_000_000
        assert response.request_id == "r-1"
        assert 0.0 <= response.score <= 1.0
        assert response.decision in (pb.APPROVE, pb.REVIEW, pb.DECLINE)
        assert response.model.name == "fraud_mlp" and response.model.variant == pb.PRIMARY
        assert response.timings.total_us > 0
        assert list(response.degraded) == []
        served = dict(response.features)
        windowed = reference.features(events, "card", "card-A", before)
        since_last = windowed.pop("card_seconds_since_last")
        assert_features_match(served, windowed)
        assert (
            since_last <= served["card_seconds_since_last"] <= since_last + (after - before) / 1000
        )
        assert served["amount"] == 5_000
        assert served["amount_to_card_mean_7d"] == pytest.approx(
            5_000 / windowed["card_amount_mean_7d"]
        )

        # Bad input: INVALID_ARGUMENT naming the field.
        bad = pb.ScoreRequest(
            request_id="r-2", transaction=transaction_from_event({**txn, "amount_minor": -1})
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Score(bad, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "transaction.amount_minor" in (caught.value.details() or "")

        # ScoreStream answers as Score does for each request on one stream: the same
        # windowed features, and the model's score of them. Seconds-since-last moves
        # with the clock between the calls (by seconds on a loaded CI machine), so the
        # score is checked against the model file, not against the unary answer.
        requests = [
            pb.ScoreRequest(
                request_id=f"s-{i}", transaction=transaction_from_event(txn), include_features=True
            )
            for i in range(3)
        ]
        call = stub.ScoreStream(iter(requests), timeout=5)
        answers = [r async for r in call]
        assert [a.request_id for a in answers] == ["s-0", "s-1", "s-2"]
        for answer in answers:
            assert list(answer.degraded) == []
            streamed = dict(answer.features)
            assert streamed["card_seconds_since_last"] >= served["card_seconds_since_last"]
            assert_features_match(streamed, windowed)
            assert answer.score == pytest.approx(
                model_score(model_repository, "fraud_mlp", answer.model.version, streamed),
                **KERNELS_AGREE,
            )

    # Malformed events went to the dead-letter topic with a reason.
    consumer = AIOKafkaConsumer(
        DEAD_LETTER,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        letters: list[dict] = []
        deadline = time.monotonic() + 30
        while len(letters) < 3 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                letters.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    assert sorted(letter["reason"] for letter in letters) == [
        "bad_json",
        "negative_amount",
        "too_late",
    ]
    assert all(letter["topic"] == PAYMENTS for letter in letters)
    # The features above were fetched, after the replica's start, by its lean fetch.
    assert "replica fetches lean" in (tmp_path / "server-1.log").read_text()


async def test_health_and_reflection(system, capsys: pytest.CaptureFixture[str]) -> None:
    _, target, _ = system
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
    assert {"streamscore.v1.Scoring", "grpc.health.v1.Health"} <= services
    await wait_serving(target, timeout=5, service="streamscore.v1.Scoring")
    # Each service served has its health, and List gives them all.
    async with grpc.aio.insecure_channel(target) as channel:
        checking = health_pb2_grpc.HealthStub(channel)
        listed = await checking.List(health_pb2.HealthListRequest())
        serving = health_pb2.HealthCheckResponse.SERVING
        assert {name: s.status for name, s in listed.statuses.items()} == {
            "": serving,
            "streamscore.v1.Scoring": serving,
            "streamscore.v1.Admin": serving,
        }
        admin = await checking.Check(health_pb2.HealthCheckRequest(service="streamscore.v1.Admin"))
        assert admin.status == serving
    # A name it has no status for: said, with the names it has (it said "NOT_FOUND: ").
    unknown = ["health", "--target", target, "--service", "bogus"]
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, unknown) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "NOT_FOUND: no health status for service 'bogus'; it has '', "
            "'streamscore.v1.Admin', 'streamscore.v1.Scoring'"
        )
    )


def built(files: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A fresh pool of ``files``, each added after the dependencies among them."""
    pool = descriptor_pool.DescriptorPool()
    waiting = {f.name: f for f in files}

    def add(file: descriptor_pb2.FileDescriptorProto) -> None:
        for dependency in file.dependency:
            if dependency in waiting:
                add(waiting.pop(dependency))
        pool.Add(file)

    while waiting:
        add(waiting.popitem()[1])
    return pool


async def test_reflection_v1(system) -> None:
    """Reflection answers as grpc.reflection.v1 too (what newer grpcurl asks first),
    and describes every service it lists, itself included, in files that build."""
    _, target, _ = system
    v1 = "grpc.reflection.v1.ServerReflection"
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{v1}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = {s.name for s in (await call.read()).list_services_response.service}
        assert {"streamscore.v1.Scoring", "streamscore.v1.Admin", v1} <= listed
        for name in sorted(listed):
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
            answer = await call.read()
            assert answer.WhichOneof("message_response") == "file_descriptor_response", name
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in answer.file_descriptor_response.file_descriptor_proto
            ]
            # Built as a client builds them: the answer carries the file's dependencies.
            service = built(files).FindServiceByName(name)
            assert service.full_name == name
            # Its methods too (`grpcurl describe SERVICE.METHOD`): protobuf's pool
            # does not find them (grpc/grpc#34743).
            for method in service.methods:
                request = reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol=method.full_name
                )
                await call.write(request)
                answer = await call.read()
                kind = answer.WhichOneof("message_response")
                assert kind == "file_descriptor_response", method.full_name
        await call.write(
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="streamscore.v1.Nope.Nope"
            )
        )
        assert (await call.read()).error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        await call.done_writing()


async def test_two_workers_two_servers_agree_with_the_reference(
    tmp_path: Path, trained_model: Path
) -> None:
    """Events spread over all payments partitions, folded by whichever of two workers
    owns them, give every entity type the same exact values on both servers."""
    now = time.time_ns() // 1_000_000
    events = []
    for i in range(60):
        events.append(
            make_event(
                f"card-{i % 12}",
                f"m-{i % 5}",
                f"dev-{i % 7}",
                f"10.0.{i % 3}.1",
                now - (40 - i // 2) * MINUTE - 7_000,
                100 + 37 * i,
                "declined" if i % 9 == 0 else "approved",
            )
        )
    async with running_system(tmp_path, trained_model, workers=2, servers=2) as (
        bootstrap,
        targets,
    ):
        await publish(bootstrap, events)
        entities = (
            [("card", f"card-{i}") for i in range(12)]
            + [("merchant", f"m-{i}") for i in range(5)]
            + [("device", f"dev-{i}") for i in range(7)]
            + [("ip", f"10.0.{i}.1") for i in range(3)]
        )
        field = {"card": "card_id", "merchant": "merchant_id", "device": "device_id", "ip": "ip"}
        for target in targets:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.ScoringStub(channel)
                for entity_type, entity_id in entities:
                    expected_count = sum(1 for e in events if e[field[entity_type]] == entity_id)
                    reply = await wait_folded(stub, entity_type, entity_id, expected_count)
                    assert reply.events_folded == expected_count, (target, entity_type, entity_id)
                    assert_features_match(
                        dict(reply.features),
                        reference.features(events, entity_type, entity_id, reply.as_of_ms),
                    )

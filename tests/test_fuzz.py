"""Abuse: hypothesis-generated requests against the real gRPC server, and malformed
payment events against the real worker. Every request gets a defined status (never
UNKNOWN or INTERNAL), every bad event lands in the dead-letter topic, nothing dies."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.config import Settings
from streamscore.server.app import ScoringServer

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Every kind of string a client could send: empty, unicode, control characters, NUL,
# surrogate-free astral planes, and long ones past every limit.
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=400),
    st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(0, 5000)),
)
# Values of a transaction field: right-typed, mistyped, or absurd.
DEFINED_CODES = {
    "OK",
    "INVALID_ARGUMENT",
    "OUT_OF_RANGE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
}


@st.composite
def transactions(draw: st.DrawFn) -> pb.Transaction:
    fields = {}
    for name in ("transaction_id", "card_id", "merchant_id", "device_id", "ip"):
        if draw(st.booleans()):
            fields[name] = draw(TEXT)
    for name in ("currency", "mcc", "country"):
        if draw(st.booleans()):
            fields[name] = draw(TEXT)
    if draw(st.booleans()):
        fields["amount_minor"] = draw(INT64)
    if draw(st.booleans()):
        fields["event_time_ms"] = draw(
            st.one_of(INT64, st.integers(1_700_000_000_000, 1_900_000_000_000))
        )
    return pb.Transaction(**fields)


@st.composite
def score_requests(draw: st.DrawFn) -> pb.ScoreRequest:
    request = pb.ScoreRequest(request_id=draw(TEXT), include_features=draw(st.booleans()))
    if draw(st.integers(0, 9)):  # mostly with a transaction
        request.transaction.CopyFrom(draw(transactions()))
    return request


def raw_messages() -> st.SearchStrategy[bytes]:
    """Bytes that are not (or only partly) a ScoreRequest: the wrong-type case."""
    valid = score_requests().map(lambda r: r.SerializeToString())
    return st.one_of(
        st.binary(max_size=300),
        valid.map(lambda b: b[: len(b) // 2]),  # truncated
        valid.map(lambda b: b + b"\xff"),  # trailing garbage
        st.just(pb.FeaturesRequest(entity_type="card", entity_id="x").SerializeToString()),
        # Field 2 (transaction) sent as a varint instead of a message.
        st.just(b"\x10\x01"),
    )


@pytest.fixture(scope="module")
def event_loop_server(
    trained_model_once: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The server runs on its own loop in a thread, so hypothesis can drive it with a
    plain synchronous client (hypothesis tests are synchronous)."""
    repository = tmp_path_factory.mktemp("fuzz") / "models"
    shutil.copytree(trained_model_once, repository)
    settings_ = Settings(
        port=0,
        model_repository=repository,
        model_reload_interval_s=0,
        admin_token=ADMIN_TOKEN,
    )
    loop = asyncio.new_event_loop()
    server = ScoringServer(settings_)
    loop.run_until_complete(server.start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


SEEN: Counter[str] = Counter()
ADMIN_TOKEN = "fuzz-admin-token-0123456789"
# Sent on every call below: only Admin reads it.
WITH_TOKEN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def call(channel: grpc.Channel, method: str, payload: bytes) -> str:
    rpc = channel.unary_unary(
        f"/streamscore.v1.Scoring/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        rpc(payload, timeout=5)
        return "OK"
    except grpc.RpcError as error:
        code = error.code().name  # type: ignore[attr-defined]
        assert code in DEFINED_CODES, (code, error.details(), payload[:100])  # type: ignore[attr-defined]
        if code == "INVALID_ARGUMENT":
            # The message names what was wrong.
            assert error.details(), payload[:100]  # type: ignore[attr-defined]
        return code


FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(request=score_requests())
def test_fuzzed_score_requests_get_defined_codes(
    event_loop_server: str, request: pb.ScoreRequest
) -> None:
    with grpc.insecure_channel(event_loop_server) as channel:
        SEEN["Score " + call(channel, "Score", request.SerializeToString())] += 1


@FUZZ
@given(payload=raw_messages(), method=st.sampled_from(["Score", "GetFeatures"]))
def test_malformed_bytes_get_defined_codes(
    event_loop_server: str, payload: bytes, method: str
) -> None:
    with grpc.insecure_channel(event_loop_server) as channel:
        SEEN[f"raw {method} " + call(channel, method, payload)] += 1


@FUZZ
@given(
    entity_type=st.one_of(st.sampled_from(["card", "merchant", "device", "ip"]), TEXT),
    entity_id=TEXT,
    as_of_ms=INT64,
)
def test_fuzzed_feature_requests_get_defined_codes(
    event_loop_server: str, entity_type: str, entity_id: str, as_of_ms: int
) -> None:
    request = pb.FeaturesRequest(entity_type=entity_type, entity_id=entity_id, as_of_ms=as_of_ms)
    with grpc.insecure_channel(event_loop_server) as channel:
        SEEN["GetFeatures " + call(channel, "GetFeatures", request.SerializeToString())] += 1


# Bytes no message type parses: a tag cut short, a length past the end.
UNDECODABLE = (b"\xff\xff\xff", b"\x0a\x05ab")


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/streamscore.v1.Admin/GetRollout", "unary"),
        ("/streamscore.v1.Admin/SetRollout", "unary"),
        ("/streamscore.v1.Admin/ListModels", "unary"),
        ("/streamscore.v1.Admin/Promote", "unary"),
        ("/streamscore.v1.Admin/Rollback", "unary"),
        ("/grpc.health.v1.Health/Check", "unary"),
        ("/grpc.health.v1.Health/Watch", "stream answers"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "streams"),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "streams"),
    ],
)
def test_undecodable_bytes_to_every_service_are_invalid_argument(
    event_loop_server: str, path: str, shape: str
) -> None:
    """Not only Scoring's: the admin, health and reflection services too, whose
    generated handlers let protobuf's parse error become UNKNOWN (server/guarded.py).
    (Admin's caller has the token: one without it is refused for that, below.)"""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(event_loop_server) as channel:
        for payload in UNDECODABLE:
            with pytest.raises(grpc.RpcError) as caught:
                if shape == "unary":
                    channel.unary_unary(path, **identity)(payload, timeout=5, metadata=WITH_TOKEN)
                elif shape == "stream answers":
                    list(
                        channel.unary_stream(path, **identity)(
                            payload, timeout=5, metadata=WITH_TOKEN
                        )
                    )
                else:
                    list(
                        channel.stream_stream(path, **identity)(
                            iter([payload]), timeout=5, metadata=WITH_TOKEN
                        )
                    )
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
            assert error.details().startswith("request: not a valid "), error.details()
        # Still serving.
        good = pb.ScoreRequest(transaction=pb.Transaction(card_id="c", merchant_id="m"))
        assert call(channel, "Score", good.SerializeToString()) == "OK"


@pytest.mark.parametrize(
    "method", ["GetRollout", "SetRollout", "ListModels", "Promote", "Rollback"]
)
@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer not-the-admin-token"),)])
def test_undecodable_admin_requests_without_the_token_are_unauthenticated(
    event_loop_server: str, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    """Admin authenticates its caller before it answers on the request: a caller
    without the token was told which field of its request was wrong."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(event_loop_server) as channel:
        rpc = channel.unary_unary(f"/streamscore.v1.Admin/{method}", **identity)
        for payload in (*UNDECODABLE, b"\x0a\x01\xff"):
            with pytest.raises(grpc.RpcError) as caught:
                rpc(payload, timeout=5, metadata=metadata)
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert error.details() == "missing or wrong bearer token"


def test_guarded_services_still_answer(event_loop_server: str) -> None:
    """The same services with good requests, through the guarded handlers: a unary
    call, an answer stream (health's Watch) and a request stream (reflection)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(event_loop_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="streamscore.v1.Scoring")
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(request, timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"streamscore.v1.Scoring", "streamscore.v1.Admin"} <= services


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        (
            "/streamscore.v1.Scoring/Score",
            pb.ScoreRequest(
                request_id="r", transaction=pb.Transaction(card_id="CARD", merchant_id="m")
            )
            .SerializeToString()
            .replace(b"CARD", b"\xff\xfe\xed\xa0"),
            "transaction.card_id",
        ),
        (
            "/streamscore.v1.Scoring/GetFeatures",
            pb.FeaturesRequest(entity_type="card", entity_id="ID")
            .SerializeToString()
            .replace(b"ID", b"\xc0\x80"),  # an overlong NUL
            "entity_id",
        ),
        ("/streamscore.v1.Admin/Rollback", b"\x0a\x01\xff", "reason"),
        ("/grpc.health.v1.Health/Check", b"\x0a\x02\xed\xa0", "service"),  # a surrogate
    ],
)
def test_text_that_is_not_utf8_is_refused_naming_its_field(
    event_loop_server: str, path: str, payload: bytes, field: str
) -> None:
    with grpc.insecure_channel(event_loop_server) as channel:
        rpc = channel.unary_unary(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as caught:
            rpc(payload, timeout=5, metadata=WITH_TOKEN)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"{field}: not valid UTF-8"


GOOD_SCORE = pb.ScoreRequest(
    request_id="r", transaction=pb.Transaction(card_id="c", merchant_id="m", amount_minor=5)
).SerializeToString()


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        # A second transaction (protobuf merges them) with its amount as text: it was
        # read as unset, and the payment scored as an amount of 0.
        (
            "/streamscore.v1.Scoring/Score",
            GOOD_SCORE + b"\x12\x03\x32\x01\x31",
            "transaction.amount_minor",
        ),
        ("/streamscore.v1.Scoring/Score", GOOD_SCORE + b"\x1a\x01\x31", "include_features"),
        ("/streamscore.v1.Scoring/Score", b"\x0d\x00\x00\x00\x00" + GOOD_SCORE, "request_id"),
        (
            "/streamscore.v1.Scoring/GetFeatures",
            pb.FeaturesRequest(entity_type="card", entity_id="c").SerializeToString()
            + b"\x1a\x01\x31",
            "as_of_ms",
        ),
        ("/streamscore.v1.Admin/SetRollout", b"\x0a\x02\x20\x05", "rollout.canary_percent"),
        ("/grpc.health.v1.Health/Check", b"\x08\x01", "service"),
    ],
)
def test_a_field_sent_as_another_type_is_refused_naming_it(
    event_loop_server: str, path: str, payload: bytes, field: str
) -> None:
    """Protobuf keeps a known field sent with another wire type among the unknown
    fields and reads the field as unset: the server answered as if it were absent."""
    with grpc.insecure_channel(event_loop_server) as channel:
        rpc = channel.unary_unary(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as caught:
            rpc(payload, timeout=5, metadata=WITH_TOKEN)
        assert call(channel, "Score", GOOD_SCORE) == "OK"  # the same, well typed
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"{field}: sent as another type than the field's"


def test_a_malformed_stream_message_ends_the_stream_with_invalid_argument(
    event_loop_server: str,
) -> None:
    good = pb.ScoreRequest(
        request_id="s-1", transaction=pb.Transaction(card_id="c", merchant_id="m", amount_minor=1)
    ).SerializeToString()
    with grpc.insecure_channel(event_loop_server) as channel:
        stream = channel.stream_stream(
            "/streamscore.v1.Scoring/ScoreStream",
            request_serializer=lambda b: b,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        answers = []
        with pytest.raises(grpc.RpcError) as caught:
            for answer in stream(iter([good, b"\x12\xff\xff"]), timeout=5):
                answers.append(answer)
    assert [a.request_id for a in answers] == ["s-1"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "ScoreRequest" in caught.value.details()  # type: ignore[attr-defined]


def test_a_stream_message_with_bad_text_is_named_by_its_readable_id(
    event_loop_server: str,
) -> None:
    """The stream's status names the message it refused: its id was readable, but a
    message that did not parse was named with an empty one."""
    bad = (
        pb.ScoreRequest(request_id="s-2", transaction=pb.Transaction(card_id="CARD"))
        .SerializeToString()
        .replace(b"CARD", b"\xff\xfe\xed\xa0")
    )
    with grpc.insecure_channel(event_loop_server) as channel:
        stream = channel.stream_stream(
            "/streamscore.v1.Scoring/ScoreStream",
            request_serializer=lambda b: b,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([bad]), timeout=5))
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "transaction.card_id: not valid UTF-8 (request_id 's-2')"


def test_the_server_is_still_up_and_report(event_loop_server: str) -> None:
    with grpc.insecure_channel(event_loop_server) as channel:
        good = pb.ScoreRequest(
            request_id="after-fuzz",
            transaction=pb.Transaction(card_id="c", merchant_id="m", amount_minor=100),
        )
        assert call(channel, "Score", good.SerializeToString()) == "OK"
    print("fuzzed calls by RPC and status:", dict(sorted(SEEN.items())))
    assert sum(SEEN.values()) >= 900
    assert math.isfinite(len(orjson.dumps(dict(SEEN))))

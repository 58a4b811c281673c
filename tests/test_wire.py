"""The compiled wire codec of Score's messages (server/_wire.c) against protobuf.

The decoder must give exactly protobuf's fields for every encoding it takes, and
leave every other one to protobuf (None); the encoder must write bytes protobuf
reads back as the same answer (and, with no features map, the very bytes protobuf
writes)."""

from __future__ import annotations

import math
import struct
from decimal import Decimal

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server import _wire, wire
from streamscore.server.malformed import readable_text
from streamscore.server.wire import (
    MalformedRequest,
    PyScoreFields,
    _decode_py,
    _encode_py,
    parse_score_request,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # no lone surrogates


def test_the_compiled_codec_is_built_and_used() -> None:
    """`pip install` builds it (without a compiler wire.py falls back to protobuf
    quietly, which would leave these tests comparing protobuf with itself)."""
    assert wire.decode_score_request is _wire.decode_score_request
    assert wire.encode_score_response is _wire.encode_score_response
    assert _wire.ScoreFields.__match_args__ == PyScoreFields._fields


def _field_table(message: type) -> dict[str, tuple[int, int]]:
    return {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_the_field_numbers_are_those_of_the_proto() -> None:
    """_wire.c writes down scoring.proto's field numbers and types; a change to the
    proto must change it too."""
    string, int64, boolean, message = (
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_MESSAGE,
    )
    assert _field_table(pb.ScoreRequest) == {
        "request_id": (1, string),
        "transaction": (2, message),
        "include_features": (3, boolean),
    }
    assert _field_table(pb.Transaction) == {
        "transaction_id": (1, string),
        "card_id": (2, string),
        "merchant_id": (3, string),
        "device_id": (4, string),
        "ip": (5, string),
        "amount_minor": (6, int64),
        "currency": (7, string),
        "mcc": (8, string),
        "country": (9, string),
        "event_time_ms": (10, int64),
    }
    assert _field_table(pb.ScoreResponse) == {
        "request_id": (1, string),
        "score": (2, FieldDescriptor.TYPE_DOUBLE),
        "decision": (3, FieldDescriptor.TYPE_ENUM),
        "model": (4, message),
        "features": (5, message),
        "degraded": (6, FieldDescriptor.TYPE_ENUM),
        "timings": (7, message),
    }
    assert _field_table(pb.Timings) == {
        "queue_us": (1, int64),
        "features_us": (2, int64),
        "model_us": (3, int64),
        "total_us": (4, int64),
    }
    # The flat record names the transaction's fields as the proto does, in its order.
    transaction_fields = [f.name for f in pb.Transaction.DESCRIPTOR.fields]
    assert list(PyScoreFields._fields[1:11]) == transaction_fields


transactions = st.builds(
    pb.Transaction,
    transaction_id=TEXT,
    card_id=TEXT,
    merchant_id=TEXT,
    device_id=TEXT,
    ip=TEXT,
    amount_minor=INT64,
    currency=TEXT,
    mcc=TEXT,
    country=TEXT,
    event_time_ms=INT64,
)
requests = st.builds(
    pb.ScoreRequest,
    request_id=TEXT,
    transaction=st.none() | transactions,
    include_features=st.booleans(),
)


def _decoded(data: bytes) -> PyScoreFields | None:
    fields = _wire.decode_score_request(data)
    return None if fields is None else PyScoreFields(*fields)


@settings(max_examples=400)
@given(requests)
@example(pb.ScoreRequest())
@example(pb.ScoreRequest(transaction=pb.Transaction()))  # present, empty
@example(pb.ScoreRequest(transaction=pb.Transaction(amount_minor=-1, event_time_ms=-(2**63))))
def test_a_request_decodes_to_protobufs_fields(request: pb.ScoreRequest) -> None:
    data = request.SerializeToString()
    assert _decoded(data) == _decode_py(data)
    assert type(_wire.decode_score_request(data)) is _wire.ScoreFields


def _varint(value: int) -> bytes:
    value &= 2**64 - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _unknown_field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


unknown_fields = st.one_of(
    st.builds(lambda n, v: _unknown_field(n, 0, _varint(v)), st.integers(11, 2**29 - 1), INT64),
    st.builds(
        lambda n, b: _unknown_field(n, 1, b),
        st.integers(11, 2**29 - 1),
        st.binary(min_size=8, max_size=8),
    ),
    st.builds(
        lambda n, b: _unknown_field(n, 2, _varint(len(b)) + b),
        st.integers(11, 2**29 - 1),
        st.binary(max_size=20),
    ),
    st.builds(
        lambda n, b: _unknown_field(n, 5, b),
        st.integers(11, 2**29 - 1),
        st.binary(min_size=4, max_size=4),
    ),
)


@st.composite
def odd_encodings(draw: st.DrawFn) -> bytes:
    """Valid messages spliced, with unknown fields (also inside the transaction),
    repeated (the last value wins, a repeated transaction merges), then perhaps
    damaged: cut short, or a byte changed."""
    parts = [draw(requests).SerializeToString() for _ in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(0, 3))):
        extra = draw(unknown_fields)
        if draw(st.booleans()):  # inside a transaction of its own
            inner = draw(transactions).SerializeToString() + extra
            extra = _varint(2 << 3 | 2) + _varint(len(inner)) + inner
        parts.insert(draw(st.integers(0, len(parts))), extra)
    data = b"".join(parts)
    damage = draw(st.sampled_from(["none", "cut", "byte"]))
    if data and damage == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif data and damage == "byte":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    return data


@settings(max_examples=600)
@given(odd_encodings() | st.binary(max_size=64))
@example(_unknown_field(11, 3, b"") + _unknown_field(11, 4, b""))  # a group
@example(_unknown_field(1, 0, _varint(5)))  # request_id with a varint's wire type
@example(_unknown_field(3, 0, b"\xff" * 10 + b"\x01"))  # a varint of 11 bytes
@example(_unknown_field(1, 2, b"\x02\xc3\x28"))  # not UTF-8
@example(_unknown_field(3, 0, _varint(2)))  # include_features = 2
@example(b"\x8a\x80\x80\x80\x80\x00\x01r")  # request_id's tag in 6 bytes: refused
@example(b"\x8a\x80\x80\x80\x00\x01r")  # in 5, the most a tag takes: read
def test_any_bytes_decode_as_protobuf_decodes_them(data: bytes) -> None:
    """Where the decoder takes an encoding it gives protobuf's fields; where it
    does not (None), the parser asks protobuf, so Score sees protobuf's answer."""
    reference = _decode_py(data)
    decoded = _decoded(data)
    if decoded is not None:
        assert decoded == reference
    parsed = parse_score_request(data)
    if reference is None:
        assert isinstance(parsed, MalformedRequest)
        assert parsed.type_name == "streamscore.v1.ScoreRequest"
    else:
        assert PyScoreFields(*parsed) == reference


def test_the_decoder_leaves_groups_and_bad_text_to_protobuf() -> None:
    group = _unknown_field(11, 3, b"") + _unknown_field(11, 4, b"")
    assert _wire.decode_score_request(group) is None
    assert parse_score_request(group) == PyScoreFields(encoded_size=len(group))
    not_utf8 = _unknown_field(1, 2, b"\x02\xc3\x28")
    assert _wire.decode_score_request(not_utf8) is None
    assert isinstance(parse_score_request(not_utf8), MalformedRequest)


def test_a_request_that_does_not_parse_keeps_its_readable_id() -> None:
    def bad_card(request_id: str) -> bytes:
        request = pb.ScoreRequest(request_id=request_id, transaction=pb.Transaction(card_id="CARD"))
        return request.SerializeToString().replace(b"CARD", b"\xff\xfe\xed\xa0")

    assert parse_score_request(bad_card("r-7")).request_id == "r-7"
    assert parse_score_request(bad_card("")).request_id == ""
    # The last copy is protobuf's: an unreadable last copy leaves the id unknown.
    two = _unknown_field(1, 2, b"\x01a") + _unknown_field(1, 2, b"\x01\xff")
    assert readable_text(pb.ScoreRequest.DESCRIPTOR, two, "request_id") == ""
    assert readable_text(pb.ScoreRequest.DESCRIPTOR, two[:3], "request_id") == "a"
    assert readable_text(pb.ScoreRequest.DESCRIPTOR, two[:3], "no_such_field") == ""
    cut = _unknown_field(1, 2, b"\x03r-8") + b"\x12\x7f"  # a transaction cut short
    assert parse_score_request(cut).request_id == "r-8"


def test_the_decoder_takes_any_buffer_and_refuses_other_types() -> None:
    data = pb.ScoreRequest(
        request_id="r", transaction=pb.Transaction(card_id="c")
    ).SerializeToString()
    assert _decoded(memoryview(data)) == _decode_py(data)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _wire.decode_score_request("not bytes")  # type: ignore[arg-type]


MODEL_REFS = st.builds(
    lambda name, version, variant: pb.ModelRef(
        name=name, version=version, variant=variant
    ).SerializeToString(),
    TEXT,
    TEXT,
    st.sampled_from([0, pb.PRIMARY, pb.CANARY]),
)
REASONS = st.lists(st.integers(-(2**31), 2**31 - 1) | st.sampled_from([1, 2, 3]), max_size=4)
answers = st.tuples(
    TEXT,
    st.floats(allow_nan=False),
    st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2, 3]),
    MODEL_REFS,
    REASONS.map(tuple),
    st.none() | st.dictionaries(TEXT, st.floats(allow_nan=False), max_size=5),
    INT64,
    INT64,
    INT64,
    INT64,
)


@settings(max_examples=400)
@given(answers)
@example(("", 0.0, 0, b"", (), None, 0, 0, 0, 0))  # every field at its default
@example(("r", -0.0, 1, b"", (), {}, 4, 5, 0, 7))  # -0.0 is written, as protobuf does
def test_an_answer_encodes_as_protobuf_encodes_it(answer: tuple) -> None:  # type: ignore[type-arg]
    encoded = _wire.encode_score_response(*answer)
    reference = _encode_py(*answer)
    assert pb.ScoreResponse.FromString(encoded) == pb.ScoreResponse.FromString(reference)
    if not answer[5]:  # no map: protobuf's very bytes (a map's order is its own)
        assert encoded == reference


def test_nan_scores_and_int_and_numpy_feature_values_encode_exactly() -> None:
    encoded = _wire.encode_score_response("r", math.nan, 1, b"", (), {"n": 3}, 1, 2, 3, 4)
    response = pb.ScoreResponse.FromString(encoded)
    assert math.isnan(response.score)
    assert struct.pack("<d", math.nan) in encoded
    assert response.features == {"n": 3.0}
    numpy_value = _wire.encode_score_response(
        "r", 0.5, 1, b"", (), {"x": np.float64(0.25)}, 1, 2, 3, 4
    )
    assert pb.ScoreResponse.FromString(numpy_value).features == {"x": 0.25}


@pytest.mark.parametrize(
    "bad",
    [
        (1, 0.5, 1, b"", (), None, 0, 0, 0, 0),  # request_id not a str
        ("r", 0.5, 1, "model", (), None, 0, 0, 0, 0),  # model not bytes
        ("r", 0.5, 1, b"", [1], None, 0, 0, 0, 0),  # degraded not a tuple
        ("r", 0.5, 1, b"", (), {1: 0.5}, 0, 0, 0, 0),  # a feature name not a str
        ("r", 0.5, 1, b"", (), {"f": "x"}, 0, 0, 0, 0),  # a feature value not a number
        # Nor one that converts by running Python code (which could change the dict).
        ("r", 0.5, 1, b"", (), {"f": Decimal("0.5")}, 0, 0, 0, 0),
        ("r", 0.5, 1, b"", (), {"f": 2**1024}, 0, 0, 0, 0),  # an int beyond a double
        ("r", "x", 1, b"", (), None, 0, 0, 0, 0),  # score not a number
        ("r", 0.5, 1, b"", (), None, 0, 0, 0, 2**64),  # a timing beyond int64
    ],
)
def test_the_encoder_refuses_wrong_types(bad: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises((TypeError, OverflowError)):
        _wire.encode_score_response(*bad)
    with pytest.raises(TypeError):
        _wire.encode_score_response("r", 0.5)  # type: ignore[call-arg]


FALLBACK_CHECK = """
import sys
sys.modules["streamscore.server._wire"] = None  # as built without a C compiler
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server import wire
assert wire.decode_score_request is wire._undecided
data = pb.ScoreRequest(
    request_id="r", transaction=pb.Transaction(card_id="c", merchant_id="m")
).SerializeToString()
assert wire.parse_score_request(data) == wire._decode_py(data)
assert isinstance(wire.parse_score_request(b"\\xff"), wire.MalformedRequest)
answer = ("r", 0.5, 1, b"", (2,), {"f": 1.0}, 1, 2, 3, 4)
assert wire.encode_score_response(*answer) == wire._encode_py(*answer)
print("fallback ok")
"""


def test_without_the_compiled_codec_protobuf_does_the_same() -> None:
    """A build without a C compiler (in a process of its own, so this one keeps its
    classes): ``wire`` falls back to protobuf for both messages, with the same answers."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_CHECK], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "fallback ok", done.stderr

"""Score's request and response on the wire, without protobuf objects on the hot path.

``parse_score_request`` is the gRPC request deserializer of Score and ScoreStream: a
request's bytes become one flat ``ScoreFields`` record (the transaction's fields
flattened in), which validation and Score read like attributes. ``encode_score_response``
writes an answer's bytes from its fields. Both are compiled (``_wire.c``) where a
compiler built them; the Python versions below do the same through protobuf, and are
the reference the compiled ones are tested against (tests/test_wire.py).

Why: under load Score runs with cold caches and costs about what it touches. Through
protobuf, a request is a message, a transaction made on first access and a new object
per field read, and an answer is a template copy, a timings message and a
serialization pass: 17-21 us of CPU cold for the two, against 9-10 here, of a Score
body of about 100 (``python -m loadtest.wire_cost``; BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.malformed import MalformedRequest, parse_lenient


class PyScoreFields(NamedTuple):
    """A ScoreRequest's fields, the transaction's flattened in (the compiled decoder's
    ``ScoreFields`` has the same fields in the same order)."""

    request_id: str = ""
    transaction_id: str = ""
    card_id: str = ""
    merchant_id: str = ""
    device_id: str = ""
    ip: str = ""
    amount_minor: int = 0
    currency: str = ""
    mcc: str = ""
    country: str = ""
    event_time_ms: int | None = None  # None: not set (0 is a time)
    include_features: bool = False
    has_transaction: bool = False  # whether the request has a transaction at all
    encoded_size: int = 0  # the request's size in bytes; no string in it is longer


def fields_of_message(request: pb.ScoreRequest, encoded_size: int | None = None) -> PyScoreFields:
    """The record of a protobuf request; ``encoded_size``: the size of the bytes it
    was parsed from (by default the size of its own encoding)."""
    t = request.transaction
    return PyScoreFields(
        request.request_id,
        t.transaction_id,
        t.card_id,
        t.merchant_id,
        t.device_id,
        t.ip,
        t.amount_minor,
        t.currency,
        t.mcc,
        t.country,
        t.event_time_ms if t.HasField("event_time_ms") else None,
        request.include_features,
        request.HasField("transaction"),
        request.ByteSize() if encoded_size is None else encoded_size,
    )


def _decode_py(data: bytes) -> PyScoreFields | None:
    """The reference decoder: protobuf's parse, as a record (None: not a message, or
    one with a field sent as another type, which ``parse_score_request`` refuses)."""
    parsed = _parse_py(data)
    return None if isinstance(parsed, MalformedRequest) else parsed


def _parse_py(data: bytes) -> PyScoreFields | MalformedRequest:
    """The request through protobuf: its record, or a ``MalformedRequest`` for bytes
    that are not a message, or a message with a field sent as another type."""
    request = parse_lenient(pb.ScoreRequest, data)
    if isinstance(request, MalformedRequest):
        return request
    return fields_of_message(request, len(data))


def _encode_py(
    request_id: str,
    score: float,
    decision: int,
    model: bytes,
    degraded: tuple[int, ...],
    features: dict[str, float] | None,
    queue_us: int,
    features_us: int,
    model_us: int,
    total_us: int,
) -> bytes:
    """The reference encoder: the answer as a protobuf message, serialized.
    ``model``: the encoded ``ModelRef``."""
    response = pb.ScoreResponse(
        request_id=request_id,
        score=score,
        decision=decision,  # type: ignore[arg-type]
        model=pb.ModelRef.FromString(model),
        degraded=degraded,  # type: ignore[arg-type]
        timings=pb.Timings(
            queue_us=queue_us, features_us=features_us, model_us=model_us, total_us=total_us
        ),
    )
    if features is not None:
        response.features.update(features)
    return response.SerializeToString()


def _undecided(data: bytes) -> None:
    """No compiled decoder: every request is left to protobuf (``parse_score_request``),
    which then parses it once."""
    return None


decode_score_request: Callable[[bytes], Any] = _undecided
encode_score_response: Callable[..., bytes] = _encode_py
try:
    from streamscore.server import _wire
except ImportError:  # built without a C compiler: protobuf does it, only slower
    pass
else:
    decode_score_request = _wire.decode_score_request
    encode_score_response = _wire.encode_score_response


def parse_score_request(data: bytes) -> PyScoreFields | MalformedRequest:
    """Score's request deserializer; never raises (see ``MalformedRequest``). Bytes the
    compiled decoder leaves undecided (odd encodings, a field sent as another type,
    or not a message) go to protobuf, which decides."""
    fields = decode_score_request(data)
    return fields if fields is not None else _parse_py(data)

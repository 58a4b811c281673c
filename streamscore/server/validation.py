"""Validation of incoming requests: each problem raises ``InvalidRequest`` naming the field."""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from google.protobuf.message import DecodeError, Message

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.errors import InvalidRequest
from streamscore.stream.features import ENTITY_TYPES

MAX_ID_LENGTH = 256
_REQUIRED_IDS = ("card_id", "merchant_id")
# Card-present payments may have no IP, and not every channel has a device id.
_OPTIONAL_STRINGS = ("transaction_id", "device_id", "ip", "currency", "mcc", "country")
_string_fields = attrgetter(*_REQUIRED_IDS, *_OPTIONAL_STRINGS)


class MalformedRequest:
    """Stands in for a request whose bytes are not the RPC's message type.

    gRPC's own deserializer raises on such bytes and the caller sees UNKNOWN; ours
    (``lenient_parser``) hands this to the handler instead, which answers
    INVALID_ARGUMENT saying so."""

    # Read by ScoreStream when it names the request in an error; unknown here.
    request_id = ""

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error


def lenient_parser(message_type: type[Message]) -> Any:
    """A request deserializer that never raises (see ``MalformedRequest``)."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return MalformedRequest(name, str(error))

    return parse


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequest("request", f"not a valid {request.type_name} message")


def _check_length(field: str, value: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise InvalidRequest(field, f"longer than {MAX_ID_LENGTH} characters")


def validate_score_request(request: pb.ScoreRequest, *, replay: bool) -> None:
    _check_parsed(request)
    # No string field is longer (in characters) than the whole message's encoding (in
    # bytes): when that fits the limit, as it usually does, no length needs checking.
    # ByteSize is one C call; reading the nine strings costs twice as much.
    long_fields = request.ByteSize() > MAX_ID_LENGTH
    if long_fields:
        _check_length("request_id", request.request_id)
    if not request.HasField("transaction"):
        raise InvalidRequest("transaction", "is required")
    txn = request.transaction
    for name in _REQUIRED_IDS:
        if not getattr(txn, name):
            raise InvalidRequest(f"transaction.{name}", "is required")
    # One pass over the lengths; name the field only when one is too long.
    if long_fields and max(map(len, _string_fields(txn))) > MAX_ID_LENGTH:
        for name in (*_REQUIRED_IDS, *_OPTIONAL_STRINGS):
            _check_length(f"transaction.{name}", getattr(txn, name))
    if txn.amount_minor < 0:
        raise InvalidRequest("transaction.amount_minor", "must not be negative")
    if txn.event_time_ms < 0:
        raise InvalidRequest("transaction.event_time_ms", "must not be negative")
    if replay and txn.event_time_ms == 0:
        raise InvalidRequest("transaction.event_time_ms", "is required in replay mode")


def validate_features_request(request: pb.FeaturesRequest) -> None:
    _check_parsed(request)
    if request.entity_type not in ENTITY_TYPES:
        raise InvalidRequest("entity_type", f"must be one of {', '.join(ENTITY_TYPES)}")
    if not request.entity_id:
        raise InvalidRequest("entity_id", "is required")
    _check_length("entity_id", request.entity_id)
    if request.as_of_ms < 0:
        raise InvalidRequest("as_of_ms", "must not be negative")

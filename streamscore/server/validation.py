"""Validation of incoming requests: each problem raises ``InvalidRequest`` naming the field."""

from __future__ import annotations

import functools
from operator import attrgetter
from typing import Any

from google.protobuf.message import Message

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.errors import InvalidRequest
from streamscore.server.malformed import MalformedRequest, parse_lenient
from streamscore.server.wire import PyScoreFields
from streamscore.stream.features import ENTITY_TYPES

MAX_ID_LENGTH = 256
_REQUIRED_IDS = ("card_id", "merchant_id")
# Card-present payments may have no IP, and not every channel has a device id.
_OPTIONAL_STRINGS = ("transaction_id", "device_id", "ip", "currency", "mcc", "country")
_transaction_strings = attrgetter(*_REQUIRED_IDS, *_OPTIONAL_STRINGS)


def lenient_parser(message_type: type[Message]) -> Any:
    """A request deserializer that never raises (see ``MalformedRequest``)."""
    return functools.partial(parse_lenient, message_type)


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequest(request.field, request.reason)


def _check_length(field: str, value: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise InvalidRequest(field, f"longer than {MAX_ID_LENGTH} characters")


def validate_score_request(request: PyScoreFields | MalformedRequest, *, replay: bool) -> None:
    """Check a request's fields as ``parse_score_request`` gives them (server/wire.py)."""
    if isinstance(request, MalformedRequest):
        raise InvalidRequest(request.field, request.reason)
    # No string field is longer (in characters) than the whole message's encoding (in
    # bytes): when that fits the limit, as it usually does, no length needs checking.
    long_fields = request.encoded_size > MAX_ID_LENGTH
    if long_fields:
        _check_length("request_id", request.request_id)
    if not request.has_transaction:
        raise InvalidRequest("transaction", "is required")
    if not request.card_id:
        raise InvalidRequest("transaction.card_id", "is required")
    if not request.merchant_id:
        raise InvalidRequest("transaction.merchant_id", "is required")
    # One pass over the lengths; name the field only when one is too long.
    if long_fields and max(map(len, _transaction_strings(request))) > MAX_ID_LENGTH:
        for name in (*_REQUIRED_IDS, *_OPTIONAL_STRINGS):
            _check_length(f"transaction.{name}", getattr(request, name))
    if request.amount_minor < 0:
        raise InvalidRequest("transaction.amount_minor", "must not be negative")
    if request.event_time_ms is None:
        if replay:
            raise InvalidRequest("transaction.event_time_ms", "is required in replay mode")
    elif request.event_time_ms < 0:
        raise InvalidRequest("transaction.event_time_ms", "must not be negative")


def validate_features_request(request: pb.FeaturesRequest) -> None:
    _check_parsed(request)
    if request.entity_type not in ENTITY_TYPES:
        raise InvalidRequest("entity_type", f"must be one of {', '.join(ENTITY_TYPES)}")
    if not request.entity_id:
        raise InvalidRequest("entity_id", "is required")
    _check_length("entity_id", request.entity_id)
    if request.as_of_ms < 0:
        raise InvalidRequest("as_of_ms", "must not be negative")

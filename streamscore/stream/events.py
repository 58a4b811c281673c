"""Payment events: the schema on the ``payments`` topic and its validation.

A malformed event never stops the processor: ``parse_event`` raises ``InvalidEvent``
with a short machine-readable reason, which the worker sends to the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

STATUSES = ("approved", "declined")
_STRING_FIELDS = ("event_id", "card_id", "merchant_id", "device_id", "ip", "currency", "country")
# A card-present payment has no device or IP: it counts for its card and merchant,
# and for no device or IP entity (as a ScoreRequest without them reads none).
OPTIONAL_IDS = ("device_id", "ip")
# Guards against absurd inputs (e.g. a 10 MB card id) reaching the state.
MAX_FIELD_LENGTH = 256
MAX_AMOUNT_MINOR = 2**63 - 1
# Times are int64 milliseconds, as on the wire (ScoreRequest) and in the compiled
# state; a later one is refused here, not left to overflow there.
MAX_EVENT_TIME_MS = 2**63 - 1


class InvalidEvent(ValueError):
    """A payment event that cannot be folded; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    event_id: str
    event_time_ms: int
    card_id: str
    merchant_id: str
    device_id: str
    ip: str
    amount_minor: int
    currency: str
    mcc: str
    country: str
    status: str

    @property
    def declined(self) -> bool:
        return self.status == "declined"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "event_id": self.event_id,
                "event_time_ms": self.event_time_ms,
                "card_id": self.card_id,
                "merchant_id": self.merchant_id,
                "device_id": self.device_id,
                "ip": self.ip,
                "amount_minor": self.amount_minor,
                "currency": self.currency,
                "mcc": self.mcc,
                "country": self.country,
                "status": self.status,
            }
        )


def _int_field(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if value is None:
        raise InvalidEvent("missing_field", name)
    # bool is an int subclass in Python; JSON true is not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        # orjson reads an integer literal past 64 bits as a float: out of range, not
        # of the wrong type (a float literal that large is out of range too).
        if isinstance(value, float) and abs(value) >= 2.0**63:
            raise InvalidEvent("bad_value", f"{name} out of int64 range")
        raise InvalidEvent("bad_type", f"{name} must be an integer")
    return value


def _str_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise InvalidEvent("missing_field", name)
    if not isinstance(value, str):
        raise InvalidEvent("bad_type", f"{name} must be a string")
    if not value and name not in OPTIONAL_IDS:
        raise InvalidEvent("empty_field", name)
    if len(value) > MAX_FIELD_LENGTH:
        raise InvalidEvent("field_too_long", name)
    return value


def event_from_dict(data: Any) -> PaymentEvent:
    if not isinstance(data, dict):
        raise InvalidEvent("not_an_object")
    strings = {name: _str_field(data, name) for name in _STRING_FIELDS}
    event_time_ms = _int_field(data, "event_time_ms")
    if event_time_ms < 0:
        raise InvalidEvent("bad_value", "event_time_ms must not be negative")
    if event_time_ms > MAX_EVENT_TIME_MS:
        raise InvalidEvent("bad_value", "event_time_ms out of int64 range")
    amount_minor = _int_field(data, "amount_minor")
    if amount_minor < 0:
        raise InvalidEvent("negative_amount", "amount_minor")
    if amount_minor > MAX_AMOUNT_MINOR:
        raise InvalidEvent("bad_value", "amount_minor out of int64 range")
    mcc = data.get("mcc")
    if mcc is None:
        raise InvalidEvent("missing_field", "mcc")
    # MCCs are four-digit codes; producers send them as strings or numbers.
    if isinstance(mcc, bool) or not isinstance(mcc, str | int):
        raise InvalidEvent("bad_type", "mcc must be a string or integer")
    if mcc == "":
        raise InvalidEvent("empty_field", "mcc")
    if isinstance(mcc, int) and mcc < 0:
        raise InvalidEvent("bad_value", "mcc must not be negative")
    if isinstance(mcc, str) and len(mcc) > MAX_FIELD_LENGTH:
        raise InvalidEvent("field_too_long", "mcc")
    status = data.get("status")
    if status is None:
        raise InvalidEvent("missing_field", "status")
    if status not in STATUSES:
        raise InvalidEvent("bad_value", "status must be approved or declined")
    return PaymentEvent(
        event_id=strings["event_id"],
        event_time_ms=event_time_ms,
        card_id=strings["card_id"],
        merchant_id=strings["merchant_id"],
        device_id=strings["device_id"],
        ip=strings["ip"],
        amount_minor=amount_minor,
        currency=strings["currency"],
        mcc=str(mcc),
        country=strings["country"],
        status=status,
    )


def parse_event(raw: bytes | str | None) -> PaymentEvent:
    """Parse and validate one JSON event; raises ``InvalidEvent``."""
    if raw is None:
        raise InvalidEvent("empty_message")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("bad_json", str(exc)[:200]) from None
    return event_from_dict(data)

"""Requests whose bytes do not parse: a stand-in for the handler, naming the field.

gRPC's own deserializers raise on such bytes and the caller sees UNKNOWN. Ours (Score's
wire codec, ``validation.lenient_parser``, ``guarded.add_guarded``) hand the handler a
``MalformedRequest`` instead, which is answered INVALID_ARGUMENT. Where the bytes are
well formed but a string field is not UTF-8 (protobuf refuses those, saying only
"String field had bad UTF-8"), it names that field, as every other refusal does.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

M = TypeVar("M", bound=Message)

# Wire types (protobuf encoding): varint, 64-bit, length-delimited, 32-bit.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DEPTH = 32  # nested messages followed (a deeper one is left unnamed)


class MalformedRequest:
    """Stands in for a request whose bytes are not the RPC's message type."""

    # Read by Score (for its log lines) and ScoreStream (naming the request in an
    # error): the request's own id where its bytes still show it, the card unknown.
    card_id = ""

    def __init__(self, descriptor: Descriptor, data: bytes, mistyped: str | None = None) -> None:
        self.type_name = descriptor.full_name
        self.request_id = readable_text(descriptor, data, "request_id")
        # What validation answers: the field and why.
        if mistyped is not None:
            self.field, self.reason = mistyped, "sent as another type than the field's"
            return
        text_field = bad_text_field(descriptor, data)
        self.field, self.reason = (
            (text_field, "not valid UTF-8")
            if text_field is not None
            else ("request", f"not a valid {self.type_name} message")
        )


def parse_lenient(message_type: type[M], data: bytes) -> M | MalformedRequest:
    """``data`` parsed by protobuf as ``message_type``; never raises: bytes that are not
    such a message, or one with a field sent as another type (``mistyped_field``),
    give a ``MalformedRequest``."""
    try:
        message = message_type.FromString(data)
    except DecodeError:
        return MalformedRequest(message_type.DESCRIPTOR, data)
    mistyped = mistyped_field(message)
    return message if mistyped is None else MalformedRequest(message.DESCRIPTOR, data, mistyped)


def mistyped_field(message: Message) -> str | None:
    """The dotted name of the first field sent with a wire type its type never has
    (``transaction.amount_minor`` as a string, say); None when there is none.
    Protobuf keeps such a field among the unknown ones and reads the field as unset:
    a payment whose amount was sent as text was scored as an amount of 0."""
    known = message.DESCRIPTOR.fields_by_number
    for unknown in UnknownFieldSet(message):
        field = known.get(unknown.field_number)
        if field is not None:
            return field.name
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                inner = mistyped_field(item)
                if inner is not None:
                    return f"{field.name}[{i}].{inner}"
        else:
            inner = mistyped_field(value)
            if inner is not None:
                return f"{field.name}.{inner}"
    return None


def bad_text_field(descriptor: Descriptor, data: bytes) -> str | None:
    """The dotted name of the first string field in ``data`` that is not valid UTF-8
    (``transaction.card_id``); None when there is none, or the bytes are not well
    formed enough to tell."""
    try:
        return _walk(descriptor, memoryview(data), 0)
    except (IndexError, ValueError):
        return None


def readable_text(descriptor: Descriptor, data: bytes, name: str) -> str:
    """The top-level string field ``name`` as far as ``data`` shows it (the last
    readable copy, as protobuf takes the last); "" when it is absent, not UTF-8, or
    the bytes break before it. Best effort, for naming a request that did not parse."""
    field = descriptor.fields_by_name.get(name)
    if field is None or field.type != FieldDescriptor.TYPE_STRING:
        return ""
    text, view, at = "", memoryview(data), 0
    try:
        while at < len(view):
            key, at = _varint(view, at)
            wire_type = key & 7
            if wire_type == _VARINT:
                _, at = _varint(view, at)
            elif wire_type in (_I64, _I32):
                at += 8 if wire_type == _I64 else 4
            elif wire_type == _LEN:
                length, at = _varint(view, at)
                if at + length > len(view):
                    break
                if key >> 3 == field.number:
                    try:
                        text = str(view[at : at + length], "utf-8")
                    except UnicodeDecodeError:
                        text = ""  # this copy, the one protobuf would take, is unreadable
                at += length
            else:
                break
    except (IndexError, ValueError):  # a varint past the end, or too long
        pass
    return text


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _walk(descriptor: Descriptor, data: memoryview, depth: int) -> str | None:
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, at = _varint(data, at)
        elif wire_type == _I64:
            at += 8
        elif wire_type == _I32:
            at += 4
        elif wire_type == _LEN:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise ValueError("length past the end")
            payload, at = data[at : at + length], at + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    str(payload, "utf-8")
                except UnicodeDecodeError:
                    return field.name
            elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < _MAX_DEPTH:
                inner = _walk(field.message_type, payload, depth + 1)
                if inner is not None:
                    return f"{field.name}.{inner}"
        else:  # groups and reserved wire types: not ours to follow
            raise ValueError(f"wire type {wire_type}")
    return None

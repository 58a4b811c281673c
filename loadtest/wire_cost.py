"""CPU of Score's messages on the wire: protobuf objects against the wire codec.

Each side timed alone in process, per message, on 1,000 realistic requests, hot (back
to back) and cold (a 4 MiB sweep before each message, beyond a core's L2, as under
gRPC load; see ``score_profile --cold``):

* request, protobuf: ``ScoreRequest.FromString``, then what validation and Score read
  before ``server/wire.py`` (the transaction object made on each access, a new object
  per field read);
* request, wire: ``parse_score_request`` (the compiled decoder into one flat record),
  ``validate_score_request`` and the same field reads;
* response, protobuf: a ``ScoreResponse`` copied from a template, its fields and
  timings set, serialized;
* response, wire: ``encode_score_response`` with the same fields.

    python -m loadtest.wire_cost [--passes 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.malformed import MalformedRequest
from streamscore.server.validation import MAX_ID_LENGTH, validate_score_request
from streamscore.server.wire import encode_score_response, parse_score_request

TEMPLATE = pb.ScoreResponse(model=pb.ModelRef(name="fraud_mlp", version="1", variant=pb.PRIMARY))
MODEL_REF = TEMPLATE.model.SerializeToString()


def requests(n: int = 1000) -> list[bytes]:
    return [
        pb.ScoreRequest(
            request_id=f"req-{i:08d}",
            transaction=pb.Transaction(
                transaction_id=f"txn-{i:08d}",
                card_id=f"card-{i:06d}",
                merchant_id=f"merchant-{i % 500}",
                device_id=f"device-{i}",
                ip=f"10.0.{i % 250}.{i % 200}",
                amount_minor=1234 + i,
                currency="EUR",
                mcc="5411",
                country="DE",
                event_time_ms=1_764_000_000_000 + i,
            ),
        ).SerializeToString()
        for i in range(n)
    ]


def request_protobuf(data: bytes) -> object:
    """What validation and Score did with a protobuf request before ``wire.py``."""
    request = pb.ScoreRequest.FromString(data)
    # Validation: the size shortcut for lengths, presence, required ids, signs.
    if request.ByteSize() > MAX_ID_LENGTH or not request.HasField("transaction"):
        raise ValueError("not a request this measure uses")
    txn = request.transaction
    for name in ("card_id", "merchant_id"):
        if not getattr(txn, name):
            raise ValueError(f"{name} is required")
    if txn.amount_minor < 0 or txn.event_time_ms < 0:
        raise ValueError("negative")
    # Score: every field it reads, once (each read a new object).
    txn = request.transaction
    return (
        request.request_id,
        txn.card_id,
        txn.merchant_id,
        txn.device_id,
        txn.ip,
        txn.amount_minor,
        txn.event_time_ms,
        request.include_features,
    )


def request_wire(data: bytes) -> object:
    r = parse_score_request(data)
    validate_score_request(r, replay=False)
    assert not isinstance(r, MalformedRequest)
    return (
        r.request_id,
        r.card_id,
        r.merchant_id,
        r.device_id,
        r.ip,
        r.amount_minor,
        r.event_time_ms,
        r.include_features,
    )


def response_protobuf(_: bytes) -> bytes:
    response = pb.ScoreResponse()
    response.CopyFrom(TEMPLATE)
    response.request_id = "req-00000123"
    response.score = 0.25
    response.decision = pb.APPROVE
    timings = response.timings
    timings.features_us, timings.model_us, timings.total_us = 40, 20, 90
    return response.SerializeToString()


def response_wire(_: bytes) -> bytes:
    return encode_score_response(
        "req-00000123", 0.25, pb.APPROVE, MODEL_REF, (), None, 0, 40, 20, 90
    )


def per_message_us(work: Callable[[bytes], object], messages: list[bytes], cold: bool) -> float:
    """Thread CPU per message, the work alone (the eviction is outside the clock)."""
    array = np.ones(512 * 1024)
    objects = list(range(10**6, 10**6 + 64 * 1024))  # ints beyond the small-int cache
    spent = 0.0
    for data in messages:
        if cold:
            array.sum()
            sum(objects)
        started = time.thread_time()
        work(data)
        spent += time.thread_time() - started
    return spent / len(messages) * 1e6


def main(args: argparse.Namespace) -> None:
    messages = requests()
    print("| message | hot us | cold us |\n|---|---|---|")
    for name, work in (
        ("request, protobuf (parse, validation, field reads)", request_protobuf),
        ("request, wire (parse, validation, field reads)", request_wire),
        ("response, protobuf (template copy, fields, serialize)", response_protobuf),
        ("response, wire (encode)", response_wire),
    ):
        hot = statistics.median(per_message_us(work, messages, False) for _ in range(args.passes))
        cold = statistics.median(per_message_us(work, messages, True) for _ in range(args.passes))
        print(f"| {name} | {hot:.1f} | {cold:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3, help="median of this many passes")
    main(parser.parse_args())

"""Online = offline: the served features equal the backfill's, for every event.

The same synthetic log (fraud patterns, ties on timestamps, redelivered duplicates,
card-present payments)
goes through the offline backfill and, in event-time order, through Kafka to a real
worker and a real server in replay mode. Each transaction is scored before its own
event is ingested, and every served feature must equal the backfill's (DESIGN.md,
"Online = offline"). This is the guarantee training data rests on.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import transaction_from_event
from streamscore.config import Settings
from streamscore.stream.backfill import backfill, fold_event
from streamscore.stream.events import event_from_dict
from streamscore.stream.features import ENTITY_FIELD, ENTITY_TYPES
from streamscore.stream.state import FeatureStore
from streamscore.stream.topics import PAYMENTS
from streamscore.traffic import TrafficConfig, generate_log

from system import running_system

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def parity_log() -> list[dict]:
    """A busy small population so windows fill up, plus ties and redeliveries."""
    config = TrafficConfig(rate_per_s=2.0, n_cards=25, n_merchants=8, fraud_fraction=0.2, seed=5)
    events = [item.event for item in generate_log(config, 240)]
    # Card-present payments: no device, no IP; they count for card and merchant only.
    for event in events[3::11]:
        event["device_id"] = event["ip"] = ""
    # Ties: several events at exactly the same millisecond (ordered by event_id).
    for event in events[10:14]:
        event["event_time_ms"] = events[10]["event_time_ms"]
    # Redeliveries: an exact copy of an earlier event, sent again right after it.
    with_duplicates: list[dict] = []
    for i, event in enumerate(events):
        with_duplicates.append(event)
        if i % 97 == 5:
            with_duplicates.append(dict(event))
    # Copies that differ, which the contract leaves open: the stream counts one in each
    # entity that has not seen its id (here a merchant, device and ip of its own, then
    # a card paying there), and the backfill must count it just the same.
    first = events[40]
    with_duplicates.append(
        {**first, "merchant_id": "m-copy", "device_id": "d-copy", "ip": "203.0.113.9"}
    )
    with_duplicates.append(
        {
            **events[41],
            "event_id": "after-copy",
            "event_time_ms": first["event_time_ms"] + 1,
            "card_id": "card-after-copy",
            "merchant_id": "m-copy",
            "device_id": "d-copy",
            "ip": "203.0.113.9",
        }
    )
    return with_duplicates


async def wait_ingested(stub: pb_grpc.ScoringStub, expected: dict[tuple[str, str], int]) -> None:
    deadline = time.monotonic() + 30
    pending = dict(expected)
    while pending:
        for (entity_type, entity_id), count in list(pending.items()):
            reply = await stub.GetFeatures(
                pb.FeaturesRequest(entity_type=entity_type, entity_id=entity_id), timeout=5
            )
            if reply.events_folded >= count:
                del pending[(entity_type, entity_id)]
        if pending:
            assert time.monotonic() < deadline, f"not folded in time: {pending}"
            await asyncio.sleep(0.005)


async def test_served_features_equal_backfill_for_every_event(
    tmp_path: Path, trained_model: Path
) -> None:
    log = parity_log()
    order = sorted(range(len(log)), key=lambda i: (log[i]["event_time_ms"], log[i]["event_id"]))
    offline = {
        event.event_id: features for event, features in backfill(event_from_dict(e) for e in log)
    }
    assert len(offline) == len({e["event_id"] for e in log})
    # What each entity has folded after each event, by the stream's own rules (the
    # store the server runs), to wait for before the next Score: the check is the
    # comparison of the served values with the backfill's, not these counts.
    mirror = FeatureStore(fold_horizon_ms=Settings().fold_horizon_ms)
    compared = 0
    async with running_system(tmp_path, trained_model, server_args=("--replay",)) as (
        bootstrap,
        targets,
    ):
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            async with grpc.aio.insecure_channel(targets[0]) as channel:
                stub = pb_grpc.ScoringStub(channel)
                scored: set[str] = set()
                for i in order:
                    event = log[i]
                    if event["event_id"] not in scored:  # a redelivery is not a new payment
                        scored.add(event["event_id"])
                        response = await stub.Score(
                            pb.ScoreRequest(
                                request_id=event["event_id"],
                                transaction=transaction_from_event(event),
                                include_features=True,
                            ),
                            timeout=5,
                        )
                        expected = offline[event["event_id"]]
                        served = dict(response.features)
                        assert served.keys() == expected.keys()
                        for name, value in expected.items():
                            assert served[name] == value, (
                                event["event_id"],
                                name,
                                served[name],
                                value,
                            )
                        compared += 1
                    await producer.send_and_wait(
                        PAYMENTS, orjson.dumps(event), key=event["card_id"].encode()
                    )
                    fold_event(mirror, event_from_dict(event))
                    touched = {
                        (entity, event[ENTITY_FIELD[entity]])
                        for entity in ENTITY_TYPES
                        if event[ENTITY_FIELD[entity]]  # (none for a card-present payment)
                    }
                    await wait_ingested(stub, {key: mirror.summary(*key)[1] for key in touched})
        finally:
            await producer.stop()
    assert compared == len(offline) > 400

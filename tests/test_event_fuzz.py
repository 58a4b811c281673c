"""Malformed payment events: the validator never fails any other way than InvalidEvent
(hypothesis, arbitrary bytes and mutated events), and on the real broker every bad
event of a mutated stream lands in the dead-letter topic while the good ones fold and
the worker and server stay up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import given, settings
from hypothesis import strategies as st

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.loopback_process import find_free_port
from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.events import InvalidEvent, parse_event
from streamscore.stream.routing import (
    DLQ_KEY_MAX_BYTES,
    DLQ_PAYLOAD_MAX_BYTES,
    DLQ_RECORD_MAX_BYTES,
    dead_letter,
)
from streamscore.stream.topics import (
    DEAD_LETTER,
    ENTITY_EVENTS,
    PAYMENTS,
    TopicLayout,
    decode_fold_batch,
)

from system import make_event, publish, running_system

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()  # NaN and infinities included: json.dumps writes them as bare tokens
    | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def good_event(t_ms: int = 1_700_000_000_000) -> dict:
    return make_event("card-1", "m-1", "d-1", "198.51.100.7", t_ms, 1_250)


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    event = good_event()
    for name in draw(st.sets(st.sampled_from(sorted(event)), max_size=4)):
        if draw(st.booleans()):
            del event[name]
        else:
            event[name] = draw(JSON_VALUES)
    # The stdlib, not orjson: it writes integers past 64 bits and NaN / Infinity.
    return json.dumps(event).encode()


@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(st.binary(max_size=400), mutated_events(), st.text(max_size=200)))
def test_the_validator_only_ever_raises_invalid_event(raw: bytes | str) -> None:
    try:
        event = parse_event(raw)
    except InvalidEvent as error:
        assert error.reason and " " not in error.reason
        return
    # Whatever passed is a well-formed event.
    assert event.amount_minor >= 0 and event.event_time_ms >= 0
    assert event.status in ("approved", "declined")
    assert all(
        isinstance(v, str) and 0 < len(v) <= 256
        for v in (event.event_id, event.card_id, event.merchant_id, event.currency)
    )


def worker_dead_letters(port: int) -> Counter[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("streamscore_worker_dead_lettered_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def _without(event: dict, name: str) -> dict:
    return {k: v for k, v in event.items() if k != name}


def bad_payloads(rng: random.Random, now_ms: int, n: int) -> list[bytes]:
    """n events each broken in one unambiguous way (DESIGN.md "Events")."""
    makers = [
        lambda e: b"",
        lambda e: b"\xff\xfe not utf-8 \x80",
        lambda e: orjson.dumps(e)[: rng.randint(1, 40)],  # truncated
        lambda e: b"[" + orjson.dumps(e) + b"]",  # not an object
        lambda e: b"42",
        lambda e: orjson.dumps(e).replace(b'"amount_minor":1250', b'"amount_minor":NaN'),
        lambda e: orjson.dumps(e).replace(b'"amount_minor":1250', b'"amount_minor":Infinity'),
        lambda e: orjson.dumps({**e, "amount_minor": -rng.randint(1, 10**6)}),
        lambda e: orjson.dumps({**e, "amount_minor": 1250.5}),
        lambda e: orjson.dumps({**e, "amount_minor": "1250"}),
        lambda e: orjson.dumps({**e, "amount_minor": True}),
        lambda e: orjson.dumps(e).replace(b"1250", b"100000000000000000000000"),  # > int64
        lambda e: orjson.dumps(_without(e, rng.choice(sorted(e)))),
        lambda e: orjson.dumps({**e, "card_id": ""}),
        lambda e: orjson.dumps({**e, "card_id": "c" * 10_000}),
        lambda e: orjson.dumps({**e, "merchant_id": 7}),
        lambda e: orjson.dumps({**e, "status": "maybe"}),
        lambda e: orjson.dumps({**e, "event_time_ms": -5}),
        lambda e: orjson.dumps({**e, "event_time_ms": now_ms + 10 * 24 * 3_600_000}),  # future
        lambda e: orjson.dumps({**e, "device_id": {"nested": [1, 2, {"deep": None}]}}),
    ]
    payloads = []
    for i in range(n):
        event = make_event("card-bad", "m-bad", "d-bad", "192.0.2.1", now_ms - i, 1_250)
        payloads.append(makers[i % len(makers)](event))
    return payloads


@settings(max_examples=200, deadline=None)
@given(
    unit=st.binary(min_size=1, max_size=8),
    repeat=st.sampled_from([1, 1000, DLQ_PAYLOAD_MAX_BYTES // 3, 300_000]),
    key=st.none() | st.binary(max_size=40) | st.sampled_from([b"k" * 1025, b"\xff" * 900_000]),
)
def test_a_dead_letter_record_is_bounded_and_keeps_the_payload_exactly(
    unit: bytes, repeat: int, key: bytes | None
) -> None:
    """Whatever the bytes and the key, the record fits DLQ_RECORD_MAX_BYTES (a 700 kB
    key, or a payload of control characters that JSON escapes 6-fold, made a record
    over the producer's limit, which crashed the worker at every start: audit AH)."""
    raw = unit * repeat
    error = InvalidEvent("bad_json", "\x00" * 5000)
    out_key, value = dead_letter(raw, key, error, {"topic": PAYMENTS, "partition": 0, "offset": 7})
    assert len(out_key or b"") + len(value) <= DLQ_RECORD_MAX_BYTES
    letter = orjson.loads(value)
    kept, length = dead_letter_payload(letter)
    assert length == len(raw)
    if "payload" in letter:  # text: a cut may drop only a split last character
        assert raw[: len(kept)] == kept and len(kept) > min(len(raw), DLQ_PAYLOAD_MAX_BYTES) - 4
    else:
        assert kept == raw[:DLQ_PAYLOAD_MAX_BYTES]
    if key is not None and len(key) > DLQ_KEY_MAX_BYTES:
        assert out_key == key[:DLQ_KEY_MAX_BYTES]
        assert letter["key_truncated"] is True and letter["key_bytes"] == len(key)
    else:
        assert out_key == key and "key_truncated" not in letter


def dead_letter_payload(letter: dict) -> tuple[bytes, int]:
    """A dead-letter record's payload bytes, and the length of the original."""
    if "payload_base64" in letter:
        kept = base64.b64decode(letter["payload_base64"])
    else:
        kept = letter["payload"].encode()
    assert letter.get("payload_truncated", False) == ("payload_bytes" in letter)
    return kept, letter.get("payload_bytes", len(kept))


async def test_every_bad_event_is_dead_lettered_and_nothing_dies(
    trained_model: Path, tmp_path: Path
) -> None:
    rng = random.Random(11)
    now_ms = int(time.time() * 1000)
    bad = bad_payloads(rng, now_ms, 300)
    # Large ones, within real Kafka's default message limit, whose dead-letter records
    # escaped as JSON would be several times larger: kept in part, with their length.
    bad += [b"\x01" * 200_000, b"\xff" * 400_000, b'"' * 600_000, b"x" * 1_040_000]
    # And one with a large key (800 kB with its value, under Kafka's default 1 MB):
    # its record, the key copied whole and the control characters escaped 6-fold,
    # was over the producer's limit, and the worker died on it at every start.
    big_key, big_key_payload = b"K" * 700_000, b"\x01" * 100_000
    bad.append(big_key_payload)
    good = [
        orjson.dumps(
            make_event("card-good", "m-1", "d-1", "198.51.100.7", now_ms - 1000 + i, 100 + i)
        )
        for i in range(50)
    ]
    mixed = bad + good
    rng.shuffle(mixed)
    metrics_port = find_free_port()
    async with running_system(
        tmp_path, trained_model, worker_args=("--metrics-port", str(metrics_port))
    ) as (bootstrap, [target]):
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_compat.producer_kwargs())
        await producer.start()
        try:
            for payload in mixed:
                key = big_key if payload is big_key_payload else b"k" + bytes([rng.randrange(256)])
                await producer.send(PAYMENTS, payload, key=key)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            DEAD_LETTER,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        letters: list[dict] = []
        keys: list[bytes] = []
        try:
            deadline = time.monotonic() + 60
            while len(letters) < len(bad) and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    letters.extend(orjson.loads(r.value) for r in records)
                    keys.extend(r.key for r in records)
        finally:
            await consumer.stop()
        [cut] = [i for i, letter in enumerate(letters) if letter.get("key_truncated")]
        assert letters[cut]["key_bytes"] == len(big_key)
        assert keys[cut] == big_key[:DLQ_KEY_MAX_BYTES]
        reasons = Counter(letter["reason"] for letter in letters)
        counts = dict(sorted(reasons.items()))
        print(f"{len(bad)} bad events sent, {len(letters)} dead-lettered: {counts}")
        # Kept exactly (text, or base64 when not UTF-8) with the reason, the first
        # DLQ_PAYLOAD_MAX_BYTES of a long one, with its length: nothing is lost (the
        # whole message stays at its topic, partition and offset).
        sent = Counter((p[:DLQ_PAYLOAD_MAX_BYTES], len(p)) for p in bad)
        lettered = Counter(dead_letter_payload(letter) for letter in letters)
        assert lettered == sent, (sent - lettered, lettered - sent)
        # The worker's /metrics counts them by the same reasons.
        exported = worker_dead_letters(metrics_port)
        assert exported == reasons, (exported, reasons)
        # The good events folded; the server answers about them.
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            deadline = time.monotonic() + 30
            while True:
                reply = await stub.GetFeatures(
                    pb.FeaturesRequest(entity_type="card", entity_id="card-good"), timeout=5
                )
                if reply.events_folded == len(good) or time.monotonic() > deadline:
                    break
            assert reply.events_folded == len(good)


# A worker whose routing fails on one event ("boom"): a bug, or a record the broker
# refuses, stand-ins for any error that is not a bad event.
FAILING_WORKER = """
import sys
from streamscore.logs import setup_logging
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.worker import run_worker

class FailingGate(EventTimeGate):
    def admit(self, event, partition=0):
        if event.event_id == "boom":
            raise RuntimeError("routing failed")
        super().admit(event, partition)

setup_logging()
run_worker(sys.argv[1], gate=FailingGate())
"""


async def test_a_worker_whose_routing_fails_exits_and_its_batch_is_redelivered(
    tmp_path: Path,
) -> None:
    """Left alive, a worker whose Faust agent crashed kept its partitions and routed
    nothing, unnoticed (and ignored SIGTERM): it exits with an error instead, so an
    orchestrator restarts it. The failed batch is not acknowledged (Faust acked it
    when the agent left it, and committed it at the stop: its events were lost), so
    the next worker routes it."""
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FAILING_WORKER, broker.bootstrap, stdout=out, stderr=out
            )
            try:
                await asyncio.sleep(5)  # joined
                now = int(time.time() * 1000)
                await publish(
                    broker.bootstrap,
                    [
                        {**make_event("c", "m", "d", "ip", now, 100), "event_id": "before-boom"},
                        {**make_event("c", "m", "d", "ip", now, 100), "event_id": "boom"},
                    ],
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.wait(), 60)
                assert worker.returncode == 1, (worker.returncode, log.read_text()[-2000:])
            finally:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
        assert "routing failed" in log.read_text(errors="replace")
        # "boom" failed its batch (and "before-boom" went out before it, or with it, by
        # how the two came in): the next worker routes whatever did not.
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamscore", "worker", "--kafka", broker.bootstrap,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert await routed_event_ids(broker.bootstrap, 60) == {"before-boom", "boom"}
        finally:
            second.terminate()
            await second.wait()


async def routed_event_ids(bootstrap: str, seconds: float) -> set[str]:
    """The event ids in the entity-events log, read for up to ``seconds`` (until both
    test events are there)."""
    consumer = AIOKafkaConsumer(
        ENTITY_EVENTS, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    ids: set[str] = set()
    try:
        deadline = time.monotonic() + seconds
        while len(ids) < 2 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    ids.update(entry[2] for entry in decode_fold_batch(record.value))
        return ids
    finally:
        await consumer.stop()

"""Feature-engine benchmark: fold and backfill speed, memory per entity, recovery.

1. fold: the replica's hot path (decode entity-events batches + fold) and the offline
   backfill, in process, as events per CPU-second (one core); then Score's window
   reads per entity, compiled against the Python readers;
2. memory: bytes per entity from tracemalloc, per entity type, for state built from
   synthetic traffic, and for sparse cards (a few events a week each);
3. recovery: a log holding N card entities is written to the embedded broker in the
   worker's format; a fresh ``FeatureReplica`` folds it until caught up (what a
   restarted server does), timed.

    python -m loadtest.feature_bench --events 50000 --recovery-cards 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tracemalloc

import uvloop
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from streamscore.gc_tuning import tune_for_large_state
from streamscore.stream import kafka_compat
from streamscore.stream.backfill import backfill, sort_events
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.events import PaymentEvent, event_from_dict
from streamscore.stream.features import DAY, ENTITY_FIELD, ENTITY_TYPES
from streamscore.stream.replica import FeatureReplica
from streamscore.stream.state import FeatureStore
from streamscore.stream.topics import ENTITY_EVENTS, TopicLayout, decode_fold_batch, route_events
from streamscore.traffic import TrafficConfig, generate_log

START_MS = 1_700_000_000_000


def synthetic(n: int) -> list[PaymentEvent]:
    config = TrafficConfig(rate_per_s=200, n_cards=max(1000, n // 3))
    return sort_events(event_from_dict(item.event) for item in generate_log(config, n / 200))


def fold(store: FeatureStore, events: list[PaymentEvent]) -> None:
    """Fold ``events`` into ``store`` the way the replica does (entity-events batches)."""
    for _, value in route_events(events, 4):
        for entry in decode_fold_batch(value):
            store.fold_fields(*entry)


def fold_speed(events: list[PaymentEvent]) -> None:
    records = [
        value
        for i in range(0, len(events), 500)
        for _, value in route_events(events[i : i + 500], 4)
    ]
    store = FeatureStore()
    started = time.process_time()
    for value in records:
        for entry in decode_fold_batch(value):
            store.fold_fields(*entry)
    seconds = time.process_time() - started
    print(
        f"replica fold (decode + fold, 4 entities/event): {len(events) / seconds:,.0f} "
        f"events/s per core ({seconds / len(events) * 1e6:.1f} us/event)"
    )
    started = time.process_time()
    rows = sum(1 for _ in backfill(events))
    seconds = time.process_time() - started
    print(f"backfill (features as of each event + fold): {rows / seconds:,.0f} events/s per core")


def read_speed(events: list[PaymentEvent], n_requests: int = 5_000) -> None:
    """Score's feature reads, per entity type: each request's entity read from the
    compiled tiles and from the Python twin (``FeatureStore(reference=True)``: its
    buckets in dicts of lists, read by the Python readers), alternating, best of five,
    on the same entities."""
    stores = {"compiled": FeatureStore(), "python": FeatureStore(reference=True)}
    for store in stores.values():
        fold(store, events)
    t_ms = max(e.event_time_ms for e in events) + 1_000
    requests = events[:n_requests]
    for entity_type in ENTITY_TYPES:
        field = ENTITY_FIELD[entity_type]
        ids = [getattr(e, field) for e in requests]
        known = {
            name: [s for s in map(store.entities[entity_type].get, ids) if s is not None]
            for name, store in stores.items()
        }
        best = {name: float("inf") for name in stores}
        for _ in range(5):
            for name, store in stores.items():
                windowed, layout, states = store._windowed, store.layouts[entity_type], known[name]
                started = time.perf_counter()
                for state in states:
                    windowed(layout, state, t_ms)
                per_read = (time.perf_counter() - started) / max(1, len(states)) * 1e6
                best[name] = min(best[name], per_read)
        print(
            f"window reads, {entity_type} ({len(known['compiled'])} of {len(requests)} requests' "
            f"entities known): compiled {best['compiled']:.1f} us, "
            f"python {best['python']:.1f} us per entity"
        )


def memory(events: list[PaymentEvent], sparse_cards: int) -> None:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = FeatureStore()
    fold(store, events)
    used = tracemalloc.get_traced_memory()[0] - before
    counts = {entity: len(store.entities[entity]) for entity in ENTITY_TYPES}
    print(
        f"memory, synthetic traffic ({len(events)} events, {counts}): "
        f"{used / len(store):,.0f} bytes per entity on average (all types, event ids "
        f"shared between the four entities of an event)"
    )
    del store
    # Sparse cards: 5 events each over a week, merchant from a small pool; the card
    # entity alone (merchant/device/ip state not counted).
    store = FeatureStore()
    before = tracemalloc.get_traced_memory()[0]
    for c in range(sparse_cards):
        for k in range(5):
            time_ms = START_MS + k * DAY + c
            store.fold_fields(
                "card", f"card-{c:08d}", f"e-{c}-{k}", time_ms, 1000 + k, False, f"m{k}", ""
            )
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    if not sparse_cards:
        return
    print(
        f"memory, {sparse_cards} cards with 5 events over 5 days: "
        f"{used / sparse_cards:,.0f} bytes per card entity"
    )


def card_log(cards: int, first: int = 0, time_ms: int | None = None) -> list[PaymentEvent]:
    """One event per card, merchants/devices/ips from pools: cards ``first`` to
    ``cards - 1``, card c at START_MS + c (or all at ``time_ms``)."""
    return [
        PaymentEvent(
            event_id=f"r-{c}",
            event_time_ms=START_MS + c if time_ms is None else time_ms,
            card_id=f"card-{c:08d}",
            merchant_id=f"m-{c % 1000}",
            device_id=f"d-{c % 100_000}",
            ip=f"10.{c % 100}.{c // 100 % 100}.{c % 97}",
            amount_minor=100 + c % 5000,
            currency="EUR",
            mcc="5411",
            country="DE",
            status="declined" if c % 50 == 0 else "approved",
        )
        for c in range(first, cards)
    ]


async def recovery(cards: int) -> None:
    events = card_log(cards)
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap,
            linger_ms=5,
            max_request_size=8 * 1024 * 1024,
            **kafka_compat.producer_kwargs(),
        )
        await producer.start()
        try:
            for i in tqdm(range(0, len(events), 500), desc="writing log", unit="batch"):
                for partition, value in route_events(events[i : i + 500], 4):
                    await producer.send(ENTITY_EVENTS, value, partition=partition)
            await producer.flush()
        finally:
            await producer.stop()
        store = FeatureStore()
        replica = FeatureReplica(broker.bootstrap, store)
        started, cpu = time.perf_counter(), time.process_time()
        await replica.start()
        try:
            await replica.wait_caught_up(timeout=900)
        finally:
            await replica.stop()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(
            f"recovery: {len(store):,} entities ({cards:,} cards) from {len(events):,} events "
            f"({replica.entries_folded:,} fold entries) in {seconds:.1f} s "
            f"(replica CPU {cpu:.1f} s; {len(events) / seconds:,.0f} events/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--sparse-cards", type=int, default=100_000)
    parser.add_argument("--recovery-cards", type=int, default=1_000_000)
    args = parser.parse_args()
    tune_for_large_state()
    events = synthetic(args.events)
    fold_speed(events)
    read_speed(events)
    memory(events, args.sparse_cards)
    if args.recovery_cards:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(recovery(args.recovery_cards))
    sys.exit(0)


if __name__ == "__main__":
    main()

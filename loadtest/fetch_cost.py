"""CPU per idle fetch of the entity-events topic: aiokafka's consumer against the same
Fetch requests sent straight through aiokafka's client.

An idle replica still fetches: on tansu a waiting Fetch returns only when its wait
runs out (``kafka_compat``, quirk 7), so a caught-up replica asks every
``--fetch-wait-ms``. This measures what one such empty fetch costs the process, in
this process, on an embedded broker with the topic empty:

* ``consumer``: an ``AIOKafkaConsumer`` assigned every partition, polled with
  ``getmany`` as ``stream/replica.py`` polls it;
* ``client``: one ``FetchRequest`` for every partition at a time, sent with
  ``client.send`` (no fetcher tasks, no per-partition bookkeeping): about the least
  an aiokafka-based replica could pay per fetch;
* ``lean``: the same Fetch written and read by ``stream/lean_fetch.py``, on a
  connection of its own, as a caught-up replica fetches (``kafka_lean_fetch``).

The three alternate for ``--rounds`` (CPU per fetch, the median of the rounds):

    python -m loadtest.fetch_cost --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest

from streamscore.argtypes import at_least_one, positive
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.lean_fetch import LeanFetcher
from streamscore.stream.topics import ENTITY_EVENTS, TopicLayout

MAX_BYTES = 4 * 1024 * 1024


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Fetcher = Callable[[], Awaitable[int]]  # one fetch round: how many Fetches it sent


async def per_fetch(fetch_once: Fetcher, seconds: float) -> tuple[float, float]:
    """Fetch for ``seconds``: (fetches per second, us of CPU per fetch)."""
    fetches, cpu, started = 0, cpu_now(), time.monotonic()
    while time.monotonic() - started < seconds:
        fetches += await fetch_once()
    elapsed, used = time.monotonic() - started, cpu_now() - cpu
    return fetches / elapsed, used / max(fetches, 1) * 1e6


async def consumer_fetcher(
    bootstrap: str, partitions: list[TopicPartition], wait_ms: int
) -> tuple[Fetcher, Callable[[], Awaitable[None]]]:
    """The replica's way: getmany on an assigned consumer. Fetches are counted where
    the consumer sends them (its own client)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=wait_ms,
        max_partition_fetch_bytes=MAX_BYTES,
    )
    await consumer.start()
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    sent = 0
    send = consumer._client.send

    async def counting_send(node_id: int, request: object, **kwargs: object) -> object:
        nonlocal sent
        sent += isinstance(request, FetchRequest)
        return await send(node_id, request, **kwargs)

    consumer._client.send = counting_send

    async def fetch_once() -> int:
        nonlocal sent
        before = sent
        await consumer.getmany(timeout_ms=200, max_records=50)
        return sent - before

    return fetch_once, consumer.stop


async def client_fetcher(
    bootstrap: str, partitions: list[TopicPartition], wait_ms: int
) -> tuple[Fetcher, Callable[[], Awaitable[None]]]:
    """One Fetch for every partition, straight through the client (one leader here)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    await client.force_metadata_update()
    node = client.cluster.leader_for_partition(partitions[0])
    if node is None or any(client.cluster.leader_for_partition(tp) != node for tp in partitions):
        await client.close()
        raise SystemExit("the client mode needs every partition on one leader (tansu)")
    topics = [(ENTITY_EVENTS, [(tp.partition, 0, MAX_BYTES) for tp in partitions])]

    async def fetch_once() -> int:
        await client.send(node, FetchRequest(wait_ms, 1, MAX_BYTES, 0, topics))
        return 1

    return fetch_once, client.close


async def lean_fetcher(
    bootstrap: str, partitions: list[TopicPartition], wait_ms: int
) -> tuple[Fetcher, Callable[[], Awaitable[None]]]:
    """The replica's lean fetch (one leader: the embedded broker)."""
    host, port = bootstrap.rsplit(":", 1)
    fetcher = LeanFetcher(
        host,
        int(port),
        ENTITY_EVENTS,
        [tp.partition for tp in partitions],
        max_wait_ms=wait_ms,
        max_partition_bytes=MAX_BYTES,
    )
    await fetcher.open()
    positions = {tp.partition: 0 for tp in partitions}

    async def fetch_once() -> int:
        await fetcher.fetch(positions)
        return 1

    return fetch_once, fetcher.close


async def main(args: argparse.Namespace) -> int:
    async with EmbeddedBroker() as broker:
        partitions_n = TopicLayout().partitions()[ENTITY_EVENTS]
        await create_topics(broker.bootstrap, {ENTITY_EVENTS: partitions_n})
        partitions = [TopicPartition(ENTITY_EVENTS, p) for p in range(partitions_n)]
        modes = {"consumer": consumer_fetcher, "client": client_fetcher, "lean": lean_fetcher}
        results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            for mode, make in modes.items():
                fetch_once, close = await make(broker.bootstrap, partitions, args.fetch_wait_ms)
                try:
                    await fetch_once()  # connected, first answer in
                    rate, us = await per_fetch(fetch_once, args.seconds)
                finally:
                    await close()
                results[mode].append((rate, us))
                print(
                    f"round {round_ + 1}/{args.rounds} {mode:>8}: {rate:.1f} fetches/s, "
                    f"{us:.0f} us of CPU per fetch",
                    flush=True,
                )
    print(f"\nidle fetches, wait {args.fetch_wait_ms} ms, {partitions_n} partitions, medians:")
    print("| fetched by | fetches/s | us of CPU per fetch | share of a core |\n|---|---|---|---|")
    for mode, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        us = statistics.median(u for _, u in rows)
        print(f"| {mode} | {rate:.1f} | {us:.0f} | {rate * us / 1e4:.2f} % |")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=positive, default=5.0, help="per mode and round")
    p.add_argument("--rounds", type=at_least_one, default=3)
    p.add_argument("--fetch-wait-ms", type=int, default=20, help="the Fetch wait (default 20)")
    return p


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parser().parse_args())))

"""Pipeline benchmark on the embedded broker: ingestion, freshness, Score latency.

Starts tansu, one stream worker and one server (real processes, as the demo does),
then measures, in one run:

1. ingestion: N events produced as fast as possible; events/s until the server's
   replica has folded the last one (worker + broker + replica together);
2. freshness: events sent one by one at a low rate; time from produce to the event
   being visible through GetFeatures (p50/p99);
3. Score latency, one request in flight, unary and on one ScoreStream, with the
   server's CPU time per request read from /proc (the steadiest figure on a noisy box).

    python -m loadtest.pipeline_bench --events 20000 --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
import orjson
from aiokafka import AIOKafkaProducer
from hdrh.histogram import HdrHistogram

from loadtest.procstat import cpu_seconds
from loadtest.servers import private_repository
from loadtest.workdir import work_directory
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import transaction_from_event, wait_serving
from streamscore.loopback_process import find_free_port
from streamscore.processes import ChildProcess
from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import PAYMENTS, TopicLayout
from streamscore.traffic import TrafficConfig, generate_log


def pct(histogram: HdrHistogram, p: float) -> float:
    return histogram.get_value_at_percentile(p) / 1000


async def folded(stub: pb_grpc.ScoringStub, card: str) -> int:
    reply = await stub.GetFeatures(pb.FeaturesRequest(entity_type="card", entity_id=card))
    return reply.events_folded


async def ingestion(
    bootstrap: str, stub: pb_grpc.ScoringStub, n: int, worker_pid: int, server_pid: int
) -> float:
    now = time.time_ns() // 1_000_000
    config = TrafficConfig(rate_per_s=n / 1200, n_cards=max(1000, n // 10), seed=3)
    events = [item.event for item in generate_log(config, 1200)][:n]
    shift = now - events[-1]["event_time_ms"] - 1000  # the last 20 minutes, in order
    payloads = [
        (orjson.dumps({**e, "event_time_ms": e["event_time_ms"] + shift}), e["card_id"].encode())
        for e in events
    ]
    marker = "bench-marker-card"
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, **kafka_compat.producer_kwargs()
    )
    await producer.start()
    try:
        cpu_before = {pid: cpu_seconds(pid) for pid in (worker_pid, server_pid)}
        started = time.perf_counter()
        for value, key in payloads:
            await producer.send(PAYMENTS, value, key=key)
        # A last event on every partition's worth of keys: when it is folded, all are.
        last = {**events[-1], "event_id": "bench-marker", "card_id": marker, "event_time_ms": now}
        await producer.send(PAYMENTS, orjson.dumps(last), key=events[-1]["card_id"].encode())
        await producer.flush()
        produced = time.perf_counter() - started
        while await folded(stub, marker) < 1:  # noqa: ASYNC110 - polling the server is the point
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - started
        cpu = {pid: cpu_seconds(pid) - before for pid, before in cpu_before.items()}
    finally:
        await producer.stop()
    print(
        f"  produced {len(payloads)} events in {produced:.2f} s; all folded after {seconds:.2f} s"
    )
    # Per core: events over the CPU seconds each stage spent (steadier than wall time
    # on a shared 2-core box where worker, replica, broker and producer compete).
    print(
        f"  worker (validate + route): {len(payloads) / cpu[worker_pid]:,.0f} events/s per core; "
        f"server replica (decode + fold): {len(payloads) / cpu[server_pid]:,.0f} events/s per core"
    )
    return len(payloads) / seconds


async def freshness(bootstrap: str, stub: pb_grpc.ScoringStub, n: int) -> HdrHistogram:
    histogram = HdrHistogram(1, 60_000_000, 3)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_compat.producer_kwargs())
    await producer.start()
    try:
        for i in range(n):
            card = f"fresh-{i}"
            event = {
                "event_id": f"fresh-{i}",
                "event_time_ms": time.time_ns() // 1_000_000,
                "card_id": card,
                "merchant_id": "m-fresh",
                "device_id": "d-fresh",
                "ip": "203.0.113.250",
                "amount_minor": 100,
                "currency": "EUR",
                "mcc": "5411",
                "country": "DE",
                "status": "approved",
            }
            sent = time.perf_counter_ns()
            await producer.send_and_wait(PAYMENTS, orjson.dumps(event), key=card.encode())
            while await folded(stub, card) < 1:  # noqa: ASYNC110 - polling the server is the point
                await asyncio.sleep(0.001)
            histogram.record_value((time.perf_counter_ns() - sent) // 1000)
            await asyncio.sleep(0.02)
    finally:
        await producer.stop()
    return histogram


async def score_latency(
    stub: pb_grpc.ScoringStub, server_pid: int, n: int, stream: bool
) -> tuple[HdrHistogram, float, float]:
    now = time.time_ns() // 1_000_000
    events = [
        item.event for item in generate_log(TrafficConfig(rate_per_s=50, seed=11), n / 50 + 60)
    ][: n + 200]
    requests = [
        pb.ScoreRequest(
            request_id=f"r-{i}", transaction=transaction_from_event({**e, "event_time_ms": now})
        )
        for i, e in enumerate(events)
    ]
    histogram = HdrHistogram(1, 60_000_000, 3)
    call = stub.ScoreStream() if stream else None
    cpu_before = started = 0.0
    for i, request in enumerate(requests):
        if i == 200:  # after warm-up
            cpu_before, started = cpu_seconds(server_pid), time.perf_counter()
        sent = time.perf_counter_ns()
        if call is not None:
            await call.write(request)
            await call.read()
        else:
            await stub.Score(request)
        if i >= 200:
            histogram.record_value((time.perf_counter_ns() - sent) // 1000)
    if call is not None:
        await call.done_writing()
    measured = len(requests) - 200
    seconds = time.perf_counter() - started
    cpu_us = (cpu_seconds(server_pid) - cpu_before) / measured * 1e6
    return histogram, measured / seconds, cpu_us


async def main(args: argparse.Namespace) -> None:
    with work_directory("pipeline-bench") as logdir:
        await _bench(args, logdir)


async def _bench(args: argparse.Namespace, logdir: Path) -> None:
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        port = find_free_port()
        common = ["--kafka", broker.bootstrap, "--log-format", "text"]
        worker = ChildProcess.streamscore(
            "worker", "worker", *common, log_path=str(logdir / "worker.log")
        )
        server_args = ["--port", str(port)]
        if args.model_repository:
            repository = private_repository(args.model_repository)
            server_args += ["--model-repository", str(repository)]
        server = ChildProcess.streamscore(
            "server", "serve", *common, *server_args, log_path=str(logdir / "server.log")
        )
        await worker.start()
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            await wait_serving(target, timeout=120)
            assert server.process is not None
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.ScoringStub(channel)
                print(f"ingestion ({args.events} events, 1 worker, 1 server replica):")
                assert worker.process is not None
                rate = await ingestion(
                    broker.bootstrap, stub, args.events, worker.process.pid, server.process.pid
                )
                print(f"  {rate:,.0f} events/s end to end")
                fresh = await freshness(broker.bootstrap, stub, args.fresh)
                print(
                    f"freshness ({args.fresh} events, produce -> visible in GetFeatures): "
                    f"p50 {pct(fresh, 50):.1f} ms, p99 {pct(fresh, 99):.1f} ms, "
                    f"max {pct(fresh, 100):.1f} ms"
                )
                for stream in (False, True):
                    latency, qps, cpu_us = await score_latency(
                        stub, server.process.pid, args.requests, stream
                    )
                    name = "ScoreStream" if stream else "Score unary"
                    print(
                        f"{name}, 1 in flight, {args.requests} requests: {qps:,.0f} req/s, "
                        f"p50 {pct(latency, 50):.3f} ms, p99 {pct(latency, 99):.3f} ms, "
                        f"p99.9 {pct(latency, 99.9):.3f} ms; server CPU {cpu_us:.0f} us/req"
                    )
        finally:
            await server.stop()
            await worker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--fresh", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--model-repository", type=Path)
    args = parser.parse_args()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args))
    sys.exit(0)

"""Sequential Score latency: one request in flight, p50/p99/p99.9 from the client side.

Talks to a running server only through the public gRPC API. Usage:

    python -m loadtest.sequential_latency --target 127.0.0.1:50051 --requests 2000

It also reports the server's own timings (total_us from each response), which shows
how much of the latency is gRPC and the network stack rather than our code.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
from hdrh.histogram import HdrHistogram

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import transaction_from_event
from streamscore.traffic import TrafficConfig, generate_log


def _percentiles(histogram: HdrHistogram) -> str:
    return "  ".join(
        f"p{p:g} {histogram.get_value_at_percentile(p) / 1000:.3f} ms" for p in (50, 99, 99.9)
    )


async def run(target: str, requests: int, warmup: int, stream: bool) -> None:
    events = [
        item.event
        for item in generate_log(
            TrafficConfig(rate_per_s=50, seed=11), (requests + warmup) / 50 + 10
        )
    ]
    now = time.time_ns() // 1_000_000
    messages = [
        pb.ScoreRequest(
            request_id=f"seq-{i}",
            transaction=transaction_from_event({**event, "event_time_ms": now}),
        )
        for i, event in enumerate(events[: requests + warmup])
    ]
    client = HdrHistogram(1, 10_000_000, 3)
    server = HdrHistogram(1, 10_000_000, 3)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        call = stub.ScoreStream() if stream else None
        started = time.perf_counter()
        for i, message in enumerate(messages):
            sent = time.perf_counter_ns()
            if call is not None:
                await call.write(message)
                response = await call.read()
            else:
                response = await stub.Score(message, timeout=5)
            elapsed_us = (time.perf_counter_ns() - sent) // 1000
            if i == warmup:
                started = time.perf_counter()
            if i >= warmup:
                client.record_value(max(elapsed_us, 1))
                server.record_value(max(response.timings.total_us, 1))
        if call is not None:
            await call.done_writing()
        seconds = time.perf_counter() - started
    mode = "ScoreStream" if stream else "Score (unary)"
    print(f"{mode}, sequential, {requests} requests to {target}: {requests / seconds:.0f} req/s")
    print(f"  client latency  {_percentiles(client)}")
    print(f"  server total_us {_percentiles(server)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--stream", action="store_true", help="use ScoreStream, one stream")
    args = parser.parse_args()
    asyncio.run(run(args.target, args.requests, args.warmup, args.stream))


if __name__ == "__main__":
    main()

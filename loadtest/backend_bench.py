"""Score through each backend vs a bare grpc.aio echo server, and vs Triton direct.

One run, one open-loop load generator (``openloop.py``), fixed offered rates, targets
interleaved at each rate (the box is shared and noisy: A and B side by side):

* ``echo``: ``echo_server.py``, the same messages, no features, no model;
* ``onnxruntime`` / ``torch``, batching on and off: ``streamscore serve`` with a
  replica of 20k events of synthetic traffic, every request a real Score (features +
  model + decision);
* ``triton``: the same server with the version's backend set to Triton, and
  ``triton-direct``: the same Triton server called straight from tritonclient.

Per target and rate: achieved rate, p50/p99/p99.9 from the intended send time, and
the server's CPU time per request (from /proc; the steadiest figure).

    python -m loadtest.backend_bench --rates 300,600,1000,1500 --seconds 4
    python -m loadtest.backend_bench --shadows 2,3 --rates 250,500,750   # shadow isolation
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import uvloop

from loadtest.openloop import LoadResult, open_loop
from loadtest.procstat import cpu_seconds
from loadtest.servers import (
    MODEL,
    add_copy,
    echo_process,
    load_features,
    repository_for,
    serve_process,
)
from loadtest.workdir import work_directory
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.argtypes import at_least_ones, positive, positives
from streamscore.client import transaction_from_event, wait_serving
from streamscore.loopback_process import find_free_port
from streamscore.processes import ChildProcess
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout
from streamscore.traffic import TrafficConfig, generate_log


@dataclass
class Target:
    name: str
    call: Callable[[int], Awaitable[object]]
    pid: int


async def main(args: argparse.Namespace) -> None:
    with work_directory("backend-bench") as root:
        await _bench(args, root)


async def _bench(args: argparse.Namespace, root: Path) -> None:
    base = args.model_repository
    if base is None:
        from streamscore.training import train

        base = root / "trained"
        train(base, duration_s=600, epochs=100)
    now = time.time_ns() // 1_000_000
    log = [item.event for item in generate_log(TrafficConfig(rate_per_s=50, seed=5), 400)]
    shift = now - log[-1]["event_time_ms"] - 1000
    events = [{**e, "event_time_ms": e["event_time_ms"] + shift} for e in log]
    requests = [
        pb.ScoreRequest(request_id=f"r-{i}", transaction=transaction_from_event(e))
        for i, e in enumerate(events)
    ]
    children: list[ChildProcess] = []
    channels: list[grpc.aio.Channel] = []
    targets: list[Target] = []

    async def grpc_target(name: str, process: ChildProcess, port: int, health: bool) -> None:
        children.append(process)
        await process.start()
        address = f"127.0.0.1:{port}"
        if health:
            await wait_serving(address, timeout=120)
        channel = grpc.aio.insecure_channel(address)
        channels.append(channel)
        stub = pb_grpc.ScoringStub(channel)
        for _ in range(300):  # the echo server has no health service: call until it answers
            try:
                await stub.Score(requests[0], timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)

        async def call(i: int) -> object:
            return await stub.Score(requests[i % len(requests)], timeout=1)

        assert process.process is not None
        targets.append(Target(name, call, process.process.pid))

    triton = None
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        await load_features(broker.bootstrap, events)
        try:
            port = find_free_port()
            await grpc_target("echo", echo_process(port), port, health=False)
            # (backend, batching, shadow versions, batches in flight to Triton). Triton
            # batches itself: our batcher stays on in front of it, with each number of
            # batches in flight asked for.
            configs = [
                (b, batching, "", 0)
                for b in args.backends.split(",")
                if b != "triton"
                for batching in (True, False)
            ]
            if "triton" in args.backends.split(","):
                configs += [("triton", True, "", n) for n in args.triton_concurrency]
            if args.shadows:
                # Shadow isolation: the same primary with and without shadow versions.
                configs = [("onnxruntime", True, "", 0), ("onnxruntime", True, args.shadows, 0)]
            for backend, batching, shadows, in_flight in configs:
                repository = repository_for(base, root, backend)
                for version in (v for v in shadows.split(",") if v):
                    add_copy(repository, version)
                env = {
                    **os.environ,
                    "STREAMSCORE_BATCHING": str(batching).lower(),
                    "STREAMSCORE_SHADOW_VERSIONS": shadows,
                    "STREAMSCORE_MODEL_VERSION": "1",
                }
                if backend == "triton":
                    if triton is None:
                        from streamscore.triton_server import EmbeddedTriton

                        triton = EmbeddedTriton(repository)
                        await triton.start()
                    env["STREAMSCORE_TRITON_URL"] = triton.url
                    env["STREAMSCORE_BATCH_REMOTE_CONCURRENCY"] = str(in_flight)
                port = find_free_port()
                label = f"{backend}-{batching}-{shadows or 'none'}-{in_flight}"
                server = serve_process(
                    label,
                    broker.bootstrap,
                    port,
                    repository,
                    env=env,
                    log_path=str(root / f"{label}.log"),
                )
                name = f"{backend} batching {'on' if batching else 'off'}"
                if shadows:
                    name += f", shadows {shadows}"
                if in_flight and len(args.triton_concurrency) > 1:
                    name += f", {in_flight} in flight"
                await grpc_target(name, server, port, health=True)
            if triton is not None:
                targets.append(await triton_direct_target(triton, base, requests))
            rows: list[tuple[str, LoadResult, float]] = []
            for rate in args.rates:
                for target in targets:
                    before = cpu_seconds(target.pid)
                    result = await open_loop(target.call, rate, args.seconds)
                    cpu_us = (cpu_seconds(target.pid) - before) / max(result.ok, 1) * 1e6
                    rows.append((target.name, result, cpu_us))
                    print(
                        f"{target.name:28s} {result.summary()}  server CPU {cpu_us:.0f} us/req",
                        flush=True,
                    )
            report(rows, args.budget_ms)
        finally:
            for channel in channels:
                await channel.close()
            for child in reversed(children):
                await child.stop()
            if triton is not None:
                await triton.stop()


async def triton_direct_target(
    triton: object, base: Path, requests: list[pb.ScoreRequest]
) -> Target:
    import tritonclient.grpc as triton_types
    import tritonclient.grpc.aio as triton_grpc

    metadata = json.loads(next((base / MODEL).glob("*/metadata.json")).read_text())
    k = len(metadata["inputs"])
    rows = np.random.default_rng(1).random((len(requests), k), dtype=np.float32) * 100
    client = triton_grpc.InferenceServerClient(triton.url)  # type: ignore[attr-defined]
    version = metadata["version"]

    async def call(i: int) -> object:
        item = triton_types.InferInput("features", [1, k], "FP32")
        item.set_data_from_numpy(rows[i % len(rows)].reshape(1, k))
        return await client.infer(MODEL, [item], model_version=version, client_timeout=1)

    return Target("triton-direct", call, triton.pid)  # type: ignore[attr-defined]


def report(rows: list[tuple[str, LoadResult, float]], budget_ms: float) -> None:
    print(
        "\n| target | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms "
        "| errors+dropped | server CPU us/req |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r, cpu in rows:
        print(
            f"| {name} | {r.offered_rate:,.0f} | {r.achieved_rate:,.0f} | {r.ms(50):.2f} | "
            f"{r.ms(99):.2f} | {r.ms(99.9):.2f} | {r.errors + r.dropped} | {cpu:.0f} |"
        )
    best: dict[str, float] = {}
    for name, r, _ in rows:
        if r.ms(99) <= budget_ms and not r.errors and not r.dropped:
            best[name] = max(best.get(name, 0.0), r.achieved_rate)
    echo = best.get("echo", 0.0)
    print(f"\nHighest achieved rate with p99 <= {budget_ms} ms (and no errors):")
    for name, qps in best.items():
        ratio = f" ({qps / echo:.0%} of echo)" if echo else ""
        print(f"  {name}: {qps:,.0f}/s{ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=positives, default=[300.0, 600.0, 1000.0, 1500.0])
    parser.add_argument("--seconds", type=positive, default=4.0)
    parser.add_argument("--budget-ms", type=positive, default=10.0)
    parser.add_argument("--backends", default="onnxruntime,torch,triton")
    parser.add_argument(
        "--triton-concurrency",
        type=at_least_ones,
        default=[4],
        help="batches in flight to Triton (batch_remote_concurrency); several, "
        "comma-separated, give one server each",
    )
    parser.add_argument("--model-repository", type=Path)
    parser.add_argument(
        "--shadows", default="", help="e.g. 2,3: compare the primary with and without shadows"
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args))
    sys.exit(0)

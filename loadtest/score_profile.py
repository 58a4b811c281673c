"""Score in process, without gRPC: CPU per call on a populated feature store, and
optionally the cProfile of it. The Python half of Score's cost, measured steadily.

    python -m loadtest.score_profile --model-repository DIR [--events 50000]
        [--requests 5000] [--profile tottime|cumulative] [--breakdown] [--cold]
        [--cold-rows 1,4,16] [--bytecodes] [--onnx-kernel auto|onnxruntime]

``--cold`` also times Score with the caches evicted before each call: under gRPC load
a call costs several times what it costs here back to back, because the server's
other work between calls leaves little of Score's code and data in the caches.
``--cold-rows K,...`` evicts them before each row of K calls instead: what running
calls back to back (the server's rows of unary calls) saves.

``--bytecodes`` counts, per call, the Python bytecodes executed and the Python and C
functions called (``sys.settrace`` with opcode events): no timing, so no noise, the
same count on any machine, a way to compare two versions of the path on a box whose
timings swing. A proxy, not a price: a call or a miss costs more than an addition.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import uvloop

from loadtest.feature_bench import fold, synthetic
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.backends.onnx_backend import KERNELS
from streamscore.server.malformed import MalformedRequest
from streamscore.server.repository import ModelRegistry
from streamscore.server.rollout import RolloutManager, RolloutState
from streamscore.server.scoring import ScoringService
from streamscore.server.served_model import BatchingSettings, ServedModel
from streamscore.server.wire import parse_score_request
from streamscore.stream.assembly import assemble_features
from streamscore.stream.state import FeatureStore


def _best_us(runs: list[float], n: int) -> str:
    return f"{min(runs) / n * 1e6:7.1f} us"


async def breakdown(
    service: ScoringService,
    store: FeatureStore,
    served: ServedModel,
    requests: list[bytes],
    now: int,
) -> None:
    """CPU per call of Score's parts alone (best of 5 passes over the requests)."""
    n = len(requests)
    row = (1.0,) * len(served.metadata.inputs)  # a row as Score makes it: a tuple
    batch = np.ones((1, len(row)), np.float32)
    parts: dict[str, list[float]] = {}

    def timed(name: str, started: float) -> None:
        parts.setdefault(name, []).append(time.process_time() - started)

    for _ in range(5):
        started = time.process_time()
        for request in requests:
            t = parse_score_request(request)
            assert not isinstance(t, MalformedRequest)
            assemble_features(
                store,
                card_id=t.card_id,
                merchant_id=t.merchant_id,
                device_id=t.device_id,
                ip=t.ip,
                amount_minor=t.amount_minor,
                event_time_ms=now,
                t_ms=now,
            )
        timed("features (assemble_features)", started)
        started = time.process_time()
        for _ in range(n):
            await served.backend.infer(batch)
        timed("model call alone (backend.infer, batch 1)", started)
        started = time.process_time()
        for _ in range(n):
            await served.batcher.submit(row, served.batcher.clock() + 0.05)
        timed("batcher round trip (submit, incl. model)", started)
        started = time.process_time()
        for request in requests:
            await answer(service, request)
        timed("whole Score body (ScoringService.score)", started)
    for name, runs in parts.items():
        print(f"  {name:45s} {_best_us(runs, n)}")
    if hasattr(served.backend, "infer_inline"):
        # The inline call, as the batcher makes it when nothing is queued, with the
        # share of it spent in the kernel: its syscalls (the two reads of the thread's
        # CPU clock are real syscalls, not vDSO).
        # Over all passes at once: system time is accounted in scheduler ticks here,
        # too coarse for one pass.
        inline = served.backend.infer_inline
        passes = 10
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(passes * n):
            inline(batch)
        after = resource.getrusage(resource.RUSAGE_SELF)
        system = after.ru_stime - before.ru_stime
        cpu = after.ru_utime - before.ru_utime + system
        calls = passes * n
        print(
            f"  inline model call (backend.infer_inline, batch 1): "
            f"{cpu / calls * 1e6:.1f} us CPU, {system / calls * 1e6:.2f} us of it in the kernel"
        )


async def answer(service: ScoringService, request: bytes) -> bytes:
    """What the server does with a request's bytes: parse (gRPC's deserializer), Score,
    and the answer's bytes (no serializer: Score encodes its own)."""
    return await service.score(parse_score_request(request))


async def cold(service: ScoringService, requests: list[bytes], row: int = 1) -> str:
    """CPU per Score when each call finds the caches cold, as under gRPC load, where
    the server's other work (gRPC's core, the event loop, other requests) evicts
    Score's code and data between calls. Before each call (timed apart: the thread's
    CPU clock around the call alone), a sweep over 4 MiB of numpy data and 64k Python
    objects, beyond this machine's L2 (1.25 MiB a core). Median of 3 passes over the
    first 1,000 requests (1,024 with rows).

    ``row``: evict before each ``row`` calls made back to back instead, as the server
    runs unary calls in rows (server/back_to_back.py): the first call of a row finds
    the caches cold, the rest warm."""
    array = np.ones(512 * 1024)
    objects = list(range(10**6, 10**6 + 64 * 1024))  # ints beyond the small-int cache

    def evict() -> None:
        array.sum()
        sum(objects)

    timed = requests[: 1000 if row == 1 else 1024 // row * row]
    passes = []
    for _ in range(3):
        spent = 0.0
        for first in range(0, len(timed), row):
            evict()
            started = time.thread_time()
            for request in timed[first : first + row]:
                await answer(service, request)
            spent += time.thread_time() - started
        passes.append(spent / len(timed) * 1e6)
    return (
        f"{sorted(passes)[1]:.0f} us CPU per call (passes {', '.join(f'{p:.0f}' for p in passes)})"
    )


async def count_bytecodes(service: ScoringService, requests: list[bytes]) -> str:
    """Bytecodes executed and functions called per Score, and the functions that
    execute the most bytecodes."""
    by_function: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    def trace(frame: FrameType, event: str, arg: Any) -> Any:  # sys.settrace's
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            by_function[frame.f_code.co_qualname] += 1
        return trace

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            calls[event] += 1

    # Traced, a call of the model alone takes some 20 times its time, which would
    # start the batcher's holds for a batch (a path Score does not take untraced):
    # the batcher keeps its untraced choice while counting.
    batcher = service.rollouts.primary_model().batcher
    untraced = batcher.defer_min_s, batcher.single_call_s
    batcher.defer_min_s = math.inf
    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        for request in requests:
            await answer(service, request)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
        batcher.defer_min_s, batcher.single_call_s = untraced
    n = len(requests)
    top = ", ".join(f"{name} {count / n:.0f}" for name, count in by_function.most_common(8))
    return (
        f"{by_function.total() / n:.0f} bytecodes, {calls['call'] / n:.1f} Python and "
        f"{calls['c_call'] / n:.1f} C calls per call; most in {top}"
    )


async def main(args: argparse.Namespace) -> None:
    events = synthetic(args.events)
    store = FeatureStore()
    fold(store, events)
    models = ModelRegistry(
        args.model_repository,
        "fraud_mlp",
        batching=BatchingSettings(),
        reload_interval_s=0,
        onnx_kernel=args.onnx_kernel,
    )
    await models.start()
    rollouts = RolloutManager(models)
    await rollouts.start(RolloutState(primary=models.primary.metadata.version))
    now = max(e.event_time_ms for e in events) + 1000
    service = ScoringService(store, rollouts, clock_ms=lambda: now)
    requests = [
        pb.ScoreRequest(
            request_id=f"r{i}",
            transaction=pb.Transaction(
                transaction_id=f"t{i}",
                card_id=e.card_id,
                merchant_id=e.merchant_id,
                device_id=e.device_id,
                ip=e.ip,
                amount_minor=e.amount_minor,
                currency="EUR",
                mcc="5411",
                country="DE",
            ),
        ).SerializeToString()
        for i, e in enumerate(events[: args.requests])
    ]
    try:
        for request in requests[:500]:  # warm up
            await answer(service, request)
        wall, cpu = time.perf_counter(), time.process_time()
        for request in requests:
            await answer(service, request)
        n = len(requests)
        print(
            f"Score in process: {(time.perf_counter() - wall) / n * 1e6:.0f} us wall, "
            f"{(time.process_time() - cpu) / n * 1e6:.0f} us CPU per call "
            f"({args.events} events folded, {n} calls)"
        )
        if args.cold:
            print(f"  with the caches evicted before each call: {await cold(service, requests)}")
        for row in args.cold_rows:
            print(
                f"  with the caches evicted before each row of {row} calls: "
                f"{await cold(service, requests, row)}"
            )
        if args.bytecodes:
            print(f"  counted: {await count_bytecodes(service, requests[:1000])}")
        if args.breakdown:
            await breakdown(service, store, models.primary, requests, now)
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for request in requests:
                await answer(service, request)
            profile.disable()
            pstats.Stats(profile).sort_stats(args.profile).print_stats(30)
    finally:
        await rollouts.stop()
        await models.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--profile", choices=["tottime", "cumulative"])
    parser.add_argument(
        "--breakdown", action="store_true", help="also time features, model, batcher alone"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="also time Score with the caches evicted before each call, as under load",
    )
    parser.add_argument(
        "--cold-rows",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[],
        metavar="K,K,...",
        help="also time Score with the caches evicted before each row of K calls run "
        "back to back (as the server runs unary calls in rows), e.g. 1,4,16",
    )
    parser.add_argument(
        "--bytecodes",
        action="store_true",
        help="also count bytecodes and calls per Score (deterministic, untimed)",
    )
    parser.add_argument(
        "--onnx-kernel",
        choices=KERNELS,
        default="auto",
        help="the onnx_kernel setting: the dense kernel where it fits, or onnxruntime",
    )
    uvloop.run(main(parser.parse_args()))

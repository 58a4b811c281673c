"""Does the GC freeze policy leak? Objects frozen while alive that die in a cycle.

The policy's one cost (``server/gc_policy.py``): the permanent generation is never
collected, so an object frozen while alive that later dies inside a reference cycle
is never freed. This runs a real server in this process with the policy freezing
every ``--interval`` (10 ms by default, far more often than served, so that calls are
caught in flight), and drives it from a child process (whose objects are not ours):
answered Score calls, refused ones (INVALID_ARGUMENT, raised inside the handler),
calls whose client deadline passes, ScoreStreams run to their end and ScoreStreams
cancelled halfway. Then it collects the young generations, unfreezes everything and
counts what a full collection finds: cyclic garbage that was frozen, the leak.

    python -m loadtest.gc_leaks --model-repository DIR [--rounds 200]

Prints the calls made and the leaked objects by type; exit status 1 when any leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections import Counter
from pathlib import Path

import grpc
import uvloop

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.argtypes import positive
from streamscore.config import Settings
from streamscore.gc_tuning import tune_for_large_state
from streamscore.server.app import ScoringServer
from streamscore.server.gc_policy import LongLivedFreezer


def transaction(i: int) -> pb.Transaction:
    return pb.Transaction(
        transaction_id=f"t-{i}",
        card_id=f"card-{i % 50}",
        merchant_id="m-1",
        device_id=f"d-{i % 7}",
        ip="198.51.100.7",
        amount_minor=1_000 + i,
        currency="EUR",
        mcc="5411",
        country="DE",
    )


async def drive(target: str, rounds: int) -> Counter[str]:
    """The client side (a child process): every kind of call, ``rounds`` times."""
    outcomes: Counter[str] = Counter()

    async def call(kind: str, awaitable: object) -> None:
        try:
            await awaitable  # type: ignore[misc]
            outcomes[f"{kind}: OK"] += 1
        except grpc.aio.AioRpcError as error:
            outcomes[f"{kind}: {error.code().name}"] += 1

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        for i in range(rounds):
            valid = pb.ScoreRequest(request_id=f"r-{i}", transaction=transaction(i))
            await asyncio.gather(
                call("Score", stub.Score(valid, timeout=5)),
                call("Score, no transaction", stub.Score(pb.ScoreRequest(request_id="x"))),
                call("Score, 1 us deadline", stub.Score(valid, timeout=1e-6)),
                call("ScoreStream", _stream(stub, i, cancel=False)),
                call("ScoreStream, cancelled", _stream(stub, i, cancel=True)),
            )
    return outcomes


async def _stream(stub: pb_grpc.ScoringStub, i: int, *, cancel: bool) -> None:
    requests = [
        pb.ScoreRequest(request_id=f"s-{i}-{k}", transaction=transaction(k)) for k in range(4)
    ]
    stream = stub.ScoreStream(iter(requests), timeout=5)
    read = 0
    async for _ in stream:
        read += 1
        if cancel and read == 2:
            stream.cancel()
            raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, None, None)


async def check(args: argparse.Namespace) -> int:
    tune_for_large_state()
    freezer = LongLivedFreezer(args.interval)
    settings = Settings(port=0, model_repository=args.model_repository, model_reload_interval_s=0)
    server = ScoringServer(settings, gc_freezer=freezer)
    collected = 0

    def tally(phase: str, info: dict[str, int]) -> None:
        nonlocal collected
        if phase == "stop":
            collected += info["collected"]

    await freezer.start()
    try:
        await server.start()
        # Only the freezes collect during the load, and they count what they free.
        gc.disable()
        gc.callbacks.append(tally)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.gc_leaks", "--client", f"127.0.0.1:{server.port}",
            "--rounds", str(args.rounds), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await child.communicate()
        print(out.decode().rstrip())
        if child.returncode != 0:
            print("the client failed")
            return 2
        freezes = freezer.freezes
        await freezer.stop()
        gc.collect(1)  # young garbage is not a leak: the next freeze would free it first
        gc.callbacks.remove(tally)
        gc.enable()
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what it finds, to name it
        found = gc.collect()
        leaked = Counter(type(o).__name__ for o in gc.garbage)
        gc.set_debug(0)
        gc.garbage.clear()
    finally:
        if tally in gc.callbacks:
            gc.callbacks.remove(tally)
        gc.enable()
        await server.stop()
        await freezer.stop()
    print(f"{freezes} freezes; cyclic garbage the calls made, freed before a freeze: {collected}")
    print(f"frozen then left as cyclic garbage (leaked): {found} objects")
    for name, count in leaked.most_common(10):
        print(f"  {name}: {count}")
    return 1 if found else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path)
    p.add_argument("--rounds", type=int, default=200, help="of each kind of call")
    p.add_argument("--interval", type=positive, default=0.01, help="freeze interval, seconds")
    p.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        outcomes = uvloop.run(drive(args.client, args.rounds))
        print("calls: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        return 0
    if args.model_repository is None:
        p.error("--model-repository is required")
    return uvloop.run(check(args))


if __name__ == "__main__":
    sys.exit(main())

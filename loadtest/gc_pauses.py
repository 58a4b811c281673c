"""Garbage-collector pauses with a large feature state, with and without the freeze policy.

Each policy runs in a fresh process (the collector's state is per process), like a
server replica: fold a log of ``--cards`` card entities (plus the merchants, devices
and IPs they bring; what a restarted server does while NOT_SERVING), then serve for
``--seconds``: feature reads for random known entities offered open loop at
``--rate`` per second (latency from each read's intended time, so a pause delays every
read due during it), while new events are folded at ``--events-per-s``, growing the
state as live traffic does. Every collection is timed through ``gc.callbacks``.
Reported per policy: the build time, the pauses during the build and while serving
(count and longest, by generation), the reads' p50 / p99 / p99.9 / max, and what one
full collection would cost at the end (timed: ``gc.collect(2)``).

    python -m loadtest.gc_pauses --cards 300000 --seconds 30
    python -m loadtest.gc_pauses --policy on --cards 2000 --seconds 1 --json out.json

``off`` is CPython's collector with the thresholds every streamscore process sets
(``gc_tuning``); ``on`` adds ``server/gc_policy.py``'s freezer (``--interval``, the
``gc_freeze_interval_s`` setting).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from hdrh.histogram import HdrHistogram

from loadtest.feature_bench import START_MS, card_log, fold
from streamscore.argtypes import positive
from streamscore.gc_tuning import tune_for_large_state
from streamscore.server.gc_policy import LongLivedFreezer
from streamscore.stream.assembly import event_features
from streamscore.stream.events import PaymentEvent
from streamscore.stream.state import FeatureStore

FOLD_BATCH = 5000
FOLD_TICK_S = 0.01


class PauseLog:
    """Every collection's generation and duration, in one phase of the run."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def summary(self) -> dict[str, dict[str, float]]:
        by_generation: dict[str, dict[str, float]] = {}
        for generation in (0, 1, 2):
            times = [s for g, s in self.pauses if g == generation]
            by_generation[str(generation)] = {
                "count": len(times),
                "max_ms": max(times, default=0.0) * 1000,
                "total_ms": sum(times) * 1000,
            }
        return by_generation


async def build(store: FeatureStore, events: list[PaymentEvent]) -> float:
    """Fold the log in batches, yielding between them (the freezer runs there)."""
    started = time.perf_counter()
    for i in range(0, len(events), FOLD_BATCH):
        fold(store, events[i : i + FOLD_BATCH])
        await asyncio.sleep(0)
    return time.perf_counter() - started


async def serve(
    store: FeatureStore, known: list[PaymentEvent], args: argparse.Namespace
) -> HdrHistogram:
    """Open-loop reads of ``known`` entities plus live folding for ``args.seconds``;
    the reads' latencies (us)."""
    latencies = HdrHistogram(1, 60_000_000, 3)
    rng = random.Random(7)
    now_ms = START_MS + args.cards + 1000
    clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds
    started = clock()
    end = started + args.seconds

    async def reads() -> None:
        interval, i = 1.0 / args.rate, 0
        while (due := started + i * interval) < end:
            if (wait := due - clock()) > 0:
                await asyncio.sleep(wait)
            event = known[rng.randrange(len(known))]
            event_features(store, event, now_ms)
            latencies.record_value(max(1, int((clock() - due) * 1e6)))
            i += 1

    async def folds() -> None:
        per_tick, next_card = max(1, int(args.events_per_s * FOLD_TICK_S)), args.cards
        while clock() < end:
            fold(store, card_log(next_card + per_tick, next_card, now_ms))
            next_card += per_tick
            await asyncio.sleep(FOLD_TICK_S)

    await asyncio.gather(reads(), folds())
    return latencies


async def run_one(args: argparse.Namespace) -> dict[str, Any]:
    tune_for_large_state()
    freezer = LongLivedFreezer(args.interval if args.policy == "on" else 0.0)
    await freezer.start()
    building, serving = PauseLog(), PauseLog()
    store = FeatureStore()
    # Kept to the end: freeing it is no collection's cost.
    log = card_log(args.cards)
    gc.callbacks.append(building)
    try:
        build_s = await build(store, log)
        freezer.freeze_now()  # as the server does before SERVING
    finally:
        gc.callbacks.remove(building)
    gc.callbacks.append(serving)
    try:
        latencies = await serve(store, log, args)
    finally:
        gc.callbacks.remove(serving)
    await freezer.stop()
    full_started = time.perf_counter()
    gc.collect(2)
    full_collection_s = time.perf_counter() - full_started
    return {
        "policy": args.policy,
        "entities": len(store),
        "tracked_objects": len(gc.get_objects()),
        "frozen_objects": gc.get_freeze_count(),
        "build_s": build_s,
        "build_pauses": building.summary(),
        "serve_pauses": serving.summary(),
        "reads": latencies.get_total_count(),
        "read_ms": {f"p{q:g}": latencies.get_value_at_percentile(q) / 1000 for q in (50, 99, 99.9)}
        | {"max": latencies.get_max_value() / 1000},
        "full_collection_s": full_collection_s,
        "log_events": len(log),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| policy | entities | build s | build pauses: gen 1 max, gen 2 max ms (count) "
        "| serving pauses: gen 0 / 1 / 2 max ms (counts) | reads p50 / p99 / p99.9 / max ms "
        "| one full collection at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, s, ms = r["build_pauses"], r["serve_pauses"], r["read_ms"]
        lines.append(
            f"| {r['policy']} | {r['entities']:,} | {r['build_s']:.1f} "
            f"| {b['1']['max_ms']:.0f}, {b['2']['max_ms']:.0f} "
            f"({b['1']['count']}, {b['2']['count']}) "
            f"| {s['0']['max_ms']:.1f} / {s['1']['max_ms']:.1f} / {s['2']['max_ms']:.1f} "
            f"({s['0']['count']}, {s['1']['count']}, {s['2']['count']}) "
            f"| {ms['p50']:.2f} / {ms['p99']:.2f} / {ms['p99.9']:.2f} / {ms['max']:.2f} "
            f"| {r['full_collection_s'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", choices=["on", "off", "both"], default="both")
    p.add_argument("--cards", type=int, default=300_000, help="card entities folded first")
    p.add_argument("--seconds", type=positive, default=30.0, help="of serving (default 30)")
    p.add_argument("--rate", type=positive, default=500.0, help="feature reads per second")
    p.add_argument("--events-per-s", type=positive, default=2000.0, help="new events folded")
    p.add_argument("--interval", type=positive, default=0.25, help="freeze interval (policy on)")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> int:
    args = parser().parse_args()
    if args.one:  # a child: one policy, its result as JSON on stdout
        print(json.dumps(uvloop.run(run_one(args))))
        return 0
    results = []
    for policy in ("off", "on") if args.policy == "both" else (args.policy,):
        command = [sys.executable, "-m", "loadtest.gc_pauses", *sys.argv[1:], "--one"]
        command += ["--policy", policy]
        print(f"policy {policy}: {args.cards:,} cards, then {args.seconds:g} s serving", flush=True)
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

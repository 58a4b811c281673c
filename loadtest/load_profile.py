"""Where a real `streamscore serve` spends its CPU under open-loop load (py-spy).

Starts tansu, folds the same features as ``loadtest.ab``, starts the server, warms it
for 3 s, then offers ``--rate`` for ``--seconds`` while py-spy samples the server
(``--nonblocking``: the server is never paused). Prints the server CPU per request and
the samples sorted into parts of the path:

    python -m loadtest.load_profile --model-repository DIR --rpc score --rate 1000

The raw samples (py-spy's "raw" format, one stack per line) stay in ``--out``. Frames
of coroutines resumed by the event loop have no parents in py-spy's stacks, so parts
are told apart by the code a stack contains, not by its root.

Two more views of the same window, for comparing with the echo server (whose gRPC
work is the same):

* CPU per request by thread (Linux schedstat): the event loop's thread against
  gRPC's own threads;
* with ``--perf``, the event loop thread's CPU by library (``perf record`` on that
  thread): the interpreter (``libpython``: our code, asyncio, gRPC's Python glue),
  gRPC's compiled core (``cygrpc``), the kernel (syscalls, context switches),
  onnxruntime, numpy... py-spy sees only Python stacks and puts all native time under
  the loop's ``Runner.run``; perf tells what that native time is.

``--echo`` profiles the echo server (``loadtest/echo_server.py``) the same way, with
the same load (``echo``/``echo-stream``), for those comparisons; ``--model-echo`` the
model echo (the echo plus Score's one model call: the floor of Score's cost):

    python -m loadtest.load_profile --model-repository DIR --rate 500 --perf
    python -m loadtest.load_profile --model-repository DIR --rate 500 --perf --echo
    python -m loadtest.load_profile --model-repository DIR --rate 500 --perf --model-echo
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import uvloop

from loadtest.client_pool import (
    ClientPool,
    echo_rpc,
    in_flight_unshared,
    realistic_events,
    score_requests,
)
from loadtest.servers import echo_process, load_features, serve_process
from streamscore.argtypes import at_least_one, positive
from streamscore.client import wait_serving
from streamscore.loopback_process import find_free_port
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout

# First match wins, top to bottom.
PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("feature replica: fetch polling and folding", re.compile(r"aiokafka|stream/replica\.py")),
    (
        "event loop, no Python frame: gRPC, uvloop, protobuf, the interpreter's work "
        "for them, syscalls",
        re.compile(r"Runner\.run \(asyncio/runners\.py:\d+\)$"),
    ),
    # Before features: the dense kernel (kernels/dense.py) is part of the model call.
    (
        "model call: onnxruntime/torch/dense kernel and its glue",
        re.compile(r"server/backends/|kernels/dense\.py"),
    ),
    ("features: assembly, state, window kernel", re.compile(r"streamscore/(stream|kernels)/")),
    (
        "rest of the server's Python: handler, batcher, rollout, response, metrics",
        re.compile(r"streamscore/server/"),
    ),
    ("asyncio tasks and waits", re.compile(r"asyncio/(tasks|locks|queues)\.py|_weakrefset")),
    ("other threads, native (gRPC's poller)", re.compile(r"threading\.py")),
)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its name and seconds on a CPU so far (schedstat)."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            on_cpu = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
        threads[int(tid)] = (name, on_cpu / 1e9)
    return threads


def per_thread(
    pid: int,
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    requests: float,
) -> dict[str, float]:
    """us of CPU per request: the event loop's thread (the main one), the others by name."""
    rows: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        label = "event loop (main thread)" if tid == pid else f"{name} threads"
        used = (seconds - before.get(tid, (name, 0.0))[1]) / requests * 1e6
        rows[label] = rows.get(label, 0.0) + used
    return dict(sorted(rows.items(), key=lambda item: -item[1]))


DSO_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S.*?)\s*$")


def perf_by_library(data: Path) -> dict[str, float]:
    """Share (%) of ``perf record`` samples by shared library."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        match = DSO_LINE.match(line)
        if match and not line.startswith("#"):
            shares[match.group(2)] = float(match.group(1))
    return shares


def parts(raw: Path) -> tuple[int, Counter[str]]:
    """Samples in all, and per part of the path."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        stack = stack.rstrip()
        name = next((name for name, pattern in PARTS if pattern.search(stack)), "other")
        counts[name] += int(n)
    return total, counts


async def main(args: argparse.Namespace) -> int:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = args.out or Path(tempfile.mkdtemp(prefix="streamscore-profile-")) / "samples.txt"
    perf_data = out.with_suffix(".perf")
    echo = args.echo or args.model_echo
    rpc = echo_rpc(args.rpc) if echo else args.rpc
    if args.perf and shutil.which("perf") is None:
        print("--perf needs perf on PATH (Debian: linux-perf)")
        return 2
    events = realistic_events(seconds=args.replica_seconds)
    pool = ClientPool(args.clients, score_requests(events)).start()
    try:
        async with EmbeddedBroker() as broker:
            await create_topics(broker.bootstrap, TopicLayout().partitions())
            await load_features(broker.bootstrap, events)
            port = find_free_port()
            target = f"127.0.0.1:{port}"
            if echo:
                server = echo_process(
                    port,
                    str(out.with_suffix(".log")),
                    model_repository=args.model_repository if args.model_echo else None,
                    model_version=args.model_version,
                )
            else:
                server = serve_process(
                    "profiled",
                    broker.bootstrap,
                    port,
                    args.model_repository,
                    env={**os.environ, "STREAMSCORE_MODEL_VERSION": args.model_version},
                    log_path=str(out.with_suffix(".log")),
                )
            await server.start()
            try:
                await wait_serving(target, timeout=120)
                assert server.process is not None
                pid = server.process.pid
                await asyncio.to_thread(
                    pool.run,
                    target,
                    rpc,
                    args.rate,
                    3.0,
                    streams=args.streams,
                    server_pids=[pid],
                    closed_in_flight=args.in_flight,
                )
                perf = None
                if args.perf:
                    perf = await asyncio.create_subprocess_exec(
                        "perf", "record", "-F", "999", "-t", str(pid), "-o", str(perf_data),
                        "--", "sleep", str(args.seconds),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                threads_before = thread_cpu(pid)
                spy = await asyncio.create_subprocess_exec(
                    py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds),
                    "--format", "raw", "--output", str(out), "--rate", "500", "--nonblocking",
                    stdout=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                row = await asyncio.to_thread(
                    pool.run,
                    target,
                    rpc,
                    args.rate,
                    float(args.seconds),
                    streams=args.streams,
                    server_pids=[pid],
                    closed_in_flight=args.in_flight,
                )
                threads_after = thread_cpu(pid)
                if await spy.wait() != 0:
                    print("py-spy failed (it needs ptrace rights over the server)")
                    return 1
                if perf is not None and await perf.wait() != 0:
                    print("perf record failed (it needs perf_event rights over the server)")
                    return 1
            finally:
                await server.stop()
    finally:
        pool.close()
    total, counts = parts(out)
    cpu = row.server_cpu_us or 0.0
    label = f"model echo, {rpc}" if args.model_echo else rpc
    print(
        f"{label} at "
        + (f"{args.in_flight} in flight" if args.in_flight else f"{args.rate:,.0f}/s offered")
        + f", {row.achieved_rate:,.0f}/s achieved, "
        f"p99 {row.p99_ms:.1f} ms; server CPU {cpu:.0f} us/req; {total} samples in {out}"
    )
    print("| part | share of samples | ~us per request |\n|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {n / total:.1%} | {cpu * n / total:.0f} |")
    requests = row.achieved_rate * args.seconds
    threads = per_thread(pid, threads_before, threads_after, requests)
    print("\n| thread | us of CPU per request |\n|---|---|")
    for label, us in threads.items():
        print(f"| {label} | {us:.0f} |")
    if args.perf:
        loop_us = threads["event loop (main thread)"]
        print(f"\n| event loop thread, by library (perf, {perf_data}) | share | ~us per request |")
        print("|---|---|---|")
        for library, share in perf_by_library(perf_data).items():
            print(f"| {library} | {share:.1f}% | {loop_us * share / 100:.0f} |")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model-version", default="1")
    p.add_argument("--rpc", choices=["score", "stream"], default="score")
    p.add_argument("--rate", type=positive, default=1000.0, help="offered requests/s")
    p.add_argument(
        "--in-flight",
        type=at_least_one,
        default=0,
        help="closed-loop load instead of --rate: calls (stream messages) kept in flight",
    )
    p.add_argument("--seconds", type=at_least_one, default=12, help="profiled seconds (default 12)")
    p.add_argument("--clients", type=at_least_one, default=2, help="load processes (default 2)")
    p.add_argument("--replica-seconds", type=positive, default=400.0, help="of events folded")
    p.add_argument("--streams", type=at_least_one, default=2, help="ScoreStreams per client")
    p.add_argument("--out", type=Path, help="py-spy's raw samples (default: a temp file)")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument(
        "--echo",
        action="store_true",
        help="profile the echo server instead, under the same load (the baseline)",
    )
    baseline.add_argument(
        "--model-echo",
        action="store_true",
        help="profile the model echo instead (the echo plus Score's one model call)",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="also sample the event loop thread with perf: its CPU by library",
    )
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    unshared = in_flight_unshared([args.in_flight], args.clients, args.streams, args.rpc)
    if unshared:
        p.error(f"--in-flight: {unshared} (--clients, --streams)")
    return args


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(parse())))

"""Multi-process scaling: ``serve --workers N`` against N echo processes on one port.

For each worker count, the bare echo server runs as that many processes sharing a
port (SO_REUSEPORT, the baseline) and then ``streamscore serve --workers N`` does;
each gets the same open-loop sweep (``loadtest.sweep``: rising rates until the p99
budget is missed, then bisection) from ``--clients`` processes that spread their
calls over ``--connections`` TCP connections each (the kernel hands each new
connection to one of the listening processes, so spread needs many connections, as
behind a load balancer). Every worker folds the same features first (the replica
design: each worker holds every entity). Server CPU per request is summed over all
the processes of the set, supervisor included.

    python -m loadtest.scaling --model-repository DIR --workers 1,2,4,8 \\
        --rates 1000,2000,4000,6000,8000,12000,16000 --clients 6 --connections 8 \\
        --seconds 3 --refine 2 --json scaling.json --plot scaling.png

``--spread client`` measures the other way to reach the workers: each process also
listens on a port of its own (``serve --worker-port-base``; echo i on base + i) and
each client channel names them all with gRPC's ``round_robin`` policy, so calls, not
connections, are spread, evenly whatever the number of connections.

The table gives, per worker count, the highest rate within budget for each, the ratio
Score / echo, the speed-up over one worker, and the CPU per request at the highest
rate both passed. Needs a trained repository (``streamscore train``) and cores to
spare: on a machine with fewer cores than workers + clients, more workers only share
the same cores (the client CPU column says when the load generator was the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.client_pool import ClientPool, Row, realistic_events, score_requests
from loadtest.procstat import cpu_seconds, descendants
from loadtest.scrape import scrape, total
from loadtest.servers import echo_process, load_features, serve_process
from loadtest.sweep import sweep
from streamscore.argtypes import at_least_one, positive, positives
from streamscore.loopback_process import find_free_port, find_free_ports
from streamscore.processes import ChildProcess
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout
from streamscore.supervisor import spread_target


@dataclass
class Result:
    """One server set (echo or Score) at one worker count: its sweep."""

    kind: str
    workers: int
    rows: list[Row] = field(default_factory=list)
    max_rate: float | None = None
    served: list[int] = field(default_factory=list)  # Score calls answered, per worker
    cpu_s: list[float] = field(default_factory=list)  # CPU seconds per server process

    def row_at(self, rate: float) -> Row | None:
        return next((r for r in self.rows if r.offered_rate == rate), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "workers": self.workers,
            "max_rate": self.max_rate,
            "served_per_worker": self.served,
            "cpu_seconds_per_process": self.cpu_s,
            "rows": [row.to_json() for row in self.rows],
        }


async def wait_all_serving(target: str, workers: int, timeout: float = 180.0) -> None:
    """Wait until ``workers * 8`` health checks in a row, each on a new connection (so
    spread over the processes sharing the port), answer SERVING: every worker has
    caught up with the features, not only the first one asked."""
    deadline = time.monotonic() + timeout
    in_a_row, last = 0, "no answer"
    while in_a_row < workers * 8:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target}: not all {workers} workers SERVING (last: {last})")
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2.0
                )
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                serving, last = False, error.code().name
        in_a_row = in_a_row + 1 if serving else 0
        if not serving:
            await asyncio.sleep(0.2)


def served_per_worker(metrics_port: int, workers: int) -> list[int]:
    """Score calls each worker answered, from its own /metrics: how evenly the kernel
    spread the connections."""
    return [
        int(
            total(
                scrape(f"http://127.0.0.1:{metrics_port + i}/metrics"),
                "streamscore_rpc_seconds_count",
                default=0,
                rpc="Score",
            )
        )
        for i in range(workers)
    ]


async def start_set(
    kind: str, workers: int, bootstrap: str, args: argparse.Namespace
) -> tuple[str, list[tuple[str, int]], list[ChildProcess], int]:
    """``workers`` echo processes, or one ``serve --workers``, on a fresh port; the
    target, the addresses to wait on (each with the workers behind it), the processes
    and (Score) the first worker's metrics port. With ``--spread client`` the target
    lists a port per process (see the module doc)."""
    port = find_free_port()
    metrics_port = 0
    target = f"127.0.0.1:{port}"
    ready = [(target, workers)]
    own_ports = args.spread == "client"
    base = find_free_ports(workers) if own_ports else 0
    if own_ports:
        target = spread_target("127.0.0.1", base, workers)
        ready = [(f"127.0.0.1:{base + i}", 1) for i in range(workers)]
    if kind == "echo":
        processes = [
            echo_process(
                base + i if own_ports else port,
                str(args.logs / f"echo-{workers}-{i}.log"),
                reuseport=not own_ports,
                name=f"echo-{i}",
            )
            for i in range(workers)
        ]
    else:
        server = serve_process(
            f"serve-{workers}",
            bootstrap,
            port,
            args.model_repository,
            env={**os.environ, "STREAMSCORE_MODEL_VERSION": args.model_version},
            log_path=str(args.logs / f"serve-{workers}.log"),
        )
        metrics_port = find_free_ports(workers)
        server.argv += ["--workers", str(workers), "--metrics-port", str(metrics_port)]
        if own_ports:
            server.argv += ["--worker-port-base", str(base)]
        processes = [server]
    for process in processes:
        await process.start()
    return target, ready, processes, metrics_port


def pids_of(processes: list[ChildProcess]) -> list[int]:
    pids = []
    for process in processes:
        assert process.process is not None
        pids += [process.process.pid, *descendants(process.process.pid)]
    return pids


def serving_pids(kind: str, workers: int, processes: list[ChildProcess]) -> list[int]:
    """The processes that answer calls: each echo, or each worker (``serve --workers
    1`` is its own worker; with more, the supervisor's children answer)."""
    pids = [process.process.pid for process in processes if process.process is not None]
    if kind == "echo" or workers == 1:
        return pids
    pid = pids[0]
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def _rate(value: float | None) -> str:
    return "none" if value is None else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None, suffix: str = "") -> str:
    return f"{a / b:.2f}{suffix}" if a and b else ""


def _cpu(row: Row | None) -> str:
    return f"{row.server_cpu_us:.0f}" if row and row.server_cpu_us else ""


def _imbalance(load: Sequence[float]) -> str:
    """The busiest process's load over the mean: 1.00 is an even spread; the set
    saturates when its busiest process does."""
    if not load or not sum(load):
        return ""
    return f"{max(load) * len(load) / sum(load):.2f}"


def summary(results: list[Result], budget_ms: float) -> str:
    by = {(r.kind, r.workers): r for r in results}
    counts = sorted({r.workers for r in results})
    lines = [
        f"| workers | echo max/s (p99 <= {budget_ms:g} ms) | Score max/s | Score / echo "
        "| echo speed-up | Score speed-up | at rate/s | echo CPU us/req | Score CPU us/req "
        "| busiest process / mean CPU: echo, Score | busiest client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workers in counts:
        echo, score = by.get(("echo", workers)), by.get(("score", workers))
        if echo is None or score is None:
            continue
        # CPU per request at the highest rate both passed.
        common = sorted(
            {r.offered_rate for r in echo.rows if r.passed}
            & {r.offered_rate for r in score.rows if r.passed}
        )
        at = common[-1] if common else None
        busiest = max((r.client_cpu for r in echo.rows + score.rows), default=0.0)
        lines.append(
            f"| {workers} | {_rate(echo.max_rate)} | {_rate(score.max_rate)} "
            f"| {_ratio(score.max_rate, echo.max_rate)} "
            f"| {_ratio(echo.max_rate, by[('echo', counts[0])].max_rate, 'x')} "
            f"| {_ratio(score.max_rate, by[('score', counts[0])].max_rate, 'x')} "
            f"| {_rate(at) if at else ''} "
            f"| {_cpu(echo.row_at(at) if at else None)} "
            f"| {_cpu(score.row_at(at) if at else None)} "
            f"| {_imbalance(echo.cpu_s)}, {_imbalance(score.cpu_s)} "
            f"| {busiest:.0%} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], budget_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, label in (("echo", "bare grpc.aio echo"), ("score", "streamscore Score")):
        points = sorted((r.workers, r.max_rate or 0.0) for r in results if r.kind == kind)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=label)
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle=":", color="grey")
    ax.set_xlabel("server processes (one port, SO_REUSEPORT)")
    ax.set_ylabel(f"highest rate with p99 <= {budget_ms:g} ms (req/s)")
    ax.set_title("Multi-process scaling (dotted: linear from 1 process)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show(row: Row, kind: str, workers: int) -> None:
    cpu = f"{row.server_cpu_us:.0f}" if row.server_cpu_us else "?"
    print(
        f"{kind:>5} x{workers}: {row.offered_rate:>8,.0f}/s offered, "
        f"{row.achieved_rate:>8,.0f}/s achieved, p99 {row.p99_ms:7.2f} ms, "
        f"errors {row.errors}, dropped {row.dropped}, server CPU {cpu} us/req, "
        f"busiest client {row.client_cpu:.0%}{'' if row.passed else '  (miss)'}",
        flush=True,
    )


async def measure(
    kind: str,
    workers: int,
    rates: list[float],
    pool: ClientPool,
    bootstrap: str,
    args: argparse.Namespace,
) -> Result:
    """Start one set, sweep it, read how the load spread, stop it."""
    target, ready, processes, metrics_port = await start_set(kind, workers, bootstrap, args)
    try:
        if kind == "score":
            for address, behind in ready:
                await wait_all_serving(address, behind)
        serving = serving_pids(kind, workers, processes)
        cpu_before = [cpu_seconds(pid) for pid in serving]
        result = Result(kind, workers)
        result.rows, result.max_rate = await asyncio.to_thread(
            sweep,
            pool,
            target,
            kind,  # "echo" or "score", as loadtest.sweep names them
            rates,
            args.seconds,
            args.budget_p99_ms,
            refine=args.refine,
            on_row=lambda row: show(row, kind, workers),
            server_pids=pids_of(processes),
            max_in_flight=args.max_in_flight,
        )
        result.cpu_s = [
            round(cpu_seconds(pid) - before, 3)
            for pid, before in zip(serving, cpu_before, strict=True)
        ]
        if metrics_port:
            result.served = served_per_worker(metrics_port, workers)
            print(f"score x{workers}: answered per worker {result.served}", flush=True)
        return result
    finally:
        for process in reversed(processes):
            await process.stop()


async def main(args: argparse.Namespace) -> int:
    args.logs.mkdir(parents=True, exist_ok=True)
    events = realistic_events(seconds=args.replica_seconds)
    results: list[Result] = []
    failed = 0
    with ClientPool(args.clients, score_requests(events), connections=args.connections) as pool:
        async with EmbeddedBroker() as broker:
            await create_topics(broker.bootstrap, TopicLayout().partitions())
            await load_features(broker.bootstrap, events)
            best: dict[str, float] = {}
            for workers in args.workers:
                for kind in ("echo", "score"):
                    # More workers start their ladder at half the last count's best
                    # (the lower rates pass; the time goes to the top of the curve).
                    rates = [r for r in args.rates if r >= best.get(kind, 0.0) / 2]
                    try:  # a failed set is reported and the others still run
                        result = await measure(
                            kind, workers, rates or args.rates[-1:], pool, broker.bootstrap, args
                        )
                    except (RuntimeError, TimeoutError) as error:
                        print(f"{kind} x{workers}: failed: {error}", file=sys.stderr, flush=True)
                        failed += 1
                        continue
                    best[kind] = result.max_rate or 0.0
                    results.append(result)
    table = summary(results, args.budget_p99_ms)
    spread = (
        "calls spread by the clients (round_robin over a port per process)"
        if args.spread == "client"
        else "connections spread by the kernel (one shared port)"
    )
    print(
        f"\n{args.clients} client processes x {args.connections} connections, "
        f"{args.seconds:g} s per step, {os.cpu_count()} cores, {spread}:"
    )
    print(table)
    if args.json:
        report = {
            "command": getattr(args, "command", ""),
            "cores": os.cpu_count(),
            "budget_p99_ms": args.budget_p99_ms,
            "clients": args.clients,
            "connections": args.connections,
            "spread": args.spread,
            "results": [r.to_json() for r in results],
            "table": table,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(results, args.budget_p99_ms, args.plot)
    return 1 if failed else 0


def parse_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("workers: comma-separated whole numbers") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("workers: comma-separated numbers >= 1")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model-version", default="1")
    p.add_argument("--workers", type=parse_counts, default=[1, 2], help="e.g. 1,2,4,8")
    p.add_argument("--rates", type=positives, required=True, help="offered rates, ascending")
    p.add_argument("--seconds", type=positive, default=3.0, help="per step (default 3)")
    p.add_argument("--clients", type=at_least_one, default=4, help="load processes (default 4)")
    p.add_argument(
        "--connections", type=int, default=8, help="TCP connections per client (default 8)"
    )
    p.add_argument(
        "--spread",
        choices=["kernel", "client"],
        default="kernel",
        help="kernel: one shared port (SO_REUSEPORT spreads connections); client: a port "
        "per process, calls spread by round_robin (default kernel)",
    )
    p.add_argument("--budget-p99-ms", type=positive, default=10.0)
    p.add_argument("--refine", type=int, default=2, help="bisection steps after each sweep")
    p.add_argument("--max-in-flight", type=int, default=2048, help="all clients together")
    p.add_argument("--replica-seconds", type=positive, default=400.0)
    p.add_argument("--logs", type=Path, default=Path("scaling-logs"), help="server logs here")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="PNG: max rate in budget vs processes")
    return p


if __name__ == "__main__":
    arguments = parser().parse_args()
    arguments.command = shlex.join(
        [Path(sys.executable).name, "-m", "loadtest.scaling", *sys.argv[1:]]
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(arguments)))

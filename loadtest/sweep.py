"""Open-loop rate sweep from several client processes; finds the highest rate in budget.

One Python process of grpc.aio saturates a core well before a fast server does, and
then its own lateness shows up as server latency. This runs the open-loop generator
(``openloop.open_loop``; ``streamload.open_loop_streams`` for ``ScoreStream``) in
``--clients`` processes (multiprocessing, spawn), each at ``rate / clients`` with its
schedule shifted by ``k / rate`` so the merged arrivals stay evenly spaced, for the
same seconds; their HdrHistograms are merged. Latency runs from each request's
intended send time. The client processes start once and serve every step.

Per offered rate: achieved rate, p50/p90/p99/p99.9/max, errors (failed calls),
dropped (not sent: too many in flight), the busiest client's CPU (near 100 % means
add clients) and, with ``--server-pid``, the server's CPU time per answered request
(utime + stime from /proc over the step). The rates are tried in increasing order
until one misses the budget (p99 over it, or any error or drop); ``--refine N``
then bisects N times between the last passing and the first failing rate.

    python -m loadtest.sweep --target 127.0.0.1:50051 --rpc score \\
        --rates 200,400,800 --seconds 5 --clients 2 --budget-p99-ms 10 --json sweep.json

``--rpc``: ``score`` (unary Score), ``stream`` (ScoreStream, ``--streams`` long-lived
streams per client), ``echo`` (unary Score against ``loadtest/echo_server.py``: the
same messages, labelled as the baseline), ``echo-stream`` (ScoreStream against the
echo server, the same load as ``stream``: the ScoreStream baseline). Requests are
realistic payments from ``streamscore.traffic`` (backend_bench's seed), stamped with
the current time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.client_pool import (
    RPCS,
    STREAM_RPCS,
    ClientPool,
    Row,
    realistic_events,
    score_requests,
)
from loadtest.procstat import format_steal
from loadtest.workdir import exit_on_sigterm
from streamscore.argtypes import at_least_one, positive, positives
from streamscore.tls import ClientTls, add_client_tls_arguments

# -- the sweep ---------------------------------------------------------------------------


def sweep(
    pool: ClientPool,
    target: str,
    rpc: str,
    rates: Sequence[float],
    seconds: float,
    budget_p99_ms: float,
    *,
    refine: int = 0,
    keep_going: bool = False,
    on_row: Callable[[Row], None] = lambda row: None,
    **run: Any,
) -> tuple[list[Row], float | None]:
    """Step through ``rates`` (ascending) until one misses the budget, then bisect
    ``refine`` times; returns every row and the highest passing offered rate."""
    rows: list[Row] = []
    best: float | None = None
    first_fail: float | None = None

    def step(rate: float, phase: str) -> bool:
        row = pool.run(target, rpc, rate, seconds, **run)
        row.passed = row.meets(budget_p99_ms)
        row.phase = phase
        rows.append(row)
        on_row(row)
        return row.passed

    for rate in sorted(set(rates)):
        if step(rate, "step"):
            best = rate if best is None else max(best, rate)
        else:
            first_fail = rate if first_fail is None else min(first_fail, rate)
            if not keep_going:
                break
    if first_fail is not None:
        low, high = (best if best is not None and best < first_fail else 0.0), first_fail
        for _ in range(refine):
            mid = round((low + high) / 2)
            if mid <= low or mid >= high:
                break
            if step(float(mid), "refine"):
                low = float(mid)
                best = max(best or 0.0, low)
            else:
                high = float(mid)
    return rows, best


HEADER = (
    "| offered/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | dropped "
    "| server CPU us/req | client CPU | CPU steal | in budget |"
)


def table_row(row: Row) -> str:
    cpu = "" if row.server_cpu_us is None else f"{row.server_cpu_us:.0f}"
    verdict = {True: "yes", False: "no", None: ""}[row.passed]
    return (
        f"| {row.offered_rate:,.0f} | {row.achieved_rate:,.0f} | {row.p50_ms:.2f} | "
        f"{row.p90_ms:.2f} | {row.p99_ms:.2f} | {row.p999_ms:.2f} | {row.max_ms:.2f} | "
        f"{row.errors} | {row.dropped} | {cpu} | {row.client_cpu:.0%} | "
        f"{format_steal(row.steal_pct)} | {verdict} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument(
        "--rpc",
        choices=RPCS,
        default="score",
        help="score: unary Score; stream: ScoreStream; echo: unary Score on "
        "loadtest/echo_server.py (the baseline); echo-stream: ScoreStream on the echo "
        "server (the stream baseline). Default score",
    )
    parser.add_argument("--rates", type=positives, required=True, help="e.g. 200,400,800")
    parser.add_argument("--seconds", type=positive, default=5.0, help="per step (default 5)")
    parser.add_argument(
        "--clients", type=at_least_one, default=2, help="client processes (default 2)"
    )
    parser.add_argument(
        "--streams",
        type=at_least_one,
        default=2,
        help="ScoreStreams per client (rpc stream and echo-stream; default 2)",
    )
    parser.add_argument("--budget-p99-ms", type=positive, default=10.0)
    parser.add_argument("--refine", type=int, default=0, help="bisection steps after the sweep")
    parser.add_argument(
        "--keep-going", action="store_true", help="try every rate, not only up to the first miss"
    )
    parser.add_argument("--server-pid", type=int, help="server process: CPU per request")
    parser.add_argument(
        "--timeout-s", type=positive, default=1.0, help="unary deadline (default 1)"
    )
    parser.add_argument(
        "--max-in-flight", type=at_least_one, default=512, help="all clients together"
    )
    parser.add_argument(
        "--requests",
        type=at_least_one,
        default=4000,
        help="distinct requests, cycled (default 4000)",
    )
    parser.add_argument("--json", type=Path, help="write rows and the max rate here")
    add_client_tls_arguments(parser)
    args = parser.parse_args(argv)
    if args.requests < 2:
        parser.error("argument --requests: must be 2 or more (requests are cycled)")
    if round(min(args.rates) * args.seconds) < args.clients:
        parser.error("--rates x --seconds: each step must send each client one request or more")
    exit_on_sigterm()
    command = shlex.join([Path(sys.executable).name, "-m", "loadtest.sweep", *sys.argv[1:]])

    events = realistic_events(seconds=max(args.requests / 50 + 10, 40))[-args.requests :]
    requests = score_requests(events, prefix="sweep")
    print(
        f"sweep {args.rpc} on {args.target}: {args.clients} client processes, "
        f"{args.seconds:g} s per rate, budget p99 <= {args.budget_p99_ms:g} ms",
        flush=True,
    )
    print(HEADER, flush=True)
    print("|---" * (HEADER.count("|") - 1) + "|", flush=True)
    done: list[Row] = []

    def on_row(row: Row) -> None:
        done.append(row)
        print(table_row(row), flush=True)

    try:
        with ClientPool(args.clients, requests, tls=ClientTls.from_arguments(args)) as pool:
            rows, best = sweep(
                pool,
                args.target,
                args.rpc,
                args.rates,
                args.seconds,
                args.budget_p99_ms,
                refine=args.refine,
                keep_going=args.keep_going,
                on_row=on_row,
                streams=args.streams,
                timeout_s=args.timeout_s,
                max_in_flight=args.max_in_flight,
                server_pids=[args.server_pid] if args.server_pid else [],
            )
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as stopped:
        # The steps measured so far are kept: a long sweep stopped by hand (Ctrl-C) or
        # by SIGTERM (`timeout`, a cancelled job: an exit, exit_on_sigterm) is not lost.
        print(f"interrupted after {len(done)} steps; no highest rate found", flush=True)
        if args.json:
            write_json(args.json, args, command, done, None, interrupted=True)
        code = stopped.code if isinstance(stopped, SystemExit) else None
        return code if isinstance(code, int) else 130
    errors = [row.first_error for row in rows if row.first_error]
    if errors:
        print(f"first error: {errors[0]}")
    busy = max((row.client_cpu for row in rows), default=0.0)
    if busy > 0.8:
        print(f"note: a client process used {busy:.0%} of a core; add --clients")
    verdict = "none of the rates" if best is None else f"{best:,.0f}/s"
    print(f"highest offered rate with p99 <= {args.budget_p99_ms:g} ms, no errors: {verdict}")
    if args.json:
        write_json(args.json, args, command, rows, best)
    return 0


def write_json(
    path: Path,
    args: argparse.Namespace,
    command: str,
    rows: Sequence[Row],
    best: float | None,
    *,
    interrupted: bool = False,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "target": args.target,
        "rpc": args.rpc,
        "clients": args.clients,
        "streams": args.streams if args.rpc in STREAM_RPCS else None,
        "seconds": args.seconds,
        "budget_p99_ms": args.budget_p99_ms,
        "command": command,
        "rows": [row.to_json() for row in rows],
        "max_rate": best,
        "interrupted": interrupted,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

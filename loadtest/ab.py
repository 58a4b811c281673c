"""A/B: this working tree's server against another commit's, interleaved, repeated.

The machine is shared and noisy (one server's max rate at p99 swung 5x between runs),
so a change is judged only against its base measured in the same minutes: both
servers (and the bare echo server, the reference) run side by side on one broker
with the same features folded in, and every round offers each of them the same
open-loop load in turn (order rotated per round). The table quotes medians over the
rounds, with ranges; server CPU per request is the steadiest figure.

    python -m loadtest.ab --base HEAD~3 --model-repository DIR --rpc score \\
        --rates 500 --seconds 6 --rounds 5

``--base`` is checked out into a temporary git worktree (removed afterwards), its C
kernels compiled as ``pip install`` compiles this tree's, and served with the same
interpreter and settings. ``--head`` does the same for the other side (an earlier
change re-measured: ``--base C~1 --head C``), which is otherwise this working tree.
``--this-env NAME=VALUE`` changes a setting for that side's server only (with
``--base HEAD`` it A/Bs the setting).
``--rpc stream`` compares ScoreStream (the echo then answers ScoreStream too).
``--in-flight 64`` makes each step closed-loop: 64 calls (or stream messages, over
``--clients`` x ``--streams`` streams) kept going, the next sent as one is answered;
the achieved column is then the QPS a server gives at that concurrency, as DESIGN.md
measures its echo ("~4k QPS at 64 in flight").
``--model-echo`` adds the echo plus Score's one model call, ``--null-score`` this
tree's server with an empty Score (``loadtest/null_score.py``): with them Score's
extra CPU splits into the model call, the server around Score, and Score's body.
Needs a trained repository (``streamscore train --model-repository DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import uvloop

from loadtest.client_pool import (
    ClientPool,
    Row,
    echo_rpc,
    in_flight_unshared,
    realistic_events,
    score_requests,
)
from loadtest.procstat import format_steal
from loadtest.workdir import work_directory
from streamscore.argtypes import at_least_one, at_least_ones, positive, positives
from streamscore.client import wait_serving
from streamscore.loopback_process import find_free_port
from streamscore.processes import ChildProcess
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    name: str
    rpc: str
    target: str
    process: ChildProcess

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid


def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    median = format(statistics.median(values), fmt)
    return f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def summarize(rows: dict[tuple[str, float], list[Row]], *, closed: bool = False) -> str:
    """The table; ``closed``: the steps were closed-loop, keyed by calls in flight."""
    step = "in flight" if closed else "offered/s"
    lines = [
        f"| server | rpc | {step} | achieved/s | p50 ms | p99 ms | server CPU us/req "
        "| CPU steal % | errors+dropped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, rate), group in rows.items():
        cpu = [r.server_cpu_us for r in group if r.server_cpu_us is not None]
        steal = [r.steal_pct for r in group if r.steal_pct is not None]
        lines.append(
            f"| {name} | {group[0].rpc} | {rate:,.0f} "
            f"| {_median_range([r.achieved_rate for r in group], ',.0f')} "
            f"| {_median_range([r.p50_ms for r in group], '.2f')} "
            f"| {_median_range([r.p99_ms for r in group], '.2f')} "
            f"| {_median_range(cpu, '.0f')} "
            f"| {_median_range(steal, '.1f')} "
            f"| {sum(r.errors + r.dropped for r in group)} |"
        )
    return "\n".join(lines)


def build_extensions(checkout: Path) -> None:
    """Compile a checkout's C kernels in place, as ``pip install`` does for this tree.

    A fresh worktree has none (built files are not in git), and the base would quietly
    run its Python fallbacks (the window reads in Python, onnxruntime for every batch)
    and look slower than it is. Commits from before the kernels have no setup.py."""
    if not (checkout / "setup.py").is_file():
        return
    built = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise SystemExit(f"building the base's C kernels failed:\n{built.stdout}{built.stderr}")


def run(args: argparse.Namespace) -> int:
    """Check the base (and ``--head``) out into worktrees, compare, remove them."""
    checkouts = {"base": args.base, **({"head": args.head} if args.head else {})}
    worktrees: dict[str, Path] = {}
    with work_directory("ab") as work:
        try:
            for name, commit in checkouts.items():
                worktree = worktrees[name] = work / name
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), commit],
                    check=True,
                    capture_output=True,
                )
                build_extensions(worktree)
            head = (f"head {args.head}", worktrees["head"]) if args.head else ("this tree", REPO)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main(args, work, worktrees["base"], head))
        finally:
            for worktree in worktrees.values():
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                    check=False,
                    capture_output=True,
                )


async def main(args: argparse.Namespace, work: Path, worktree: Path, head: tuple[str, Path]) -> int:
    events = realistic_events(seconds=args.replica_seconds)
    pool = ClientPool(args.clients, score_requests(events)).start()
    servers: list[Server] = []
    try:
        async with EmbeddedBroker() as broker:
            from loadtest.servers import echo_process, load_features, serve_process

            await create_topics(broker.bootstrap, TopicLayout().partitions())
            await load_features(broker.bootstrap, events)
            echo_port = find_free_port()
            echo = echo_process(echo_port)
            baseline_rpc = echo_rpc(args.rpc)
            servers.append(Server("echo", baseline_rpc, f"127.0.0.1:{echo_port}", echo))
            if args.model_echo:
                port = find_free_port()
                model_echo = echo_process(
                    port,
                    name="model echo",
                    model_repository=args.model_repository,
                    model_version=args.model_version,
                )
                servers.append(Server("model echo", baseline_rpc, f"127.0.0.1:{port}", model_echo))
            env = {**os.environ, "STREAMSCORE_MODEL_VERSION": args.model_version}
            this_env = {**env, **dict(args.this_env)}
            head_name, head_checkout = head
            served = [
                (f"base {args.base}", worktree, env, "streamscore"),
                (head_name, head_checkout, this_env, "streamscore"),
            ]
            if args.null_score:
                served.append(("null Score", REPO, this_env, "loadtest.null_score"))
            for name, cwd, server_env, module in served:
                port = find_free_port()
                process = serve_process(
                    name,
                    broker.bootstrap,
                    port,
                    args.model_repository,
                    env=server_env,
                    log_path=str(work / f"{port}.log"),
                    cwd=str(cwd),  # `python -m` imports streamscore from the working dir
                    module=module,
                )
                servers.append(Server(name, args.rpc, f"127.0.0.1:{port}", process))
            for server in servers:
                await server.process.start()
            for server in servers:
                await wait_serving(server.target, timeout=120)
            rows: dict[tuple[str, float], list[Row]] = {}
            # Closed-loop steps, by calls in flight, or open-loop ones, by offered rate.
            closed = bool(args.in_flight)
            rates: list[float] = [float(n) for n in args.in_flight] if closed else args.rates
            for round_ in range(args.rounds):
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                if round_ % 2:
                    # Rotated alone, each server keeps the one it follows: "this tree"
                    # ran right after the base in most rounds, and an A/A of the same
                    # code measured it ~2.5 % dearer (BENCHMARKS.md, session 22).
                    order.reverse()
                for rate in rates:
                    for server in order:
                        row = await asyncio.to_thread(
                            pool.run,
                            server.target,
                            server.rpc,
                            rate,
                            args.seconds,
                            streams=args.streams,
                            server_pids=[server.pid],
                            closed_in_flight=int(rate) if closed else 0,
                        )
                        rows.setdefault((server.name, rate), []).append(row)
                        cpu = f"{row.server_cpu_us:.0f}" if row.server_cpu_us else "?"
                        step = f"{rate:>4,.0f} in flight" if closed else f"{rate:>7,.0f}/s"
                        print(
                            f"round {round_ + 1}/{args.rounds} {server.name:>16} {step}: "
                            f"{row.achieved_rate:,.0f}/s answered, "
                            f"p99 {row.p99_ms:.2f} ms, server CPU {cpu} us/req, "
                            f"steal {format_steal(row.steal_pct) or '?'}",
                            flush=True,
                        )
            ordered = {key: rows[key] for key in sorted(rows, key=lambda k: (k[1], k[0]))}
            print(f"\nmedians over {args.rounds} rounds (range), {args.clients} client processes:")
            print(summarize(ordered, closed=closed))
    finally:
        for server in reversed(servers):
            await server.process.stop()
        pool.close()
    return 0


def _env_item(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="commit to compare against (e.g. HEAD~1)")
    p.add_argument(
        "--head",
        help="commit to compare with the base, served from a worktree of its own "
        "(default: this working tree): re-measures an earlier change (--base C~1 --head C)",
    )
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model-version", default="1")
    p.add_argument("--rpc", choices=["score", "stream"], default="score")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--rates", type=positives, default=[500.0], help="offered rates, e.g. 300,600"
    )
    load.add_argument(
        "--in-flight",
        type=at_least_ones,
        default=[],
        help="closed-loop steps instead: calls (ScoreStream messages) kept in flight, all "
        "clients together, e.g. 64 (DESIGN.md's 'QPS at 64 in flight'); the throughput a "
        "server gives at that concurrency, its latencies from each actual send",
    )
    p.add_argument("--seconds", type=positive, default=6.0, help="per step (default 6)")
    p.add_argument("--rounds", type=at_least_one, default=5)
    p.add_argument("--clients", type=at_least_one, default=2, help="load processes (default 2)")
    p.add_argument("--streams", type=at_least_one, default=2, help="ScoreStreams per client")
    p.add_argument("--replica-seconds", type=positive, default=400.0)
    p.add_argument(
        "--model-echo",
        action="store_true",
        help="also measure the model echo (the echo plus Score's one model call)",
    )
    p.add_argument(
        "--null-score",
        action="store_true",
        help="also measure this tree's server with an empty Score (loadtest/null_score.py): "
        "the server's own cost beyond the echo's",
    )
    p.add_argument(
        "--this-env",
        action="append",
        default=[],
        type=_env_item,
        metavar="NAME=VALUE",
        help="environment for this tree's server only (repeatable): A/B a setting "
        "with --base HEAD, e.g. STREAMSCORE_KAFKA_FETCH_MAX_WAIT_MS=500",
    )
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    unshared = in_flight_unshared(args.in_flight, args.clients, args.streams, args.rpc)
    if unshared:
        p.error(f"--in-flight: {unshared} (--clients, --streams)")
    return args


if __name__ == "__main__":
    sys.exit(run(parse()))

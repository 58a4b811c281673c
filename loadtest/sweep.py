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
import asyncio
import json
import multiprocessing
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from loadtest.openloop import LoadResult, describe_error, open_loop, requests_in
from loadtest.procstat import cpu_jiffies, cpu_seconds, format_steal, steal_pct
from loadtest.streamload import open_loop_streams, request_ids, stream_opener
from loadtest.workdir import exit_on_sigterm
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.argtypes import at_least_one, positive, positives
from streamscore.tls import ClientTls, add_client_tls_arguments

SCORE = "/streamscore.v1.Scoring/Score"
RPCS = ("score", "stream", "echo", "echo-stream")
STREAM_RPCS = ("stream", "echo-stream")  # ScoreStream load (streamload.open_loop_streams)


def echo_rpc(rpc: str) -> str:
    """The echo servers' name for the same load as ``rpc`` (score or stream)."""
    return "echo-stream" if rpc in STREAM_RPCS else "echo"


# -- requests ----------------------------------------------------------------------------


def realistic_events(seconds: float = 400.0, rate: float = 50.0, seed: int = 5) -> list[dict]:
    """backend_bench's traffic (``streamscore.traffic``, seed 5, 50/s over 400 s: about
    20k payments over a skewed card, merchant, device and IP population), shifted so
    the last one happened a second ago."""
    from streamscore.traffic import TrafficConfig, generate_log

    log = [item.event for item in generate_log(TrafficConfig(rate_per_s=rate, seed=seed), seconds)]
    shift = time.time_ns() // 1_000_000 - log[-1]["event_time_ms"] - 1000
    return [{**e, "event_time_ms": e["event_time_ms"] + shift} for e in log]


def score_requests(events: Sequence[dict], prefix: str = "r") -> list[bytes]:
    """Serialized ScoreRequests, one per event, with distinct request ids."""
    from streamscore.client import transaction_from_event

    return [
        pb.ScoreRequest(
            request_id=f"{prefix}-{i}", transaction=transaction_from_event(e)
        ).SerializeToString()
        for i, e in enumerate(events)
    ]


PLAINTEXT = ClientTls()  # the load tools' default: a plaintext server


# -- client processes --------------------------------------------------------------------

# Warm-up streams opened before a server whose every one fails is not measured.
WARM_UP_TRIES = 3
# A warm-up stream's deadline: a server whose ScoreStream never answers its 20
# messages is named after this, not after the parent's 90 s wait for its clients.
WARM_UP_STREAM_S = 5.0


class _Client:
    """Inside a client process: channels per target, warm-up, one load step per job."""

    def __init__(
        self,
        requests: list[bytes],
        index: int,
        clients: int,
        connections: int = 1,
        tls: ClientTls = PLAINTEXT,
    ) -> None:
        self.requests = requests
        self.tls = tls
        self.ids = request_ids(requests)
        self.index = index
        self.clients = clients
        self.connections = connections
        self.channels: dict[str, list[grpc.aio.Channel]] = {}
        self.warm: set[tuple[str, str]] = set()

    def channel_set(self, target: str) -> list[grpc.aio.Channel]:
        """``connections`` channels to ``target``, each on its own TCP connection (a
        local subchannel pool), so that ``serve --workers N`` behind one port is spread
        over its processes (the kernel hashes each new connection to one of them)."""
        if target not in self.channels:
            options: list[tuple[str, int | str]] = []
            if self.connections > 1:
                options.append(("grpc.use_local_subchannel_pool", 1))
            if "," in target:  # several addresses (loadtest.scaling --spread client)
                options.append(("grpc.lb_policy_name", "round_robin"))
            self.channels[target] = [
                self.tls.aio_channel(target, options) for _ in range(self.connections)
            ]
        return self.channels[target]

    def channel(self, target: str) -> grpc.aio.Channel:
        return self.channel_set(target)[0]

    def unaries(self, target: str) -> list[grpc.aio.UnaryUnaryMultiCallable]:
        """Score on each of ``target``'s connections (raw bytes both ways)."""
        return [
            channel.unary_unary(SCORE, request_serializer=None, response_deserializer=None)
            for channel in self.channel_set(target)
        ]

    async def prepare(self, target: str, rpc: str) -> str:
        """Connect and warm up (untimed); '' or why it failed."""
        if (target, rpc) in self.warm:
            return ""
        channel = self.channel(target)
        unaries = self.unaries(target)
        unary = unaries[0]
        start = time.monotonic()
        for each in unaries:
            # The echo server has no health service: call until each connection answers.
            while True:
                try:
                    await each(self.requests[0], timeout=1)
                    break
                except grpc.aio.AioRpcError as error:
                    # Waited out for a server still starting; a TLS failure is the
                    # same at every try (a wrong CA, name or client key): said now.
                    waited = time.monotonic() - start
                    if waited > 30 or _tls_failure(error):
                        return (
                            f"{target} did not answer Score: {error.code().name} {error.details()}"
                        )
                    if self.tls.enabled and waited > 3 and _closed_on_us(error):
                        # A server still starting refuses the connection; one that takes
                        # it and closes it over TLS refuses this client's certificate.
                        return (
                            f"{target} closed every TLS connection: does it require a "
                            f"client certificate (--tls-cert, --tls-key) it accepts? "
                            f"{error.code().name} {error.details()}"
                        )
                    await asyncio.sleep(0.1)
        # A failed warm-up call is no reason not to measure: a server that refuses some
        # calls (RESOURCE_EXHAUSTED) is what the step's error count is for. Only a
        # server that fails every one is not measured.
        failure: grpc.aio.AioRpcError | None = None
        for _ in range(WARM_UP_TRIES if rpc in STREAM_RPCS else 1):
            if rpc in STREAM_RPCS:
                try:
                    call = stream_opener(channel, timeout=WARM_UP_STREAM_S)()
                    for request in self.requests[:20]:
                        await call.write(request)
                        await call.read()
                    await call.done_writing()
                    await call.read()  # EOF: the stream ended cleanly
                    failure = None
                    break
                except grpc.aio.AioRpcError as error:
                    failure = error
            else:
                answered = 0
                for request in self.requests[:20]:
                    try:
                        await unary(request, timeout=1)
                        answered += 1
                    except grpc.aio.AioRpcError as error:
                        failure = error
                if answered:
                    failure = None
        if failure is not None:
            return f"warm-up {rpc} on {target}: {failure.code().name} {failure.details()}"
        self.warm.add((target, rpc))
        return ""

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        rate = job["rate"] / self.clients
        channel = self.channel(job["target"])
        offset = self.index * len(self.requests) // self.clients
        # Evenly spaced merged arrivals: client k starts k / total_rate later.
        start_at = job["start_at"] + self.index / job["rate"]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu_before = time.process_time()
        first_error = ""
        total = requests_in(job["rate"], job["seconds"], self.clients, self.index)
        if job["rpc"] in STREAM_RPCS:
            result, first_error = await open_loop_streams(
                stream_opener(channel),
                self.requests,
                rate,
                job["seconds"],
                streams=job["streams"],
                offset=offset,
                max_in_flight=max(1, job["max_in_flight"] // job["streams"]),
                drain_timeout=job["drain_timeout"],
                ids=self.ids,
                total=total,
            )
        else:
            unaries = self.unaries(job["target"])
            requests, n, timeout = self.requests, len(self.requests), job["timeout_s"]
            k = len(unaries)

            async def call(i: int) -> object:
                nonlocal first_error
                try:
                    return await unaries[i % k](requests[(offset + i) % n], timeout=timeout)
                except Exception as error:
                    if not first_error:
                        first_error = describe_error(error)
                    raise

            result = await open_loop(
                call,
                rate,
                job["seconds"],
                max_in_flight=job["max_in_flight"],
                total=total,
                drain_timeout=job["drain_timeout"],
            )
            if result.unanswered and not first_error:
                first_error = (
                    f"{result.unanswered} calls unanswered {job['drain_timeout']:g} s "
                    "after the last send"
                )
        cpu = time.process_time() - cpu_before
        return {
            "ok": result.ok,
            "errors": result.errors,
            "dropped": result.dropped,
            "seconds": result.seconds,
            "histogram": result.histogram.encode(),
            "cpu": cpu / result.seconds if result.seconds else 0.0,
            "first_error": first_error,
        }

    async def serve(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    job = await loop.run_in_executor(None, conn.recv)
                except EOFError:  # the parent is gone
                    return
                if job is None:
                    return
                try:
                    if job["kind"] == "prepare":
                        reply: dict[str, Any] = {
                            "error": await self.prepare(job["target"], job["rpc"])
                        }
                    else:
                        reply = await self.run(job)
                except Exception as error:  # reported to the parent, never a hang
                    reply = {"error": f"{type(error).__name__}: {error}"}
                conn.send(reply)
        finally:
            for channels in self.channels.values():
                for channel in channels:
                    await channel.close()


def _client_main(
    conn: Connection,
    requests: list[bytes],
    index: int,
    clients: int,
    connections: int,
    tls: ClientTls,
) -> None:
    import signal

    import uvloop

    # A Ctrl-C at the terminal reaches every process of the group: the parent stops
    # the clients, which would otherwise each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_Client(requests, index, clients, connections, tls).serve(conn))


# -- results -----------------------------------------------------------------------------


@dataclass
class Row:
    """One load step: every client's result merged."""

    target: str
    rpc: str
    offered_rate: float
    achieved_rate: float
    ok: int
    errors: int
    dropped: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    server_cpu_us: float | None
    client_cpu: float  # the busiest client's CPU, as a fraction of one core
    clients: int
    first_error: str = ""
    # Of the machine's CPU time during the step, the share the host gave to other
    # guests (/proc/stat steal): a noisy neighbour, which no process here can see in
    # its own numbers. None where unknown.
    steal_pct: float | None = None
    passed: bool | None = None
    phase: str = "step"
    histogram: str = field(default="", repr=False)  # HdrHistogram.encode(), microseconds

    @classmethod
    def of(
        cls,
        target: str,
        rpc: str,
        result: LoadResult,
        server_cpu_us: float | None,
        client_cpu: float,
        clients: int,
        first_error: str = "",
        steal_pct: float | None = None,
    ) -> Row:
        return cls(
            target=target,
            rpc=rpc,
            offered_rate=result.offered_rate,
            achieved_rate=result.achieved_rate,
            ok=result.ok,
            errors=result.errors,
            dropped=result.dropped,
            seconds=result.seconds,
            p50_ms=result.ms(50),
            p90_ms=result.ms(90),
            p99_ms=result.ms(99),
            p999_ms=result.ms(99.9),
            max_ms=result.ms(100),
            server_cpu_us=server_cpu_us,
            client_cpu=client_cpu,
            clients=clients,
            first_error=first_error,
            steal_pct=steal_pct,
            histogram=result.histogram.encode().decode("ascii"),
        )

    def meets(self, budget_p99_ms: float) -> bool:
        return self.ok > 0 and self.p99_ms <= budget_p99_ms and not self.errors and not self.dropped

    def hdr(self) -> HdrHistogram:
        return HdrHistogram.decode(self.histogram.encode("ascii"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def merge(results: Sequence[dict[str, Any]], offered: float, seconds: float) -> LoadResult:
    """One result from the clients' results: counts summed, histograms added; the
    duration is the step's (or the slowest client's, when draining took longer), so
    the achieved rate never exceeds the offered one by rounding."""
    histogram = HdrHistogram(1, 60_000_000, 3)
    for result in results:
        histogram.add(HdrHistogram.decode(result["histogram"]))
    return LoadResult(
        offered,
        max(seconds, *(r["seconds"] for r in results)),
        sum(r["ok"] for r in results),
        sum(r["errors"] for r in results),
        sum(r["dropped"] for r in results),
        histogram,
    )


class ClientPool:
    """``clients`` load-generator processes (spawned once) driven step by step; each
    spreads its unary calls over ``connections`` TCP connections per target, over TLS
    when ``tls`` says so (a server load-tested as deployed)."""

    def __init__(
        self,
        clients: int,
        requests: list[bytes],
        connections: int = 1,
        tls: ClientTls = PLAINTEXT,
    ) -> None:
        if clients < 1:
            raise ValueError("clients must be >= 1")
        if connections < 1:
            raise ValueError("connections must be >= 1")
        if len(requests) < 2:
            raise ValueError("need at least two requests")
        self.clients = clients
        self.connections = connections
        self.requests = requests
        self.tls = tls
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []

    def start(self) -> ClientPool:
        context = multiprocessing.get_context("spawn")
        for index in range(self.clients):
            parent, child = context.Pipe()
            process = context.Process(
                target=_client_main,
                args=(child, self.requests, index, self.clients, self.connections, self.tls),
                name=f"loadtest-client-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
        return self

    def close(self, *, at_once: bool = False) -> None:
        """Stop the clients: each after its step, or ``at_once`` (an interrupted run)."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=0 if at_once else 10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def __enter__(self) -> ClientPool:
        return self.start()

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(at_once=exc_type is not None)

    def _all(self, jobs: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        for conn, job in zip(self.conns, jobs, strict=True):
            conn.send(job)
        replies = []
        deadline = time.monotonic() + timeout
        for index, conn in enumerate(self.conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load client {index} did not answer within {timeout:.0f} s")
            replies.append(conn.recv())
        return replies

    def run(
        self,
        target: str,
        rpc: str,
        rate: float,
        seconds: float,
        *,
        streams: int = 1,
        timeout_s: float = 1.0,
        max_in_flight: int = 512,
        drain_timeout: float = 10.0,
        server_pids: Sequence[int] = (),
    ) -> Row:
        """One open-loop step at ``rate`` (all clients together) for ``seconds``; the
        server CPU per request is summed over ``server_pids``."""
        if rpc not in RPCS:
            raise ValueError(f"rpc must be one of {RPCS}")
        prepare = {"kind": "prepare", "target": target, "rpc": rpc}
        for reply in self._all([prepare] * self.clients, timeout=90):
            if reply["error"]:
                raise RuntimeError(reply["error"])
        if rpc not in STREAM_RPCS:
            # A unary call ends at its deadline: waiting less for it cut off calls that
            # were still going to answer, or fail, within it.
            drain_timeout = max(drain_timeout, timeout_s + 1.0)
        cpu_before = sum(cpu_seconds(pid) for pid in server_pids)
        jiffies_before = cpu_jiffies()
        job = {
            "kind": "run",
            "target": target,
            "rpc": rpc,
            "rate": rate,
            "seconds": seconds,
            "streams": streams,
            "timeout_s": timeout_s,
            "max_in_flight": max(1, max_in_flight // self.clients),
            "drain_timeout": drain_timeout,
            "start_at": time.time() + 0.05 + 0.01 * self.clients,
        }
        replies = self._all([job] * self.clients, timeout=seconds + drain_timeout + 90)
        for reply in replies:
            if "error" in reply:
                raise RuntimeError(reply["error"])
        result = merge(replies, rate, seconds)
        stolen = steal_pct(jiffies_before, cpu_jiffies())
        server_cpu_us = None
        if server_pids:
            cpu = sum(cpu_seconds(pid) for pid in server_pids) - cpu_before
            server_cpu_us = cpu / max(result.ok, 1) * 1e6
        first_error = next((r["first_error"] for r in replies if r["first_error"]), "")
        return Row.of(
            target,
            rpc,
            result,
            server_cpu_us,
            max(r["cpu"] for r in replies),
            self.clients,
            first_error,
            stolen,
        )


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


def _closed_on_us(error: grpc.aio.AioRpcError) -> bool:
    """The server took the connection and closed it (gRPC's "Socket closed"), as a
    mutual-TLS server does with a client certificate it does not accept."""
    return "socket closed" in (error.details() or "").lower()


def _tls_failure(error: grpc.aio.AioRpcError) -> bool:
    """A call that failed on TLS (handshake, certificate, a client key that does not
    match its certificate): no retry mends it."""
    details = (error.details() or "").lower()
    marks = ("handshake", "ssl", "certificate", "peer name", "verification")
    return any(mark in details for mark in marks)

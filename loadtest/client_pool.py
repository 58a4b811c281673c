"""Load-generator client processes, driven step by step (``ClientPool``), and what one
step measures (``Row``). Each client process runs the open-loop generator
(``openloop.open_loop``; ``streamload.open_loop_streams`` for ``ScoreStream``) at its
share of the step's rate, its schedule shifted so that the merged arrivals stay
evenly spaced; their HdrHistograms are merged. The sweep, the report, the A/B and
the scaling runs all drive their load through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
from hdrh.histogram import HdrHistogram

from loadtest.openloop import LoadResult, closed_loop, describe_error, open_loop, requests_in
from loadtest.procstat import cpu_jiffies, cpu_seconds, steal_pct
from loadtest.streamload import (
    closed_loop_streams,
    open_loop_streams,
    request_ids,
    stream_opener,
)
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.tls import ClientTls

SCORE = "/streamscore.v1.Scoring/Score"
RPCS = ("score", "stream", "echo", "echo-stream")
STREAM_RPCS = ("stream", "echo-stream")  # ScoreStream load (streamload.open_loop_streams)


def in_flight_unshared(in_flight: Iterable[int], clients: int, streams: int, rpc: str) -> str:
    """'' when each closed-loop count of calls in flight shares evenly among the
    clients (and, for ScoreStream, each client's streams); else why not."""
    sharing = clients * (streams if rpc in STREAM_RPCS else 1)
    if any(n % sharing for n in in_flight):
        return (
            f"calls in flight are shared evenly: a multiple of {sharing} "
            "(clients, x streams each for ScoreStream)"
        )
    return ""


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
        start_at = job["start_at"] + (self.index / job["rate"] if job["rate"] else 0.0)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu_before = time.process_time()
        first_error = ""
        total = requests_in(job["rate"], job["seconds"], self.clients, self.index)
        if job["rpc"] in STREAM_RPCS and job["closed_in_flight"]:
            # This client's share of the messages in flight, over its streams.
            result, first_error = await closed_loop_streams(
                stream_opener(channel),
                self.requests,
                job["seconds"],
                streams=job["streams"],
                in_flight=job["closed_in_flight"] // self.clients // job["streams"],
                offset=offset,
                ids=self.ids,
                drain_timeout=job["drain_timeout"],
            )
        elif job["rpc"] in STREAM_RPCS:
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

            if job["closed_in_flight"]:
                # (``call`` adds this client's offset to the index it is given.)
                result = await closed_loop(
                    call, job["closed_in_flight"] // self.clients, job["seconds"]
                )
            else:
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


@contextlib.contextmanager
def _children_deaf_to_ctrl_c() -> Iterator[None]:
    """SIGINT ignored while the clients are spawned, so that each starts with it
    ignored (an ignored signal stays ignored across exec, and Python then installs
    no KeyboardInterrupt handler): a Ctrl-C at the terminal reaches every process of
    the group, and a client still importing printed a KeyboardInterrupt traceback
    before ``_client_main`` could ignore it. The parent stops the clients itself."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (signal handlers can be set only there; _client_main still ignores it)
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _client_main(
    conn: Connection,
    requests: list[bytes],
    index: int,
    clients: int,
    connections: int,
    tls: ClientTls,
) -> None:
    import uvloop

    # A Ctrl-C at the terminal reaches every process of the group: the parent stops
    # the clients, which would otherwise each print a KeyboardInterrupt traceback
    # (ignored from the start when spawned from the main thread: ClientPool.start).
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
        with _children_deaf_to_ctrl_c():
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
        closed_in_flight: int = 0,
    ) -> Row:
        """One open-loop step at ``rate`` (all clients together) for ``seconds``; the
        server CPU per request is summed over ``server_pids``. With
        ``closed_in_flight``, a closed-loop step instead: that many calls (or stream
        messages) kept going, all clients together, ``rate`` unused
        (``openloop.closed_loop``, ``streamload.closed_loop_streams``)."""
        if rpc not in RPCS:
            raise ValueError(f"rpc must be one of {RPCS}")
        unshared = in_flight_unshared([closed_in_flight], self.clients, streams, rpc)
        if unshared:
            raise ValueError(f"a closed-loop step's {unshared}")
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
            "closed_in_flight": closed_in_flight,
        }
        replies = self._all([job] * self.clients, timeout=seconds + drain_timeout + 90)
        for reply in replies:
            if "error" in reply:
                raise RuntimeError(reply["error"])
        result = merge(replies, 0.0 if closed_in_flight else rate, seconds)
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

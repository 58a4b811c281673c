"""``streamscore demo``: the whole system on one machine, scoring live synthetic traffic.

Starts (in order) the embedded broker unless ``--kafka`` is given, the demo model
(trained on first use), a stream worker process and a server process; then replays
synthetic payments in real time: each transaction is scored over gRPC as a payment
service would, then its event is published to Kafka for the stream to fold in. A
summary line every few seconds; stops after ``--duration`` or on Ctrl-C, stopping
everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import orjson
from aiokafka import AIOKafkaProducer
from hdrh.histogram import HdrHistogram

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import transaction_from_event, wait_serving
from streamscore.config import ENV_PREFIX, Settings, settings_environment, topic_layout
from streamscore.loopback_process import find_free_port
from streamscore.processes import ChildExited, ChildProcess, stop_on_signals
from streamscore.stream import kafka_compat, kafka_security
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import PAYMENTS
from streamscore.tasks import cancel_and_wait
from streamscore.traffic import LabelledEvent, TrafficConfig, TrafficGenerator

log = logging.getLogger("streamscore.demo")

MAX_IN_FLIGHT = 64
# How long the demo's server may take to answer SERVING (training is before it).
STARTUP_TIMEOUT_S = 120
# One in this many events is sent malformed, to show the dead-letter path.
MALFORMED_EVERY = 500


@dataclass
class DemoStats:
    started: float = field(default_factory=time.monotonic)
    scored: int = 0
    failed: int = 0
    published: int = 0
    malformed_sent: int = 0
    delivered: int = 0  # events the broker acknowledged (of ``published``)
    decisions: Counter[str] = field(default_factory=Counter)
    fraud_flagged: int = 0
    fraud_seen: int = 0
    degraded: int = 0
    window: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    total: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    server: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    window_start: float = field(default_factory=time.monotonic)
    window_scored: int = 0

    @property
    def undelivered(self) -> int:
        """Events sent to the broker and not (yet) acknowledged: a few in flight; more,
        and growing, when the broker has gone away."""
        return self.published - self.delivered

    def restart_clock(self) -> None:
        self.started = self.window_start = time.monotonic()

    def record(self, latency_us: int, response: pb.ScoreResponse, item: LabelledEvent) -> None:
        self.server.record_value(max(response.timings.total_us, 1))
        self.scored += 1
        self.window_scored += 1
        self.window.record_value(max(latency_us, 1))
        self.total.record_value(max(latency_us, 1))
        decision = pb.Decision.Name(response.decision)
        self.decisions[decision] += 1
        if response.degraded:
            self.degraded += 1
        if item.is_fraud:
            self.fraud_seen += 1
            self.fraud_flagged += decision != "APPROVE"

    def summary_line(self) -> str:
        now = time.monotonic()
        rate = self.window_scored / max(now - self.window_start, 1e-9)
        p50 = self.window.get_value_at_percentile(50) / 1000
        p99 = self.window.get_value_at_percentile(99) / 1000
        server_p99 = self.server.get_value_at_percentile(99) / 1000
        self.window.reset()
        self.server.reset()
        self.window_scored = 0
        self.window_start = now
        decisions = " ".join(f"{k.lower()}={v}" for k, v in sorted(self.decisions.items()))
        return (
            f"[{now - self.started:6.1f}s] {rate:6.1f} scores/s  p50 {p50:6.2f} ms  "
            f"p99 {p99:6.2f} ms (server {server_p99:5.2f}) | scored {self.scored} "
            f"failed {self.failed} "
            f"degraded {self.degraded} | {decisions} | fraud flagged "
            f"{self.fraud_flagged}/{self.fraud_seen} | malformed sent {self.malformed_sent}"
            + (f" | not delivered {self.undelivered}" if self.undelivered else "")
        )


def demo_traffic(rate_per_s: float) -> TrafficConfig:
    """Populations scaled with the rate, so per-card and per-merchant activity (and so
    the feature distributions) match what the demo model was trained on (10/s over
    5,000 cards and 500 merchants)."""
    scale = max(rate_per_s / 10.0, 1.0)
    return TrafficConfig(
        rate_per_s=rate_per_s, n_cards=int(5000 * scale), n_merchants=int(500 * scale)
    )


async def ensure_model(settings: Settings) -> None:
    """Train the demo model on first use (a few seconds) so a fresh machine just works."""
    from streamscore.training import train

    model_dir = settings.model_repository / settings.model_name
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.exists() else []
    if versions:
        latest = max(versions, key=lambda p: int(p.name))
        if not (latest / "model.onnx").is_file():
            # Written by an older streamscore (TorchScript only): it serves, but a missed
            # deadline cannot fall back in process. Kept: it may be the user's own model.
            print(
                f"note: {latest} has no model.onnx, so no in-process fallback; for the "
                f"current demo model: streamscore train --model-repository "
                f"{settings.model_repository} --version {int(latest.name) + 1}",
                flush=True,
            )
        return
    print(f"training the demo model into {settings.model_repository} ...", flush=True)
    report = await asyncio.to_thread(train, settings.model_repository)
    print(
        f"trained {report.path}: {report.rows} rows, ROC-AUC {report.roc_auc:.3f}, "
        f"PR-AUC {report.pr_auc:.3f} on the held-out slice ({report.seconds:.1f} s)",
        flush=True,
    )


async def _score_and_publish(
    stub: pb_grpc.ScoringStub,
    producer: AIOKafkaProducer,
    item: LabelledEvent,
    intended: float,
    stats: DemoStats,
    slots: asyncio.Semaphore,
) -> None:
    try:
        request = pb.ScoreRequest(
            request_id=item.event["event_id"], transaction=transaction_from_event(item.event)
        )
        try:
            response = await stub.Score(request, timeout=2.0)
            # Latency from the intended send time: a slow server cannot hide its queueing.
            stats.record(int((time.perf_counter() - intended) * 1e6), response, item)
        except grpc.aio.AioRpcError as error:
            stats.failed += 1
            log.warning(
                "score failed", extra={"code": str(error.code()), "details": error.details()}
            )
        payload = orjson.dumps(item.event)
        if stats.published % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            payload = payload[: len(payload) // 2]  # truncated JSON: a dead letter
            stats.malformed_sent += 1
        delivery = await producer.send(PAYMENTS, payload, key=item.event["card_id"].encode())
        delivery.add_done_callback(lambda sent: _count_delivered(sent, stats))
        stats.published += 1
    finally:
        slots.release()


def _count_delivered(delivery: asyncio.Future[object], stats: DemoStats) -> None:
    """A delivery the broker acknowledged is counted; a failed one has its error taken
    (not left for asyncio to report as never retrieved)."""
    if not delivery.cancelled() and delivery.exception() is None:
        stats.delivered += 1


async def _free_slot(slots: asyncio.Semaphore, stop: asyncio.Event, until: float | None) -> bool:
    """A slot for one more request (True); False once ``stop`` is set or the demo's time
    (``until``, on perf_counter) is up. With every slot held by calls that hang (the
    broker gone), waiting on the semaphore alone ignored both."""
    while not stop.is_set() and (until is None or time.perf_counter() < until):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slots.acquire(), 0.25)
            return True
    return False


async def drive_traffic(
    target: str,
    bootstrap: str,
    config: TrafficConfig,
    stop: asyncio.Event,
    duration_s: float | None,
    summary_every_s: float = 2.0,
) -> DemoStats:
    stats = DemoStats()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=5,
        **kafka_compat.PRODUCER_KWARGS,
        **kafka_security.client_kwargs(),
    )
    await producer.start()
    tasks: set[asyncio.Task[None]] = set()
    # Building a large card population takes seconds: do it before the clock starts,
    # or the first events would all be "late" and measured as queueing.
    generator = await asyncio.to_thread(TrafficGenerator, config)
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.ScoringStub(channel)
            start_ms = time.time_ns() // 1_000_000 + 500
            events = generator.stream(start_ms)
            first = await asyncio.to_thread(next, events)
            start = time.perf_counter() + (start_ms - time.time_ns() // 1_000_000) / 1000
            next_summary = start + summary_every_s
            until = None if duration_s is None else start + duration_s  # perf_counter
            stats.restart_clock()
            for item in itertools.chain([first], events):
                intended = start + (item.event["event_time_ms"] - start_ms) / 1000
                now = time.perf_counter()
                if now >= next_summary:
                    print(stats.summary_line(), flush=True)
                    next_summary += summary_every_s
                if duration_s is not None and intended - start > duration_s:
                    break
                if intended > now:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), intended - now)
                if stop.is_set():
                    break
                if not await _free_slot(slots, stop, until):
                    break
                task = asyncio.create_task(
                    _score_and_publish(stub, producer, item, intended, stats, slots)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=5)
    finally:
        # Calls still hanging after that (a broker gone) are given up, and their
        # errors taken: none is left for asyncio to report as never retrieved.
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Bounded: with the broker gone it waits out aiokafka's delivery timeout (40 s)
        # for what it still holds, which will not be delivered.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(producer.stop(), 5)
        await asyncio.sleep(0)  # the last deliveries' callbacks (``_count_delivered``) run
    return stats


async def _serving(target: str, stop: asyncio.Event) -> bool:
    """Wait until the server at ``target`` is SERVING (True) or ``stop`` is set (False:
    Ctrl-C, or a part that exited)."""
    serving = asyncio.ensure_future(wait_serving(target, timeout=STARTUP_TIMEOUT_S))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((serving, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in (serving, stopped):
            wait.cancel()
        await asyncio.gather(serving, stopped, return_exceptions=True)
    if stop.is_set():
        return False
    serving.result()  # a TimeoutError: the server never became SERVING
    return True


async def _stop_when_one_exits(children: tuple[ChildProcess, ...], stop: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(child.exited.wait()) for child in children]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
    finally:
        for wait in waits:
            wait.cancel()


async def _stop_when_broker_exits(broker: EmbeddedBroker, stop: asyncio.Event) -> None:
    # A Popen, not an asyncio child: no event to wait on, so polled (twice a second).
    while broker.running:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    stop.set()


def _check_broker(broker: EmbeddedBroker | None, when: str) -> None:
    """The embedded broker gone ends the demo, naming it (not the worker that then
    timed out on it)."""
    if broker is not None and not broker.running:
        # Its log goes with it when the demo stops: its last line is quoted here.
        last = _last_line(str(broker.log_path) if broker.log_path else None)
        raise ChildExited(
            f"the demo's embedded broker (tansu) exited {when} (code {broker.returncode}); "
            f"its last line: {last}"
        )


def _check_running(children: tuple[ChildProcess, ...], when: str) -> None:
    """A part that exited ends the demo, with the last line of its log."""
    for child in children:
        if child.exited.is_set():
            raise _exited(child, when)


def _exited(child: ChildProcess, when: str) -> ChildExited:
    return ChildExited(
        f"the demo's {child.name} exited {when} (code {child.returncode}): "
        f"{_last_line(child.log_path)} (its log: {child.log_path})"
    )


def _check_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(error.errno, f"the demo's port {host}:{port}: {error.strerror}") from None


def _last_line(path: str | None) -> str:
    lines = Path(path).read_text(errors="replace").strip().splitlines() if path else []
    return lines[-1][-300:] if lines else "(its log is empty)"


def _check_plaintext(settings: Settings) -> None:
    """The demo's own clients (its wait for SERVING, its traffic) speak plaintext, as
    its embedded broker does: with TLS settings its server would refuse them (it
    waited 120 s, then failed without a word about TLS), and Kafka security settings
    failed after 10 s ("Unable to bootstrap"). Refused at once instead, naming them."""
    if not settings.kafka and settings.kafka_security_protocol != "plaintext":
        raise ValueError(
            "the demo's embedded broker is plaintext: kafka_security_protocol "
            f"{settings.kafka_security_protocol} applies to a cluster given with --kafka"
        )
    names = ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    tls = [name for name in names if getattr(settings, name)]
    if tls:
        variables = ", ".join(ENV_PREFIX + name.upper() for name in tls)
        raise ValueError(
            f"the demo serves and scores in plaintext: unset {', '.join(tls)} ({variables}) "
            "to run it"
        )


async def run_demo(
    settings: Settings,
    *,
    duration_s: float | None,
    rate_per_s: float,
    log_dir: Path | None = None,
) -> int:
    """The demo; its parts' logs in ``log_dir`` (an existing directory), kept, or in
    a temporary directory that a clean stop removes (every run left one behind) and
    anything else keeps, for the error that names a part's log."""
    _check_plaintext(settings)
    if log_dir is not None:
        return await _run_demo(settings, log_dir, duration_s, rate_per_s, keep_logs=True)
    logdir = Path(tempfile.mkdtemp(prefix="streamscore-demo-"))
    code = 1  # (an exception: the stop line that follows says why)
    try:
        code = await _run_demo(settings, logdir, duration_s, rate_per_s, keep_logs=False)
    finally:
        _remove_unless_needed(logdir, code)
    return code


def _remove_unless_needed(logdir: Path, code: int) -> None:
    """The demo's temporary log directory: kept, and said, when it failed with a log
    to read; a demo that failed before any part wrote one (its port taken, no broker)
    left an empty directory, never named."""
    if code == 0 or not any(logdir.iterdir()):
        shutil.rmtree(logdir, ignore_errors=True)
    else:
        print(f"logs kept in {logdir}", flush=True)


async def _run_demo(
    settings: Settings,
    logdir: Path,
    duration_s: float | None,
    rate_per_s: float,
    *,
    keep_logs: bool,
) -> int:
    stop = stop_on_signals()
    async with contextlib.AsyncExitStack() as stack:
        bootstrap = settings.kafka
        broker: EmbeddedBroker | None = None
        if not bootstrap:
            broker = EmbeddedBroker()
            await broker.start()
            stack.push_async_callback(broker.stop)
            bootstrap = broker.bootstrap
            print(f"embedded broker (tansu) on {bootstrap}", flush=True)
            # A part like the worker and the server: its exit ends the demo.
            broker_watch = asyncio.create_task(_stop_when_broker_exits(broker, stop))
            stack.push_async_callback(cancel_and_wait, broker_watch)
        await create_topics(bootstrap, topic_layout(settings).partitions())
        await ensure_model(settings)
        # The children get this command's settings (file, environment, flags), each
        # process its own metrics port; a port of 0 is picked here, to be reached.
        port = settings.port or find_free_port()
        # Taken already (another server): the demo's own would fail to bind, and its
        # health check would be answered by the other one, which would be scored.
        _check_free(settings.host, port)
        metrics = settings.metrics_port
        env = settings_environment(settings, kafka=bootstrap, port=port, metrics_port=metrics)
        worker = ChildProcess.streamscore(
            "worker",
            "worker",
            env={**env, "STREAMSCORE_METRICS_PORT": str(metrics + 1 if metrics else 0)},
            log_path=str(logdir / "worker.log"),
        )
        server = ChildProcess.streamscore(
            "server", "serve", env=env, log_path=str(logdir / "server.log")
        )
        children = (worker, server)
        for child in children:
            await child.start()
            stack.push_async_callback(child.stop)
        # A part that exits ends the demo (starting or running), with its cause.
        watcher = asyncio.create_task(_stop_when_one_exits(children, stop))
        stack.push_async_callback(cancel_and_wait, watcher)
        target = f"{settings.host}:{port}"
        serving = await _serving(target, stop)
        _check_broker(broker, "at start")
        _check_running(children, "at start")
        if not serving:
            return 130  # stopped (Ctrl-C) while starting
        kept = "" if keep_logs else " (removed after a clean stop; --log-dir keeps them)"
        print(f"server on {target}, worker running; logs in {logdir}{kept}", flush=True)
        if metrics:
            print(f"metrics on ports {metrics} (server) and {metrics + 1} (worker)", flush=True)
        stats = await drive_traffic(target, bootstrap, demo_traffic(rate_per_s), stop, duration_s)
        _check_broker(broker, "while running")
        _check_running(children, "while running")
        print(stats.summary_line(), flush=True)
        total = stats.total
        print(
            f"done: {stats.scored} scored, {stats.failed} failed; Score latency p50 "
            f"{total.get_value_at_percentile(50) / 1000:.2f} ms, p99 "
            f"{total.get_value_at_percentile(99) / 1000:.2f} ms, p99.9 "
            f"{total.get_value_at_percentile(99.9) / 1000:.2f} ms",
            flush=True,
        )
        if stats.undelivered:
            # A broker of the user's (--kafka) gone: nothing here watches it.
            print(
                f"{stats.undelivered} of {stats.published} payment events were not "
                f"delivered to Kafka at {bootstrap}: did it go away?",
                flush=True,
            )
            return 1
    print("stopped cleanly", flush=True)
    return 0

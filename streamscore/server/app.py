"""The serving process: feature replica, model and gRPC server, started and stopped in order."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from streamscore._proto.v1 import admin_pb2 as apb
from streamscore._proto.v1 import admin_pb2_grpc as apb_grpc
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.config import Settings, topic_layout
from streamscore.logs import hash_key_shared, set_hash_key
from streamscore.metrics_http import start_metrics_http
from streamscore.server.admin import AdminService
from streamscore.server.collector import ServerCollector
from streamscore.server.decisions import DECISIONS_TOPIC, DecisionLog
from streamscore.server.drain import DrainCut
from streamscore.server.gc_policy import LongLivedFreezer
from streamscore.server.guarded import add_guarded
from streamscore.server.health import HealthServicer
from streamscore.server.loop_lag import LoopLagMonitor
from streamscore.server.reflection import add_reflection
from streamscore.server.repository import ModelRegistry
from streamscore.server.rollout import RolloutManager, RolloutState
from streamscore.server.rollout_stats import RollbackPolicy
from streamscore.server.rollout_store import FILE_NAME, RolloutFile
from streamscore.server.scoring import ScoringService, add_scoring_service
from streamscore.server.served_model import BatchingSettings
from streamscore.server.tracing import ScoreTracer
from streamscore.stream.broker import create_topics
from streamscore.stream.replica import FeatureReplica
from streamscore.stream.state import FeatureStore
from streamscore.tasks import cancel_and_wait, start_background
from streamscore.tls import server_credentials

log = logging.getLogger("streamscore.server")

# How long the features may take to catch up with the log before the start fails.
CATCH_UP_TIMEOUT_S = 600.0
SCORING_SERVICE = pb.DESCRIPTOR.services_by_name["Scoring"].full_name
ADMIN_SERVICE = apb.DESCRIPTOR.services_by_name["Admin"].full_name


class ScoringServer:
    """The serving process's parts, started in this order: the loop-lag probe, the
    models, the feature replica (built), the rollout, the decision log, gRPC
    (listening, NOT_SERVING), the metrics endpoint, then the replica's catch-up, and
    SERVING once it caught up (on a shared port, ``reuse_port``, the replica catches
    up before gRPC listens). A start that fails stops what it had started.

    Stopped in reverse, but for two parts: gRPC goes first and the metrics endpoint
    after it (a scrape during the grace period sees the calls in flight drain), and
    the decision log right after gRPC (every answered call is in it).

    ``gc_freezer``: the process's GC policy, when it has one (``streamscore serve``);
    the state the replica folded while catching up is then frozen just before
    SERVING, rather than in a pause of the first freeze while serving."""

    def __init__(self, settings: Settings, *, gc_freezer: LongLivedFreezer | None = None) -> None:
        self.settings = settings
        self.gc_freezer = gc_freezer
        self.store = FeatureStore(
            fold_horizon_ms=settings.fold_horizon_ms, skew_ms=settings.skew_ms
        )
        self.replica: FeatureReplica | None = None
        self.health = HealthServicer()
        self.port = 0
        self.own_port = 0
        self._server: grpc.aio.Server | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self.rollouts: RolloutManager | None = None
        self.decisions: DecisionLog | None = None
        self._metrics_http: WSGIServer | None = None
        self._collector: ServerCollector | None = None
        self.service: ScoringService | None = None
        # Open calls that only their callers end (health Watch, reflection): a drain
        # ends them, rather than wait its whole grace period for them.
        self._callers_streams = DrainCut()
        self.loop_lag = LoopLagMonitor(settings.loop_lag_interval_s)
        # Set when a part it cannot serve without has died (the feature replica);
        # ``failure`` says which and why. `serve` then drains and exits 1, to be
        # restarted, rather than stay up SERVING features frozen for good.
        self.failed = asyncio.Event()
        self.failure = ""
        self.models = ModelRegistry(
            settings.model_repository,
            settings.model_name,
            version=settings.model_version,
            batching=BatchingSettings(
                max_queue=settings.batch_max_queue,
                max_delay_s=settings.batch_max_delay_us / 1e6,
                remote_concurrent_batches=settings.batch_remote_concurrency,
                enabled=settings.batching,
                breaker_failures=settings.breaker_failures,
                breaker_cooldown_s=settings.breaker_cooldown_s,
            ),
            triton_url=settings.triton_url,
            torch_device=settings.torch_device,
            onnx_kernel=settings.onnx_kernel,
            reload_interval_s=settings.model_reload_interval_s,
        )

    async def start(self) -> None:
        settings = self.settings
        # Read first: a bad TLS setting fails the start before anything is running.
        credentials = server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
        # First, so that catch-up's folds are seen too; stopped last.
        await self.loop_lag.start()
        try:
            await self._start_parts(settings, credentials)
        except BaseException:
            # Whatever started is stopped at once: the caller has no server to stop,
            # and a part left running (gRPC listening, say, when the metrics port
            # was taken) would outlive a start that failed, in process.
            try:
                await self.stop(grace_s=0)
            except Exception:
                log.exception("stopping what a failed start had started failed")
            raise

    async def _start_parts(
        self, settings: Settings, credentials: grpc.ServerCredentials | None
    ) -> None:
        set_hash_key(settings.card_hash_key)
        if settings.decision_log and not hash_key_shared():
            log.warning(
                "card_hash_key is not set: card hashes in the decision log and the logs "
                "are keyed per process, so they match neither other processes nor "
                "this one after a restart"
            )
        await self.models.start()
        if settings.kafka:
            # Idempotent: whichever process starts first creates the topics.
            await create_topics(settings.kafka, topic_layout(settings).partitions())
            self.replica = FeatureReplica(
                settings.kafka,
                self.store,
                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
                lean_fetch=settings.kafka_lean_fetch,
                on_failure=self._part_failed("feature replica"),
            )
        self.rollouts = RolloutManager(
            self.models,
            policy=RollbackPolicy(
                min_requests=settings.rollback_min_requests,
                max_error_rate_margin=settings.rollback_error_margin,
                max_p99_ratio=settings.rollback_p99_ratio,
                max_p99_margin_s=settings.rollback_p99_margin_ms / 1000,
            ),
            state_file=RolloutFile(settings.model_repository / settings.model_name / FILE_NAME),
            poll_s=settings.model_reload_interval_s or 1.0,
            on_failure=self._part_failed("rollout"),
        )
        await self.rollouts.start(
            RolloutState(
                primary=settings.model_version,
                canary=settings.canary_version,
                canary_percent=settings.canary_percent,
                shadows=tuple(v for v in settings.shadow_versions.split(",") if v),
            )
        )
        if settings.decision_log and settings.kafka:
            await create_topics(settings.kafka, {DECISIONS_TOPIC: settings.entity_partitions})
            self.decisions = DecisionLog(settings.kafka)
            await self.decisions.start()
            self.rollouts.decisions = self.decisions
        service = ScoringService(
            self.store,
            self.rollouts,
            replica=self.replica,
            replay=settings.replay,
            stale_after_s=settings.stale_after_s,
            budget_s=settings.budget_ms / 1000,
            deadline_fallback=settings.deadline_policy == "fallback",
            decisions=self.decisions,
            tracer=ScoreTracer() if settings.tracing else None,
            max_streams=settings.max_streams,
            row_turns=settings.score_row_turns,
            row_max_wait_s=settings.score_row_max_wait_us / 1e6,
        )
        self.service = service
        server = grpc.aio.server(
            options=[
                # gRPC turns it on by default: off unless asked (settings.reuse_port).
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                *pending_call_options(settings.max_pending_calls),
                *keepalive_options(settings.keepalive_s, settings.keepalive_timeout_s),
                *(
                    [("grpc.max_concurrent_streams", settings.max_calls_per_connection)]
                    if settings.max_calls_per_connection
                    else []
                ),
            ]
        )
        add_scoring_service(service, server)
        # The rest with requests that do not parse refused (INVALID_ARGUMENT), not
        # answered UNKNOWN by gRPC (server/guarded.py).
        admin = AdminService(self.rollouts, settings.admin_token)
        add_guarded(
            apb_grpc.add_AdminServicer_to_server,
            admin,
            server,
            on_malformed=admin.refuse_malformed,  # the caller authenticated first
        )
        add_guarded(
            health_pb2_grpc.add_HealthServicer_to_server,
            self.health,
            server,
            open_streams=self._callers_streams,
        )
        add_reflection(
            server, (SCORING_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME), self._callers_streams
        )
        await self._set_serving(False)
        # Admin answers from the start (the rollout is read, and can be changed, while
        # the features catch up); it stops with the rest at a drain.
        await self.health.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if settings.admin_token and credentials is None and not _is_loopback(settings.host):
            log.warning(
                "the Admin API's bearer token crosses the network in clear: the server "
                "listens on %s without TLS (set tls_cert_file and tls_key_file)",
                settings.host,
            )
        # Metrics first: a port taken fails the start before the replica's rebuild is
        # paid for, and before the shared port takes connections it would then drop
        # (a `serve --workers` process whose metrics port another process held took
        # its share of the shared port's connections at every restart, and failed
        # them); and the rebuild can be watched.
        if settings.metrics_port:
            self._collector = ServerCollector(self)
            REGISTRY.register(self._collector)
            self._metrics_http = start_metrics_http(settings.metrics_port, settings.metrics_address)
        if settings.reuse_port and self.replica is not None:
            # The kernel spreads a shared port's connections over every process on it,
            # whatever their health says: a restarted `serve --workers` process that
            # listened while its replica rebuilt would answer its share with features
            # not yet folded (marked FEATURES_STALE) for as long as the rebuild takes.
            # It listens once caught up.
            await self.replica.start()
            await self.replica.wait_caught_up(timeout=CATCH_UP_TIMEOUT_S)
        # This process's own port (serve --workers: worker i's is the base + i), for
        # clients that spread calls over the workers themselves; before the shared one,
        # which once bound takes connections (gRPC listens as it binds).
        self.own_port = (
            _listen(server, settings.host, settings.worker_port_base, credentials)
            if settings.worker_port_base
            else 0
        )
        self.port = _listen(server, settings.host, settings.port, credentials)
        await server.start()
        self._server = server
        rollout = self.rollouts.state
        primary = self.rollouts.primary_model(rollout)
        log.info(
            "grpc server listening",
            extra={
                "host": settings.host,
                "port": self.port,
                "own_port": self.own_port or None,
                "tls": "off"
                if credentials is None
                else "mutual"
                if settings.tls_client_ca_file
                else "on",
                # What answers: the rollout's primary (a stored rollout may pin one
                # other than the registry's newest), and its canary and shadows.
                "model": primary.metadata.name,
                "version": primary.metadata.version,
                "backend": primary.metadata.backend,
                "pinned": bool(rollout.primary),
                "canary": rollout.canary or None,
                "canary_percent": rollout.canary_percent if rollout.canary else None,
                "shadows": list(rollout.shadows) or None,
            },
        )
        if self.replica is None or self.replica.caught_up:
            await self._start_serving()
            return
        await self.replica.start()
        self._ready_task = start_background(
            self._serve_when_caught_up(),
            name="ready",
            log=log,
            failure="server never became ready",
            on_failure=self._part_failed("start"),
        )

    async def _serve_when_caught_up(self) -> None:
        assert self.replica is not None
        # As long as it takes: this server listens (NOT_SERVING) meanwhile, and a
        # replica that fails ends it (``failed``). No timeout: a log longer to fold
        # than any fixed limit would make the server restart forever.
        await self.replica.wait_caught_up(timeout=None)
        await self._start_serving()

    async def _start_serving(self) -> None:
        if self.gc_freezer is not None:
            self.gc_freezer.freeze_now()
        await self._set_serving(True)
        log.info("serving", extra={"entities": len(self.store)})

    async def _set_serving(self, serving: bool) -> None:
        """Scoring (and the server as a whole) SERVING or not; not serving: Admin too."""
        names: tuple[str, ...]
        if serving:
            names, status = ("", SCORING_SERVICE), health_pb2.HealthCheckResponse.SERVING
        else:
            names = ("", SCORING_SERVICE, ADMIN_SERVICE)
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await self.health.set(name, status)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _part_failed(self, part: str) -> Callable[[BaseException], None]:
        def failed(error: BaseException) -> None:
            if not self.failed.is_set():
                self.failure = f"{part} failed: {type(error).__name__}: {error}"
                self.failed.set()

        return failed

    async def drain(self) -> None:
        """Stop gracefully (SIGTERM): NOT_SERVING first, still answering for the drain
        delay, then refuse new calls, let in-flight ones finish, flush and stop."""
        log.info(
            "draining",
            extra={
                "delay_s": self.settings.drain_delay_s,
                "timeout_s": self.settings.drain_timeout_s,
            },
        )
        await self._set_serving(False)
        await asyncio.sleep(self.settings.drain_delay_s)
        await self.stop(grace_s=self.settings.drain_timeout_s)
        log.info("stopped")

    async def stop(self, grace_s: float = 5.0) -> None:
        ready, self._ready_task = self._ready_task, None
        await cancel_and_wait(ready)
        if self._server is not None:
            await self._set_serving(False)
            await self._stop_grpc(self._server, grace_s)
            self._server = None
        # After gRPC, not before as its start order would have it: a scrape during the
        # grace period sees the calls in flight drain (it failed, unanswered).
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._collector is not None:
            REGISTRY.unregister(self._collector)
            self._collector = None
        parts: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self.decisions is not None:  # after gRPC: every answered call is in it
            parts.append(("decision log", self.decisions.stop))
        if self.replica is not None:
            parts.append(("feature replica", self.replica.stop))
        if self.rollouts is not None:
            parts.append(("rollouts", self.rollouts.stop))
        parts += [("models", self.models.stop), ("loop lag probe", self.loop_lag.stop)]
        # A part whose stop fails does not leave the ones after it running. The first
        # failure is raised at the end as a RuntimeError, never as the part's own
        # type: `serve` maps a ValueError to exit 2 (bad settings), which `serve
        # --workers` never restarts.
        first_failure: tuple[str, Exception] | None = None
        for name, stop in parts:
            try:
                await stop()
            except Exception as error:
                log.exception("stopping the %s failed", name)
                first_failure = first_failure or (name, error)
        if first_failure is not None:
            part, cause = first_failure
            raise RuntimeError(f"stopping the {part} failed: {cause!r}") from cause

    async def _stop_grpc(self, server: grpc.aio.Server, grace_s: float) -> None:
        """Refuse new calls, give in-flight ones ``grace_s`` to finish, log what was cut.

        Open ScoreStreams end once they have answered what they read (end_streams),
        and streams that only their callers end (health Watch, reflection) are
        cancelled: neither holds the stop for the whole grace period."""
        service = self.service
        at_stop = service.calls_in_flight() if service else 0
        stopping = asyncio.ensure_future(server.stop(grace_s))
        await asyncio.sleep(0)  # let the stop start: no new call after this
        if service is not None:
            service.end_streams()
        self._callers_streams.cut_all()
        # grpc cancels whatever is left when the grace ends: count it just before.
        done, _ = await asyncio.wait({stopping}, timeout=max(0.0, grace_s - 0.05))
        cut = 0 if done or service is None else service.calls_in_flight()
        await stopping
        log.info(
            "grpc stopped: %d calls in flight at stop, %d cut off by the grace period",
            at_stop,
            cut,
            extra={"in_flight_at_stop": at_stop, "cut_off": cut, "grace_s": grace_s},
        )


def pending_call_options(limit: int) -> list[tuple[str, int]]:
    """gRPC's limit on calls waiting for a handler, as one hard limit (no random early
    drops below it); see ``Settings.max_pending_calls``."""
    return [
        ("grpc.server.max_pending_requests", limit),
        ("grpc.server.max_pending_requests_hard_limit", limit),
    ]


# Clients may ping this often, with or without calls: gRPC's default (5 min) sent a
# GOAWAY "too_many_pings" to clients with their own 10-30 s keepalive (what grpc-go and
# grpc-java clients use to find a dead server), ending their open ScoreStreams. Half
# the shortest usual client interval: a 10 s client's pings arrive a little early now
# and then, and two early ones were enough for the GOAWAY at 10 s.
CLIENT_PING_MIN_INTERVAL_MS = 5_000


def keepalive_options(every_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Ping a connection idle for ``every_s``, with calls in flight or none; close it
    when its peer does not answer within ``timeout_s`` (0: gRPC's defaults). gRPC 1.85
    times the answer with ``grpc.http2.ping_timeout_ms``: with
    ``grpc.keepalive_timeout_ms`` alone a stopped peer's calls stayed open. Without
    ``grpc.keepalive_permit_without_calls`` a dead client with no call in flight (a
    unary caller between payments) kept its connection until TCP's keepalive (2 h)."""
    # (Without calls permitted, a client's pings on a connection with no call were
    # strikes too, whatever the interval.)
    accept_pings = [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MIN_INTERVAL_MS),
    ]
    if not every_s:
        return accept_pings
    timeout_ms = max(1, round(timeout_s * 1000))
    return [
        ("grpc.keepalive_time_ms", max(1, round(every_s * 1000))),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        *accept_pings,
    ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: may well be reached from elsewhere


def _listen(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
) -> int:
    """Add a listening port (0: a free one); the port bound."""
    address = f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # gRPC's "Failed to bind to address ...", without its cause
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {address}: {bind_problem(host, port)}")
    return bound


def bind_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on, as the OS says it: gRPC says only that
    it failed to bind (a name that does not resolve, an address not of this machine
    and a port in use all read the same)."""
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return f"host {host!r} does not resolve ({error.strerror})"
    for family, kind, proto, _, where in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as error:
                return f"{error.strerror} ({host} port {port})"
    return "gRPC failed to bind, though the address binds here (see gRPC's log lines)"

"""Settings: defaults, overridden by a TOML file, then STREAMSCORE_* environment, then flags."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamscore.stream.kafka_security import PROTOCOLS, SASL_MECHANISMS, KafkaSecurity
from streamscore.stream.state import DEFAULT_FOLD_HORIZON_MS
from streamscore.stream.topics import TopicLayout

ENV_PREFIX = "STREAMSCORE_"
# Settings that are secrets: never printed, logged or echoed in an error.
SECRET_SETTINGS = ("admin_token", "card_hash_key", "kafka_sasl_password")


def default_model_repository() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamscore" / "models"


TORCH_DEVICES = ("auto", "cpu", "cuda")
# How "onnxruntime" versions compute small batches (the ONNX backend's ``kernel``).
ONNX_KERNELS = ("auto", "onnxruntime")


@dataclass
class Settings:
    # Kafka bootstrap "host:port"; empty means start the embedded tansu broker.
    kafka: str = ""
    # How long a consumer's fetch (the server's feature replica, the worker's stream)
    # waits for records. tansu, the embedded broker, answers a waiting fetch only when
    # this runs out, so it is the worst-case delivery delay there, and every empty
    # fetch costs CPU: ~0.85 ms through aiokafka's consumer, ~0.4 ms through the
    # server's lean fetch (at 20 ms: ~4 % and ~2 % of a core while no events flow).
    # Real Kafka answers as soon as records arrive: use 500 there.
    kafka_fetch_max_wait_ms: int = 20
    # The server's replica, once caught up, fetches with a Fetch request of its own
    # (stream/lean_fetch.py: about half aiokafka's CPU per fetch); false: the consumer's
    # fetcher throughout.
    kafka_lean_fetch: bool = True
    # How every Kafka client connects (stream/kafka_security.py): plaintext, ssl,
    # sasl_plaintext or sasl_ssl; TLS files in PEM (no CA file: the system's CAs; a
    # certificate and key: mutual TLS); SASL's mechanism (plain, scram-sha-256,
    # scram-sha-512) and credentials, the password a secret (set it through
    # STREAMSCORE_KAFKA_SASL_PASSWORD).
    kafka_security_protocol: str = "plaintext"
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_sasl_mechanism: str = "plain"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    host: str = "127.0.0.1"
    port: int = 50051
    model_repository: Path = field(default_factory=default_model_repository)
    model_name: str = "fraud_mlp"
    # Empty: the highest version in the repository, hot-reloaded when a newer appears.
    model_version: str = ""
    # How often the repository is checked for a new version or changed metadata (0: never).
    model_reload_interval_s: float = 1.0
    # Rollout at start (the Admin API changes it at runtime): a canary version and
    # its percent of cards, and comma-separated shadow versions.
    canary_version: str = ""
    canary_percent: float = 0.0
    shadow_versions: str = ""
    # Automatic canary rollback: over at least this many canary requests, when its
    # error rate exceeds the primary's by the margin, or its p99 both exceeds
    # ratio x the primary's and the primary's + the margin in ms.
    rollback_min_requests: int = 200
    rollback_error_margin: float = 0.02
    rollback_p99_ratio: float = 2.0
    rollback_p99_margin_ms: float = 5.0
    # Bearer token for the Admin API; empty disables it. A secret: set it through
    # STREAMSCORE_ADMIN_TOKEN; never logged, printed or part of repr().
    admin_token: str = field(default="", repr=False)
    # The key of the card hashes in logs and the decision log (a secret): the same on
    # every process whose hashes must match. Unset: random per process.
    card_hash_key: str = field(default="", repr=False)
    # TLS for gRPC (Scoring, Admin, health, reflection): the server's certificate
    # chain and key, PEM files. With a client CA file as well, mutual TLS: a client
    # must present a certificate that CA signed. All empty: plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Largest gRPC message, either way (a Score request is a few hundred bytes);
    # a bigger one is refused with RESOURCE_EXHAUSTED before any handler runs.
    max_message_bytes: int = 256 * 1024
    # Calls gRPC holds for the server before a handler takes them: when calls come
    # faster than one process can take them, this queue is what they wait in, first
    # come first served, before any of the server's own admission sees them. Past it
    # gRPC refuses calls at once (callers see CANCELLED; the server never counts
    # them). About what one process answers within a budget (~2,000/s x 50 ms) plus
    # room for bursts: deeper, every call of a sustained overload waits past its
    # deadline (10,000 answered 5-6 % of 8,000/s offered on two cores, 256 answered
    # 37-39 %, the process's capacity: BENCHMARKS.md, "Sustained overload"). Raise it
    # for bursty callers with long deadlines.
    max_pending_calls: int = 256
    # A connection idle this long (with calls in flight or none) is pinged; one whose
    # peer does not answer within keepalive_timeout_s is closed, ending its calls. A
    # client host that died (no FIN, no RST) otherwise kept its ScoreStreams open, with
    # their state, until the kernel's TCP keepalive (2 h). 0: gRPC's own default (a
    # ping after 2 h idle).
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # ScoreStreams open at once; past it a new one is refused (RESOURCE_EXHAUSTED)
    # and the streams already open go on. Each open stream holds ~22 KB (gRPC's
    # buffers, its handler), so a live client that leaks streams (opens them and
    # never closes) could otherwise grow the process without bound. 0: no limit.
    max_streams: int = 10_000
    # Calls (ScoreStreams and unary calls alike: HTTP/2 streams) open at once on one
    # connection, advertised to the client (SETTINGS_MAX_CONCURRENT_STREAMS): one
    # client cannot take every slot of max_streams. Off by default: a burst past it
    # opened before the client has the server's settings is refused (UNAVAILABLE),
    # which broke a client multiplexing thousands of calls on one connection.
    # 0: gRPC's own (no limit).
    max_calls_per_connection: int = 0
    # Loop turns the first unary Score of a row waits for others to join it, while
    # waiting gathers calls (server/back_to_back.py): bodies run back to back cost
    # less CPU under load. 0: each call's body runs in its own handler, as before.
    score_row_turns: int = 32
    # ... and for how long at most: a turn's length depends on everything else on
    # the loop (ScoreStreams stretched 32 turns to tens of ms). Never more than a
    # tenth of the call's budget or deadline either.
    score_row_max_wait_us: int = 1000
    # Publish every decision to the streamscore-decisions topic (needs kafka).
    decision_log: bool = False
    # Prometheus /metrics over HTTP on this port (on metrics_host); 0: off.
    metrics_port: int = 0
    # The address /metrics listens on; empty: the gRPC host. A container listens on
    # 0.0.0.0 for gRPC, while metrics (model versions, rates, internals) belong on a
    # private interface.
    metrics_host: str = ""
    # A second gRPC port that this process alone listens on; with serve --workers N,
    # worker i listens on worker_port_base + i. The shared port spreads connections
    # (the kernel's choice, uneven with few clients); these let a client spread its
    # calls itself, evenly: round_robin over the list (README "Scaling"). 0: off.
    worker_port_base: int = 0
    # Let other processes listen on the same port (SO_REUSEPORT), the kernel spreading
    # connections between them: serve --workers N sets it for its workers. Off, a
    # second server on a port in use fails to start instead of taking half the
    # connections unnoticed.
    reuse_port: bool = False
    # OpenTelemetry spans per Score (stages as child spans) to the global tracer
    # provider; needs the otel extra (pip install 'streamscore[otel]').
    tracing: bool = False
    # Triton's gRPC "host:port", for versions whose backend is "triton".
    triton_url: str = ""
    # Where versions whose backend is "torch" run: "auto" (CUDA when torch sees a
    # GPU), "cpu" or "cuda". A small MLP is cheaper on the CPU even on a GPU machine:
    # each CUDA call's copies, launches and synchronisation cost more CPU than the
    # model itself (BENCHMARKS.md, the 16-core GPU machine).
    torch_device: str = "auto"
    # How versions whose backend is "onnxruntime" compute small batches: "auto" (the
    # compiled dense kernel where it translates the model and matches onnxruntime on
    # check rows at load, several times cheaper per call: BENCHMARKS.md) or
    # "onnxruntime" (onnxruntime for every batch).
    onnx_kernel: str = "auto"
    # Score's latency budget: a request's deadline is min(gRPC deadline, this).
    budget_ms: float = 50.0
    # When the deadline cannot be met: "fallback" (the version's ONNX in process,
    # answer marked DEADLINE_FALLBACK) or "error" (DEADLINE_EXCEEDED).
    deadline_policy: str = "fallback"
    batching: bool = True
    # Circuit breaker per model version: this many consecutive backend failures send
    # calls straight to the fallback for breaker_cooldown_s, then one probe call tests
    # the backend (the cooldown doubles per failed probe, up to 10 s).
    breaker_failures: int = 5
    breaker_cooldown_s: float = 1.0
    batch_max_queue: int = 1024
    batch_max_delay_us: int = 0
    # Batches in flight at once to a remote backend (Triton): each call costs this
    # process a gRPC client call's CPU, so fewer slots merge more requests per call.
    batch_remote_concurrency: int = 4
    # Replay mode: features as of each request's event_time_ms (tests, backtests).
    replay: bool = False
    # Worker: events older than their partition's newest minus this are dead-lettered.
    lateness_ms: int = 3_600_000
    # Server replica: how far behind an entity's newest event a record may still be
    # folded (and recognised as a duplicate). Must exceed lateness_ms plus any
    # event-time skew between payments partitions; older records are dropped and counted.
    fold_horizon_ms: int = DEFAULT_FOLD_HORIZON_MS
    skew_ms: int = 300_000
    stale_after_s: float = 5.0
    # Server: every this many seconds, collect the young GC generations and freeze the
    # survivors (the feature state), so no collection traverses millions of state
    # objects with the loop stopped (server/gc_policy.py). 0: CPython's collector alone.
    gc_freeze_interval_s: float = 0.25
    # Server: how often a probe checks how late the event loop runs what is due, and
    # why (streamscore_event_loop_* metrics; server/loop_lag.py). Each wake of an idle
    # loop costs about 0.2 ms of CPU on a sandboxed VM, so not much more often. 0: off.
    loop_lag_interval_s: float = 0.1
    # Graceful stop (SIGTERM): health turns NOT_SERVING at once while calls are still
    # answered for drain_delay_s, so load balancers and clients move away; then new
    # calls are refused and in-flight ones get up to drain_timeout_s to finish.
    drain_delay_s: float = 2.0
    drain_timeout_s: float = 10.0
    # Worker: how long its stop (the consumer's commit, the producer's flush) may wait
    # on the broker before it exits 1 (stream/worker.py). A healthy stop takes about a
    # second; 15 s is below Kubernetes' default grace period (30 s), so the worker says
    # why it stopped before it is killed.
    worker_stop_timeout_s: float = 15.0
    payments_partitions: int = 4
    entity_partitions: int = 4
    log_level: str = "info"
    log_format: str = "json"

    @property
    def metrics_address(self) -> str:
        return self.metrics_host or self.host

    @functools.cached_property
    def kafka_security(self) -> KafkaSecurity:
        """How this process's Kafka clients connect: one value, so that its SSL
        context (cached on it) is loaded once, for the settings' check and for
        ``kafka_security.configure``. (Settings are replaced, never changed.)"""
        return KafkaSecurity(
            protocol=self.kafka_security_protocol,
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password,
        )

    def redacted(self) -> dict[str, Any]:
        """Every setting, secrets replaced by "***" when set: safe to print or log."""
        values = dataclasses.asdict(self)
        for name in SECRET_SETTINGS:
            if values[name]:
                values[name] = "***"
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}

    def override(self, values: dict[str, Any], *, check: bool = True) -> Settings:
        """A copy with ``values`` (already typed or strings) applied; unknown keys are
        errors. ``check``: the values together are checked too (``checked``); off for
        a layer that a later one may still mend (``load_settings``)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            name = key.replace("-", "_")
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1, cutoff=0.8)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown setting {key!r}{hint}")
            changes[name] = _coerce(getattr(self, name), value, name)
            if name in _CHOICES and isinstance(changes[name], str):
                changes[name] = changes[name].lower()  # "FALLBACK" is "fallback"
        updated = dataclasses.replace(self, **changes)
        return updated.checked() if check else updated

    def checked(self) -> Settings:
        """These settings, when every value and every pairing of values is valid."""
        _check_values(self)
        # 0 is not "no wait": tansu answers it with no partitions at all (kafka_compat,
        # quirk 4). A wait as long as stale_after_s would mark features stale between
        # two answers of an idle broker.
        if not 1 <= self.kafka_fetch_max_wait_ms < self.stale_after_s * 1000 / 2:
            raise ValueError(
                "kafka_fetch_max_wait_ms must be at least 1 and under half of stale_after_s"
            )
        # A ping every few milliseconds per connection is load, not liveness, and
        # clients answer pings that frequent with GOAWAY too_many_pings.
        if 0 < self.keepalive_s < 1:
            raise ValueError(f"keepalive_s ({self.keepalive_s:g}) must be 0 (off) or at least 1")
        # Else the worker admits events (within lateness_ms of their partition's newest)
        # that every server's replica drops as too old to fold: neither dead-lettered
        # nor in any feature.
        if self.fold_horizon_ms <= self.lateness_ms:
            raise ValueError(
                f"fold_horizon_ms ({self.fold_horizon_ms}) must exceed lateness_ms "
                f"({self.lateness_ms}): servers would drop events the worker admits"
            )
        return self


def _coerce(current: Any, value: Any, name: str) -> Any:
    if not isinstance(value, str):
        return _typed(current, value, name)
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, Path):
            return Path(value).expanduser()
    except ValueError:
        raise ValueError(f"setting {name}: cannot read {value!r}") from None
    return value


def _typed(current: Any, value: Any, name: str) -> Any:
    """A value already typed (TOML, flags): of the setting's type, or an error naming it.
    (bool is an int subclass in Python; TOML's true is not a port.)"""
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, Path):
        ok = isinstance(value, str | Path)
        value = Path(value).expanduser() if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(
            type(current), "a string"
        )
        shown = "a value of another type" if name in SECRET_SETTINGS else repr(value)
        raise ValueError(f"setting {name}: expected {kind}, got {shown}")
    return value


# Allowed values: (low, high) inclusive bounds, or a tuple of choices.
_BOUNDS: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "metrics_port": (0, 65535),
    "worker_port_base": (0, 65535),
    "max_message_bytes": (1, 2**31 - 1),
    "max_pending_calls": (1, 2**31 - 1),
    "keepalive_s": (0, 86_400),
    "keepalive_timeout_s": (1e-3, 3600),
    "max_streams": (0, 2**31 - 1),
    "score_row_turns": (0, 256),
    "score_row_max_wait_us": (0, 100_000),
    "max_calls_per_connection": (0, 2**31 - 1),
    "budget_ms": (1e-3, 3_600_000),
    "breaker_failures": (1, 2**31 - 1),
    "breaker_cooldown_s": (1e-3, 3600),
    "batch_max_queue": (1, 2**31 - 1),
    "batch_max_delay_us": (0, 60_000_000),
    "batch_remote_concurrency": (1, 1024),
    "canary_percent": (0, 100),
    "rollback_min_requests": (1, 2**31 - 1),
    "rollback_error_margin": (0, 1),
    "rollback_p99_ratio": (1, 1e6),
    "rollback_p99_margin_ms": (0, 3_600_000),
    "model_reload_interval_s": (0, 86_400),
    "lateness_ms": (0, 2**62),
    "fold_horizon_ms": (0, 2**62),
    "skew_ms": (0, 2**62),
    "stale_after_s": (1e-3, 86_400),
    "gc_freeze_interval_s": (0, 86_400),
    "loop_lag_interval_s": (0, 3600),
    "drain_delay_s": (0, 3600),
    "drain_timeout_s": (0, 3600),
    "worker_stop_timeout_s": (0.1, 3600),
    "payments_partitions": (1, 100_000),
    "entity_partitions": (1, 100_000),
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "text")
_CHOICES: dict[str, tuple[str, ...]] = {
    "deadline_policy": ("fallback", "error"),
    "torch_device": TORCH_DEVICES,
    "onnx_kernel": ONNX_KERNELS,
    "log_level": LOG_LEVELS,
    "log_format": LOG_FORMATS,
    "kafka_security_protocol": PROTOCOLS,
    "kafka_sasl_mechanism": SASL_MECHANISMS,
}


def _check_bootstrap(bootstrap: str) -> None:
    """``host:port[,host:port...]`` (a port may be left out: Kafka's 9092; an IPv6
    address in brackets). No scheme, no credentials (they would be logged)."""
    for server in bootstrap.split(","):
        server = server.strip()
        host, port = server, ""
        if server.startswith("["):  # [IPv6]:port
            host, _, rest = server[1:].partition("]")
            if rest and not rest.startswith(":"):
                host = ""
            port = rest[1:]
        elif ":" in server:
            host, _, port = server.rpartition(":")
        bad_port = port != "" and not (port.isdigit() and 1 <= int(port) <= 65535)
        if (
            not host
            or any(c in host for c in "/@ ")
            or bad_port
            or (":" in host and not server.startswith("["))
        ):
            raise ValueError(
                f"setting kafka: {_shown(bootstrap)} is not host:port[,host:port...] "
                "(credentials and TLS: the kafka_security_protocol and kafka_sasl_* settings)"
            )


def _shown(bootstrap: str) -> str:
    """The bootstrap as an error message (which is logged) may show it: not at all when
    it may hold credentials (user:password@, ?password=...), whose password may itself
    hold any character."""
    if any(mark in bootstrap for mark in "@?=;"):
        return "(the value is not shown: it looks like it holds credentials)"
    return repr(bootstrap)


def _check_values(settings: Settings) -> None:
    if settings.kafka:
        _check_bootstrap(settings.kafka)
    for name, (low, high) in _BOUNDS.items():
        value = getattr(settings, name)
        if not low <= value <= high:
            raise ValueError(
                f"setting {name}: {value!r} is not within [{_bound(low)}, {_bound(high)}]"
            )
    for name, choices in _CHOICES.items():
        value = getattr(settings, name)
        if value not in choices:
            raise ValueError(f"setting {name}: {value!r} is not one of {', '.join(choices)}")
    settings.kafka_security.check()
    _check_admin_token(settings.admin_token)
    # A short key is itself tried in moments, and with it the card numbers behind the
    # hashes (a BIN and last four digits leave about 10^5 candidates).
    if settings.card_hash_key and len(settings.card_hash_key) < MIN_ADMIN_TOKEN_LENGTH:
        raise ValueError(
            f"setting card_hash_key: at least {MIN_ADMIN_TOKEN_LENGTH} characters "
            "(e.g. `openssl rand -hex 32`)"
        )


def _bound(value: float) -> str:
    """A bound as written, exactly: 2147483647, not %g's 2.14748e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Shorter, a bearer token (or the card hash key) can be guessed; the README suggests
# `openssl rand -hex 32`.
MIN_ADMIN_TOKEN_LENGTH = 16


def _check_admin_token(token: str) -> None:
    """A token no client could send (gRPC metadata is printable ASCII: a trailing
    newline from a secret file, a non-ASCII character) or one easily guessed would
    turn the Admin API on and leave it unusable or open. Refused naming the setting,
    never the value."""
    if not token:
        return
    if not (token.isascii() and token.isprintable()) or token != token.strip():
        raise ValueError(
            "setting admin_token: must be printable ASCII without surrounding whitespace "
            "(a trailing newline from a secret file?)"
        )
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise ValueError(
            f"setting admin_token: at least {MIN_ADMIN_TOKEN_LENGTH} characters "
            "(e.g. `openssl rand -hex 32`)"
        )


# STREAMSCORE_* variables that are no settings: the clients' TLS (streamscore health,
# features, rollout) and the load tools' knobs (loadtest/locustfile.py, triton_server).
OTHER_VARIABLES = frozenset(
    ENV_PREFIX + name
    for name in (
        "TLS_CA TLS_CLIENT_CERT TLS_CLIENT_KEY TLS_SERVER_NAME TRITON_VENV BATCHING CARDS "
        "MERCHANTS FRAUD_FRACTION SEED SHAPE SHAPE_SECONDS SHAPE_USERS SPIKE_FACTOR "
        "STREAM_DEPTH TIMEOUT_S WAIT_S WORKER_INDEX"
    ).split()
)


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``STREAMSCORE_*`` variable names that are neither a setting nor a client's or
    load tool's variable, each with the setting it is likely a misspelling of: a
    misspelt variable is otherwise ignored without a word (a file's is an error)."""
    settings = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    unknown = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in settings and name not in OTHER_VARIABLES:
            close = difflib.get_close_matches(name, settings, n=1, cutoff=0.9)
            unknown.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return unknown


def settings_environment(settings: Settings, **overrides: Any) -> dict[str, str]:
    """Every setting (with ``overrides``) as ``STREAMSCORE_*`` variables: how a command
    hands its settings, from whatever file, environment and flags, to its children."""
    env = {}
    for name, value in {**dataclasses.asdict(settings), **overrides}.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        env[ENV_PREFIX + name.upper()] = text
    return env


def topic_layout(settings: Settings) -> TopicLayout:
    return TopicLayout(settings.payments_partitions, settings.entity_partitions)


def load_settings(
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    settings = Settings()
    if config_file is not None:
        try:
            with config_file.open("rb") as handle:
                values = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {config_file}: {error}") from None
        except OSError as error:  # a usage error as the others are (exit 2), not a crash
            raise ValueError(f"config file {config_file}: {error.strerror or error}") from None
        try:
            settings = settings.override(values, check=False)
        except ValueError as error:  # which file the value came from
            raise ValueError(f"config file {config_file}: {error}") from None
    env = os.environ if environ is None else environ
    names = {f.name for f in dataclasses.fields(Settings)}
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in names
    }
    try:
        settings = settings.override(from_env, check=False)
    except ValueError as error:
        raise ValueError(f"{error} (from the {ENV_PREFIX}* environment variables)") from None
    # Checked once all are applied: a value a later layer overrides (a placeholder key
    # in the file, the environment's real one) does not refuse the start.
    return settings.override(flags or {})

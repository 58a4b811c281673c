"""The ``streamscore`` console script: one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

# gRPC core's own INFO lines (a failed TLS handshake, fork handlers skipped) go to
# stderr as plain text, in the middle of our JSON lines: errors only, unless the
# operator asks for more. Set before grpc is imported (streamscore.tls imports it).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from streamscore.argtypes import at_least_one, positive
from streamscore.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    load_settings,
    unknown_environment,
)
from streamscore.logs import setup_logging
from streamscore.server.model import BACKENDS
from streamscore.stream import kafka_security
from streamscore.tls import ClientTls, add_client_tls_arguments


def _run(main: Coroutine[Any, Any, int]) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _common(parser: argparse.ArgumentParser, *, kafka_help: str | None) -> None:
    """``--config``, ``--kafka`` (None: a command with no use for it, which still
    takes it, unlisted, so that one command line fits every command) and logging."""
    parser.add_argument("--config", type=Path, help="TOML settings file (see README)")
    parser.add_argument("--kafka", metavar="HOST:PORT", help=kafka_help or argparse.SUPPRESS)
    _log_arguments(parser)


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    # Read whatever their case, as the settings' choices are ("INFO" is "info").
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS)
    parser.add_argument("--log-format", type=str.lower, choices=LOG_FORMATS)


def _settings(args: argparse.Namespace, *names: str) -> Settings:
    flags = {
        name: getattr(args, name, None) for name in ("kafka", "log_level", "log_format", *names)
    }
    settings = load_settings(args.config, flags)
    setup_logging(settings.log_level, settings.log_format)
    # Every Kafka client this process makes connects this way (checked with the
    # settings).
    kafka_security.configure(settings.kafka_security)
    _warn_of_unknown_environment()
    return settings


def _warn_of_unknown_environment() -> None:
    unknown = unknown_environment(os.environ)
    if unknown:
        logging.getLogger("streamscore").warning(
            "environment variables that are no settings, ignored: %s", ", ".join(unknown)
        )


def _client_options(parser: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it (TLS flags fall back to the environment)."""
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="server address (default: %(default)s)"
    )
    add_client_tls_arguments(parser)
    # A command a person types: its errors are one plain line (``_fatal``).
    parser.set_defaults(client=True)


async def _create_topics(bootstrap: str, partitions: dict[str, int]) -> int:
    from streamscore.stream.broker import create_topics

    await create_topics(bootstrap, partitions)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(
        args,
        "host",
        "port",
        "model_repository",
        "replay",
        "metrics_port",
        "worker_port_base",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
    )
    if not settings.kafka:
        raise ValueError("serve needs --kafka HOST:PORT (or STREAMSCORE_KAFKA)")
    from streamscore.supervisor import check_ports

    check_ports(settings, args.workers)
    if args.workers > 1:
        from streamscore.supervisor import serve_workers

        return _run(serve_workers(settings, args.workers))

    from streamscore.server.run import run_server

    return _run(run_server(settings))


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args, "metrics_port")
    if not settings.kafka:
        raise ValueError("worker needs --kafka HOST:PORT (or STREAMSCORE_KAFKA)")
    from streamscore.config import topic_layout
    from streamscore.stream.worker import run_worker

    _run(_create_topics(settings.kafka, topic_layout(settings).partitions()))
    if settings.metrics_port:
        from streamscore.metrics_http import start_metrics_http

        start_metrics_http(settings.metrics_port, settings.metrics_address)  # the process's life
    # A line before the first event, for whoever tails a new worker's log.
    logging.getLogger("streamscore.worker").info(
        "worker starting",
        extra={
            "kafka": settings.kafka,
            "metrics_port": settings.metrics_port or None,
            "lateness_ms": settings.lateness_ms,
            "skew_ms": settings.skew_ms,
        },
    )
    run_worker(
        settings.kafka,
        loglevel=settings.log_level,
        payments_partitions=settings.payments_partitions,
        entity_events_partitions=settings.entity_partitions,
        lateness_ms=settings.lateness_ms,
        skew_ms=settings.skew_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        stop_timeout_s=settings.worker_stop_timeout_s,
    )
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def main() -> int:
        from streamscore.config import topic_layout
        from streamscore.processes import stop_on_signals
        from streamscore.server.decisions import DECISIONS_TOPIC
        from streamscore.stream.broker import EmbeddedBroker, create_topics

        stop = stop_on_signals()
        async with EmbeddedBroker(port=args.port or None) as broker:
            # The decision log's too, which serve creates only at its start: tansu
            # acknowledges writes to a topic it does not have and drops them, so a
            # server outliving a broker restart would log its decisions into nothing
            # while counting them published.
            topics = topic_layout(settings).partitions()
            topics[DECISIONS_TOPIC] = settings.entity_partitions
            await create_topics(broker.bootstrap, topics)
            print(broker.bootstrap, flush=True)
            await stop.wait()
        return 0

    return _run(main())


def cmd_triton(args: argparse.Namespace) -> int:
    settings = _settings(args, "model_repository")

    async def main() -> int:
        from streamscore.processes import stop_on_signals
        from streamscore.triton_server import EmbeddedTriton

        stop = stop_on_signals()
        repository = settings.model_repository
        if not any(repository.glob("*/config.pbtxt")):
            logging.getLogger("streamscore.triton").warning(
                "no model in %s (no directory with a config.pbtxt): Triton will serve none; "
                "streamscore train --backend triton writes one",
                repository,
            )
        # The binary setup.sh installs, with what it needs around it (its python
        # backend, libraries, stub): run bare, it found no backend for the models.
        async with EmbeddedTriton(repository, port=args.port or None) as triton:
            print(triton.url, flush=True)
            await stop.wait()
        return 0

    return _run(main())


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args, "port", "model_repository")
    from streamscore.demo import run_demo

    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    return _run(
        run_demo(settings, duration_s=args.duration, rate_per_s=args.rate, log_dir=args.log_dir)
    )


def cmd_train(args: argparse.Namespace) -> int:
    settings = _settings(args, "model_repository")
    from streamscore.training import train

    report = train(
        settings.model_repository,
        version=args.version,
        replace=args.replace,
        duration_s=args.duration,
        rate_per_s=args.rate,
        seed=args.seed,
        backend=args.backend,
    )
    print(f"model written to {report.path}")
    print(
        f"rows {report.rows}, fraud rate {report.fraud_rate:.3%}, held-out ROC-AUC "
        f"{report.roc_auc:.3f}, PR-AUC {report.pr_auc:.3f}, thresholds review "
        f"{report.thresholds.review:.4f} decline {report.thresholds.decline:.4f} "
        f"({report.seconds:.1f} s)"
    )
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamscore.stream.assembly import all_feature_names
    from streamscore.stream.backfill import backfill, sort_events
    from streamscore.stream.eventlog import read_events, write_rows
    from streamscore.stream.state import FeatureStore

    settings = _settings(args)
    if args.output.resolve() == args.events.resolve() or (
        args.output.exists() and args.events.exists() and args.output.samefile(args.events)
    ):  # (a hard link is the same file under another name)
        raise ValueError(f"the output {args.output} is the event log itself: give another -o")
    started = time.perf_counter()
    rejected: Counter[str] = Counter()
    events = sort_events(read_events(args.events, rejected))
    if rejected and not events:
        # Not a log of payment events (another file, another schema): exit 2, for a
        # pipeline that would otherwise train on the empty output it wrote.
        raise ValueError(
            f"no valid event in {args.events} (skipped invalid: {_counts(rejected)}): "
            "nothing written"
        )
    store = FeatureStore(fold_horizon_ms=settings.fold_horizon_ms, skew_ms=settings.skew_ms)
    columns = ("event_id", *all_feature_names(store))
    progress = tqdm(
        total=len(events),
        unit="ev",
        disable=args.no_progress or None,
        desc="backfill",
        file=sys.stderr,
    )

    def rows() -> Iterator[dict[str, float | str]]:
        for event, features in backfill(events, store):
            progress.update()
            yield {"event_id": event.event_id, **features}

    written = write_rows(args.output, columns, rows())
    progress.close()
    seconds = time.perf_counter() - started
    skipped = _counts(rejected) or "none"
    print(
        f"{written} rows to {args.output} in {seconds:.1f} s "
        f"({len(events) / max(seconds, 1e-9):,.0f} events/s); skipped invalid: {skipped}"
    )
    return 0


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))


def cmd_features(args: argparse.Namespace) -> int:

    from streamscore._proto.v1 import scoring_pb2 as pb
    from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc

    with ClientTls.from_arguments(args).channel(args.target) as channel:
        request = pb.FeaturesRequest(entity_type=args.entity_type, entity_id=args.entity_id)
        if args.as_of_ms is not None:  # has presence: unset is the server clock
            request.as_of_ms = args.as_of_ms
        reply = pb_grpc.ScoringStub(channel).GetFeatures(request, timeout=5)
    newest = reply.newest_event_time_ms if reply.HasField("newest_event_time_ms") else "none"
    print(
        f"{reply.entity_type} {reply.entity_id} as of {reply.as_of_ms} "
        f"(newest event {newest}, {reply.events_folded} folded)"
    )
    for name in sorted(reply.features):
        print(f"  {name:32s} {reply.features[name]!r}")  # exact: repr, not rounded
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """Talk to the Admin API: show, set, promote, rollback; models lists the versions."""

    from streamscore._proto.v1 import admin_pb2 as apb
    from streamscore._proto.v1 import admin_pb2_grpc as apb_grpc

    token = args.token or os.environ.get("STREAMSCORE_ADMIN_TOKEN", "")
    if not token:
        raise ValueError("rollout needs --token or STREAMSCORE_ADMIN_TOKEN")
    metadata = (("authorization", f"Bearer {token}"),)
    with ClientTls.from_arguments(args).channel(args.target) as channel:
        stub = apb_grpc.AdminStub(channel)
        if args.action == "models":
            listed = stub.ListModels(apb.ListModelsRequest(), metadata=metadata, timeout=10)
            for info in listed.versions:
                if info.error:
                    print(f"{info.name} {info.version}: cannot be served: {info.error}")
                    continue
                print(f"{info.name} {info.version}: {info.backend}, {_load_state(info)}")
            return 0
        if args.action == "show":
            status = stub.GetRollout(apb.GetRolloutRequest(), metadata=metadata, timeout=10)
        elif args.action == "set":
            current = stub.GetRollout(apb.GetRolloutRequest(), metadata=metadata, timeout=10)
            wanted = current.rollout
            if args.primary is not None:
                wanted.primary_version = args.primary
            if args.canary is not None:
                wanted.canary_version = args.canary
                if not args.canary and args.percent is None:
                    wanted.canary_percent = 0.0  # no canary, no slice for it
            if args.percent is not None:
                wanted.canary_percent = args.percent
            if args.shadows is not None:
                del wanted.shadow_versions[:]
                wanted.shadow_versions.extend(v for v in args.shadows.split(",") if v)
            status = stub.SetRollout(
                apb.SetRolloutRequest(
                    rollout=wanted, expected_generation=current.rollout.generation
                ),
                metadata=metadata,
                timeout=120,
            )
        elif args.action == "promote":
            status = stub.Promote(apb.PromoteRequest(), metadata=metadata, timeout=60)
        else:
            status = stub.Rollback(
                apb.RollbackRequest(reason=args.reason), metadata=metadata, timeout=10
            )
    rollout = status.rollout
    primary = (
        rollout.primary_version
        if rollout.primary_version
        else f"{rollout.serving_primary_version} (unpinned: follows new versions)"
    )
    print(
        f"{rollout.model_name}: primary {primary}, "
        f"canary {rollout.canary_version or '-'} at {rollout.canary_percent:g}%, "
        f"shadows {','.join(rollout.shadow_versions) or '-'} (generation {rollout.generation})"
    )
    if status.primary_alone_because:
        print(
            f"  this server answers with the primary alone until its candidates load "
            f"(tried every 10 s): {status.primary_alone_because}"
        )
    for candidate in status.candidates:
        stats = ", ".join(f"{k} {v:.4g}" for k, v in sorted(candidate.stats.items()))
        print(f"  {candidate.variant} {candidate.version}: {stats}")
    for event in status.rollbacks:
        kind = "automatic" if event.automatic else "manual"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.time_ms / 1000))
        print(f"  rollback of {event.version} ({kind}) at {when}: {event.reason}")
    return 0


def _load_state(info: Any) -> str:
    """A listed version's state on the server asked: loaded or not, and why its last
    load failed, if it did."""
    if not info.load_error:
        return "loaded" if info.loaded else "not loaded"
    if info.loaded:
        return f"loaded (its files now on disk failed to load: {info.load_error})"
    return f"not loaded (its last load failed: {info.load_error})"


def container_target(cmdline: list[str], environ: dict[str, str]) -> str | None:
    """What a container running ``cmdline`` (its PID 1) is health-checked on: the gRPC
    address of a ``serve`` or ``demo``, from its flags, config file and environment as
    that command reads them; None for a command that serves no gRPC (a worker, a
    broker), healthy while it runs (the orchestrator restarts it when it exits), or
    for a port picked at start (0), which cannot be known from outside."""
    if cmdline and Path(cmdline[0]).name in ("sh", "bash", "dash") and "-c" in cmdline:
        script = cmdline[cmdline.index("-c") + 1 :]
        return container_target(shlex.split(script[0]), environ) if script else None
    start = next((i for i, arg in enumerate(cmdline) if arg in ("serve", "demo")), None)
    if start is None:
        return None
    args, _ = build_parser().parse_known_args(cmdline[start:])
    flags = {"port": args.port, "host": getattr(args, "host", None)}
    settings = load_settings(args.config, flags, dict(environ))
    if not settings.port:
        return None
    host = settings.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{settings.port}"


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING (the container's health check)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.container:
        with open("/proc/1/cmdline", "rb") as cmdline:
            argv = [a.decode(errors="replace") for a in cmdline.read().split(b"\0") if a]
        target = container_target(argv, dict(os.environ))
        if target is None:
            print(f"{' '.join(argv)}: running (no gRPC to check)")
            return 0
        args.target = target
    with ClientTls.from_arguments(args).channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            # The details say why (a certificate not trusted, a name mismatch, no
            # connection): the code alone would leave a failing health check unexplained.
            why = error.details() or ""
            if error.code() == grpc.StatusCode.NOT_FOUND and not why:
                why = f"no health status for service {args.service!r}"
                try:  # the services it has, where the server lists them (ours does)
                    listed = stub.List(health_pb2.HealthListRequest(), timeout=args.timeout)
                    why += "; it has " + ", ".join(repr(name) for name in sorted(listed.statuses))
                except grpc.RpcError:
                    pass
            print(f"{args.target}: {error.code().name}: {why}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective settings (defaults < file < environment), secrets masked."""
    settings = load_settings(args.config)
    setup_logging(settings.log_level, settings.log_format)  # (on stderr)
    _warn_of_unknown_environment()
    for name, value in settings.redacted().items():
        print(f"{name} = {_toml_value(value)}")
    return 0


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamscore", description="Real-time fraud scoring with streaming features."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    demo = add("demo", cmd_demo, "Run everything on this machine and score live synthetic traffic.")
    _common(demo, kafka_help="use this Kafka cluster instead of the embedded broker")
    demo.add_argument(
        "--duration", type=positive, help="stop after this many seconds (default: Ctrl-C)"
    )
    demo.add_argument(
        "--rate", type=positive, default=200.0, help="payments per second (default 200)"
    )
    demo.add_argument(
        "--port", type=int, help="gRPC port of the server (default 50051; 0 picks one)"
    )
    demo.add_argument("--model-repository", type=Path, help="model repository directory")
    demo.add_argument(
        "--log-dir",
        type=Path,
        help="write the server's and worker's logs here and keep them (default: a "
        "temporary directory, removed after a clean stop)",
    )

    serve = add("serve", cmd_serve, "Run the gRPC scoring server with its feature replica.")
    _common(serve, kafka_help="Kafka bootstrap server (required)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 50051; 0 picks one)")
    serve.add_argument("--model-repository", type=Path, help="model repository directory")
    serve.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics HTTP port (default 0: off)"
    )
    serve.add_argument(
        "--workers",
        type=at_least_one,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), each with all features (default 1)",
    )
    serve.add_argument(
        "--worker-port-base",
        type=int,
        help="worker i also listens on this port + i, its own, for clients that spread "
        "their calls (round_robin) evenly over the workers (default 0: off)",
    )
    serve.add_argument("--tls-cert-file", help="server certificate chain (PEM): TLS on")
    serve.add_argument("--tls-key-file", help="server private key (PEM)")
    serve.add_argument(
        "--tls-client-ca-file", help="CA for client certificates (PEM): mutual TLS on"
    )
    serve.add_argument(
        "--replay",
        action="store_true",
        default=None,
        help="features as of each request's event time (tests, backtests)",
    )

    worker = add("worker", cmd_worker, "Run a stream worker (Faust): validate and route events.")
    _common(worker, kafka_help="Kafka bootstrap server (required)")
    worker.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics HTTP port (default 0: off)"
    )

    broker = add("broker", cmd_broker, "Run the embedded Kafka-compatible broker (tansu).")
    _common(broker, kafka_help=None)
    broker.add_argument("--port", type=int, default=0, help="listen port (default: a free one)")

    triton = add(
        "triton",
        cmd_triton,
        "Run the local tritonserver (from .venv-triton) on the model repository, on loopback.",
    )
    _common(triton, kafka_help=None)
    triton.add_argument("--model-repository", type=Path, help="model repository directory")
    triton.add_argument(
        "--port", type=int, default=0, help="gRPC port (default: a free one; 8001 is Triton's)"
    )

    train = add("train", cmd_train, "Train the demo fraud model into the model repository.")
    _common(train, kafka_help=None)
    train.add_argument("--model-repository", type=Path, help="model repository directory")
    train.add_argument(
        "--version", type=at_least_one, help="version number to write (default: the next one)"
    )
    train.add_argument(
        "--replace",
        action="store_true",
        help="write over an existing --version (a server hot-reloads it under the same "
        "number); files in it that train does not write are kept",
    )
    train.add_argument(
        "--duration",
        type=positive,
        default=1800.0,
        help="seconds of synthetic traffic (default: %(default)g)",
    )
    train.add_argument(
        "--rate",
        type=positive,
        default=10.0,
        help="synthetic payments per second (default: %(default)g)",
    )
    train.add_argument("--seed", type=int, default=7, help="random seed (default: %(default)s)")
    train.add_argument(
        "--backend",
        type=str.lower,
        choices=BACKENDS,
        default="onnxruntime",
        help="what serves the version (metadata's backend; default: %(default)s): "
        "triton calls the Triton server at triton_url, which serves the same repository",
    )

    backfill = add(
        "backfill",
        cmd_backfill,
        "Point-in-time features for every event of a log (JSONL or Parquet).",
    )
    backfill.add_argument("events", type=Path, help="payment events: .jsonl or .parquet")
    backfill.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="feature rows: JSONL, or Parquet when it ends in .parquet",
    )
    backfill.add_argument("--no-progress", action="store_true", help="no progress bar")
    backfill.add_argument("--config", type=Path, help="TOML settings file (see README)")
    _log_arguments(backfill)

    features = add("features", cmd_features, "Show an entity's features (GetFeatures).")
    features.add_argument("entity_type", choices=["card", "merchant", "device", "ip"])
    features.add_argument("entity_id")
    _client_options(features)
    features.add_argument(
        "--as-of-ms", type=int, default=None, help="replay mode only (default: the server clock)"
    )

    rollout = add("rollout", cmd_rollout, "Show or change the model rollout (Admin API).")
    rollout.add_argument("action", choices=["show", "set", "promote", "rollback", "models"])
    _client_options(rollout)
    rollout.add_argument("--token", help="admin bearer token (or STREAMSCORE_ADMIN_TOKEN)")
    rollout.add_argument("--primary", help="set: primary version ('' = highest)")
    rollout.add_argument("--canary", help="set: canary version ('' = none)")
    rollout.add_argument("--percent", type=float, help="set: canary percent of cards")
    rollout.add_argument("--shadows", help="set: comma-separated shadow versions")
    rollout.add_argument("--reason", default="manual rollback", help="rollback: why")

    health_check = add("health", cmd_health, "Check a server's gRPC health (exit 0: SERVING).")
    _client_options(health_check)
    health_check.add_argument("--service", default="", help="service name ('' = the server)")
    health_check.add_argument("--timeout", type=positive, default=3.0, help="seconds (default 3)")
    health_check.add_argument(
        "--container",
        action="store_true",
        help="check what this container runs (PID 1): a serve or demo on its port, "
        "anything else (a worker) healthy while it runs",
    )

    config = add("config", cmd_config, "Print the effective settings, secrets masked.")
    config.add_argument("--config", type=Path, help="TOML settings file (see README)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from streamscore.gc_tuning import tune_for_large_state

    tune_for_large_state()
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # Its reader went away (`streamscore config | head -1`): quietly, as a tool
        # killed by SIGPIPE, and with nothing more written to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ValueError as error:  # bad settings
        _fatal(str(error), args)
        return 2
    except Exception as error:
        # What an operator gets wrong (a missing file, a broker or server not there, a
        # port in use) as one line; anything else is a bug: its traceback.
        message = _operator_error(error)
        if message is None:
            raise
        _fatal(message, args)
        return 2 if _refused_as_invalid(error) else 1


def _fatal(message: str, args: argparse.Namespace) -> None:
    """Why the command stops, as one line: a JSON log line under JSON logging (the one
    line that explains why a container exited must reach a JSON-only pipeline), else
    ``streamscore: MESSAGE``. The format is the one asked for, by flag or environment,
    even when the settings themselves were what failed."""
    from streamscore.logs import JsonFormatter, TextFormatter, flush_held_back

    flush_held_back()  # before: the line that says why it stopped stays the last
    asked = getattr(args, "log_format", None) or os.environ.get("STREAMSCORE_LOG_FORMAT")
    # The format our logging was set up with, if it was; another handler's (the host
    # process's, pytest's) says nothing about the format asked for.
    formatters = [h.formatter for h in logging.getLogger().handlers]
    ours = [f for f in formatters if isinstance(f, (JsonFormatter, TextFormatter))]
    formatter: logging.Formatter | None = ours[0] if ours else None
    if getattr(args, "client", False):
        # A command a person types (rollout, features, health): plain, unless asked.
        formatter = JsonFormatter() if (asked or "text").lower() == "json" else None
    elif formatter is None:
        formatter = JsonFormatter() if (asked or "json").lower() == "json" else None
    if isinstance(formatter, JsonFormatter):
        record = logging.LogRecord("streamscore", logging.CRITICAL, __file__, 0, message, (), None)
        print(formatter.format(record), file=sys.stderr)
    else:
        print(f"streamscore: {message}", file=sys.stderr)


def _one_line_triton_error(message: str) -> str:
    """``could not start tritonserver: WHY; tritonserver says:`` and its error lines,
    as one line: the lines joined, each without gRPC core's debug blob."""
    import re

    head, _, said = message.partition("; tritonserver says:")
    lines = [" ".join(re.sub(r"\{created_time.*$", "", line).split()) for line in said.splitlines()]
    said = " | ".join(line for line in lines if line)
    return f"{head} (tritonserver: {said})" if said else " ".join(head.split())


def _refused_as_invalid(error: Exception) -> bool:
    """A server that refused what the command sent it (a flag's value: a version it
    does not have, a reason too long): invalid input, exit 2, as a bad flag is; not
    the server missing (exit 1), which a script would otherwise not tell apart."""
    import grpc

    return isinstance(error, grpc.RpcError) and getattr(error, "code", lambda: None)() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
    )


def _operator_error(error: Exception) -> str | None:
    import grpc
    from aiokafka.errors import KafkaError

    from streamscore.processes import ChildExited, PartFailed
    from streamscore.server.backends.base import BackendUnavailable
    from streamscore.stream.broker import BrokerError
    from streamscore.triton_server import TritonServerError

    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"{error.strerror or error}: {error.filename}" if error.filename else str(error)
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, KafkaError):
        return f"Kafka: {error}"
    if isinstance(error, BackendUnavailable):  # Triton not there (yet): restart later
        return f"model backend unavailable: {error}"
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TritonServerError):  # not installed, or it could not start
        return _one_line_triton_error(str(error))
    if isinstance(error, ChildExited | BrokerError):  # a child of ours that could not start
        return str(error).splitlines()[0]  # (a broker's output follows, left out: its why is whole)
    if isinstance(error, PartFailed):
        return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main())

"""``streamscore serve --workers N``: N server processes on one port.

Each worker is a full ``streamscore serve`` process: its own event loop, model
backends and feature replica. The replica folds every entity-events partition, so
every worker answers every entity exactly (the feature engine's design: the state is
small and replicated, not sharded; see README "Scaling"). The kernel spreads new
connections over the workers' listening sockets (SO_REUSEPORT); a gRPC channel keeps
its connection, so spread comes from many clients (or channels), as behind a load
balancer.

The supervisor resolves the settings once and hands them to the workers through
``STREAMSCORE_*`` variables (so a config file, environment and flags mean the same
in every worker); worker i serves metrics on ``metrics_port + i`` and, with
``worker_port_base``, also gRPC on a port of its own, ``worker_port_base + i``, so that
a client with the ``round_robin`` policy can spread its calls evenly over the workers
(``spread_target``). SIGTERM / SIGINT are passed on (each worker drains). A worker
that dies on its own is started again while the others keep serving; only a crash
loop (more than ``RESTARTS_MAX`` deaths within ``RESTART_WINDOW_S``) stops the set, exit 1, for
the process manager.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import secrets
import time

from streamscore.config import Settings, settings_environment
from streamscore.logs import WORKER_INDEX_VARIABLE
from streamscore.processes import ChildProcess, stop_on_signals
from streamscore.server.model_repository import primary_dir
from streamscore.tls import check_server_files

log = logging.getLogger("streamscore.supervisor")

# A worker that dies is started again, unless more deaths than this came within the window
# (a crash loop: the set stops, for the process manager to see).
RESTARTS_MAX = 5
RESTART_WINDOW_S = 60.0

# Settings that name a port of worker 0; worker i gets that port + i.
_PER_WORKER_PORTS = ("metrics_port", "worker_port_base")


def worker_environment(settings: Settings, index: int) -> dict[str, str]:
    ports = {name: getattr(settings, name) for name in _PER_WORKER_PORTS}
    own = {name: port + index for name, port in ports.items() if port}
    # The set shares --port.
    return settings_environment(settings, **own, reuse_port=True)


def spread_target(host: str, port_base: int, workers: int) -> str:
    """The gRPC target naming every worker's own port on ``host`` (an IP address; a
    wildcard listen address stands for loopback), for a client that spreads its
    calls over them: channel option ``("grpc.lb_policy_name", "round_robin")``."""
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    text = f"[{address}]" if address.version == 6 else str(address)
    ports = ",".join(f"{text}:{port_base + i}" for i in range(workers))
    return f"ipv{address.version}:{ports}"


def check_ports(settings: Settings, workers: int) -> None:
    """Refuse (ValueError, a usage error), with the reason, ports that ``workers``
    processes could not all bind apart: each worker's own port and metrics port must be
    no other port of the set (SO_REUSEPORT would let a clash bind, silently)."""
    if workers > 1 and not settings.port:
        raise ValueError("--workers needs a fixed --port (port 0 would differ per worker)")
    ranges = {"--port": range(settings.port, settings.port + 1)}
    for name, base in (
        ("--metrics-port", settings.metrics_port),
        ("--worker-port-base", settings.worker_port_base),
    ):
        if not base:
            continue
        if base + workers - 1 > 65535:
            raise ValueError(f"{name} {base} leaves no room for {workers} ports")
        ranges[name] = range(base, base + workers)
    names = list(ranges)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if set(ranges[first]) & set(ranges[second]):
                raise ValueError(
                    f"{first} and {second} overlap (ports {_span(ranges[first])} and "
                    f"{_span(ranges[second])})"
                )


def _span(ports: range) -> str:
    return str(ports.start) if len(ports) == 1 else f"{ports.start}-{ports[-1]}"


async def serve_workers(settings: Settings, workers: int) -> int:
    """Run the set until a signal; a worker that dies is started again (its replica
    rebuilds from the log meanwhile, its connections go to the others), unless workers
    died more than ``RESTARTS_MAX`` times within ``RESTART_WINDOW_S`` (the set stops,
    exit 1, for the process manager), or one stopped on what it was given (exit 2: a
    model that does not load), which no restart mends (exit 2 at once). The caller
    checked the ports (``check_ports``) before anything started; the TLS files (a
    ``TlsError``) and that the repository holds the version to serve
    (FileNotFoundError) are checked here."""
    # Each worker would die of a bad TLS file, again at each restart, until the set gave
    # up on "workers keep dying" with the cause buried in their output: refuse once,
    # with the reason, as a lone serve does.
    # A repository without the model (a wrong path or name, a pinned version not
    # there) likewise: each worker would stop on it.
    primary_dir(settings.model_repository, settings.model_name, settings.model_version)
    check_server_files(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
        warn_expiry=False,  # each worker warns, as it serves the certificate
    )
    stop = stop_on_signals()
    if not settings.card_hash_key:
        # One key for the set, so that its workers' card hashes match each other.
        settings = dataclasses.replace(settings, card_hash_key=secrets.token_hex(32))
        if settings.decision_log:
            log.warning(
                "card_hash_key is not set: card hashes match across this set's workers, "
                "not after a restart"
            )

    def worker(i: int) -> ChildProcess:
        # Its index on each of its log lines: the set's lines are merged into one stream.
        env = {**worker_environment(settings, i), WORKER_INDEX_VARIABLE: str(i)}
        return ChildProcess.streamscore(f"server-{i}", "serve", "--workers", "1", env=env)

    children = [worker(i) for i in range(workers)]
    for child in children:
        await child.start()
    extra: dict[str, object] = {"workers": workers, "port": settings.port}
    if settings.worker_port_base:
        try:
            extra["spread_target"] = spread_target(
                settings.host, settings.worker_port_base, workers
            )
        except ValueError:  # a host name: clients list its ports themselves
            base = settings.worker_port_base
            extra["worker_ports"] = _span(range(base, base + workers))
    log.info("workers started", extra=extra)
    stopped = asyncio.ensure_future(stop.wait())
    deaths: list[float] = []
    failed = 0  # the set's exit status
    while True:
        died = {asyncio.ensure_future(child.exited.wait()): i for i, child in enumerate(children)}
        await asyncio.wait([stopped, *died], return_when=asyncio.FIRST_COMPLETED)
        for task in died:
            task.cancel()
        if stopped.done():
            break
        now = time.monotonic()
        dead = [i for i, child in enumerate(children) if child.exited.is_set()]
        misconfigured = next((i for i in dead if children[i].returncode == 2), None)
        if misconfigured is not None:
            # Exit 2: what it was given cannot work (a model that does not load,
            # invalid metadata), and would not at any restart: stop now, not after
            # six deaths, with the cause in its own line just above.
            log.error(
                "a worker stopped on what it was given (exit 2, the reason above): "
                "stopping the set",
                extra={"worker": misconfigured},
            )
            failed = 2
            break
        deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now] * len(dead)
        if len(deaths) > RESTARTS_MAX:
            log.error(
                "workers keep dying, stopping the set",
                extra={"deaths": len(deaths), "window_s": RESTART_WINDOW_S},
            )
            failed = 1
            break
        for i in dead:
            # The worker's index, as on its own lines (logs.PROCESS_FIELDS).
            log.error("worker exited, starting it again", extra={"worker": i})
            children[i] = worker(i)
            await children[i].start()
    # Each worker drains on SIGTERM; allow for its drain delay and timeout.
    timeout = settings.drain_delay_s + settings.drain_timeout_s + 10
    await asyncio.gather(*(child.stop(timeout=timeout) for child in children))
    stopped.cancel()
    return failed


__all__ = ["check_ports", "serve_workers", "spread_target", "worker_environment"]

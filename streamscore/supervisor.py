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
that dies on its own is started again while the others keep serving, after a delay
that grows with its deaths; only a crash loop of the whole set (none of its workers
up, more than ``RESTARTS_MAX`` deaths within ``RESTART_WINDOW_S``) stops it, exit 1,
for the process manager.
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

# A worker that dies is started again: at once the first time within the window, then
# after a delay that doubles with each death of it there, up to a ceiling (a worker
# that cannot start now, its broker gone, retries every half minute, not five times a
# second). The set stops, for the process manager to see, only when none of its workers
# is up and more deaths than RESTARTS_MAX came within the window: a crash loop of the
# whole set. One worker's deaths never stop the others, which still answer (a broker
# outage, during which a restarted worker cannot start, turned one worker's OOM kill
# into the whole set's exit).
RESTARTS_MAX = 5
RESTART_WINDOW_S = 60.0
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0

# Settings that name a port of worker 0; worker i gets that port + i.
_PER_WORKER_PORTS = ("metrics_port", "worker_port_base")


class RestartPolicy:
    """When a dead worker starts again, and when the set gives up (module constants)."""

    def __init__(self) -> None:
        self._deaths: dict[int, list[float]] = {}  # worker -> its deaths within the window

    def died(self, worker: int, now: float) -> float:
        """Count a death of ``worker``: the seconds to wait before starting it again."""
        deaths = [t for t in self._deaths.get(worker, ()) if now - t < RESTART_WINDOW_S]
        deaths.append(now)
        self._deaths[worker] = deaths
        if len(deaths) == 1:
            return 0.0
        return min(RESTART_DELAY_MAX_S, RESTART_DELAY_S * 2 ** (len(deaths) - 2))

    def gives_up(self, workers_up: int, now: float) -> bool:
        """Whether the set stops: none of its workers up, and more than
        ``RESTARTS_MAX`` deaths within the window, all workers' together."""
        recent = sum(1 for ts in self._deaths.values() for t in ts if now - t < RESTART_WINDOW_S)
        return workers_up == 0 and recent > RESTARTS_MAX


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
    rebuilds from the log meanwhile, its connections go to the others) by
    ``RestartPolicy``, unless none is up after more than ``RESTARTS_MAX`` deaths within
    ``RESTART_WINDOW_S`` (the set stops, exit 1, for the process manager), or one
    stopped on what it was given (exit 2: a model that does not load), which no
    restart mends (exit 2 at once). The caller checked the ports (``check_ports``)
    before anything started; the TLS files (a ``TlsError``) and that the repository
    holds the version to serve (FileNotFoundError) are checked here."""
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
    policy = RestartPolicy()
    restart_at: dict[int, float] = {}  # dead workers -> when each starts again
    failed = 0  # the set's exit status
    while True:
        died = {
            asyncio.ensure_future(child.exited.wait()): i
            for i, child in enumerate(children)
            if i not in restart_at
        }
        wake = min(restart_at.values(), default=None)
        await asyncio.wait(
            [stopped, *died],
            timeout=None if wake is None else max(0.0, wake - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in died:
            task.cancel()
        if stopped.done():
            break
        now = time.monotonic()
        dead = [i for i in died.values() if children[i].exited.is_set()]
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
        for i in dead:
            restart_at[i] = now + policy.died(i, now)
        if policy.gives_up(len(children) - len(restart_at), now):
            log.error(
                "workers keep dying and none is up, stopping the set",
                extra={"window_s": RESTART_WINDOW_S},
            )
            failed = 1
            break
        for i in dead:
            # The worker's index, as on its own lines (logs.PROCESS_FIELDS).
            delay = round(restart_at[i] - now, 1)
            log.error(
                "worker exited, starting it again" + (f" in {delay} s" if delay else ""),
                extra={"worker": i, "returncode": children[i].returncode},
            )
        for i, at in sorted(restart_at.items()):
            if at <= time.monotonic():
                del restart_at[i]
                children[i] = worker(i)
                await children[i].start()
    # Each worker drains on SIGTERM; allow for its drain delay and timeout.
    timeout = settings.drain_delay_s + settings.drain_timeout_s + 10
    await asyncio.gather(*(child.stop(timeout=timeout) for child in children))
    stopped.cancel()
    return failed


__all__ = ["check_ports", "serve_workers", "spread_target", "worker_environment"]

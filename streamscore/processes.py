"""Child processes with the project's lifecycle: async start/stop, stop is idempotent.

Used by the demo (broker, worker and server run as separate processes, as in
production) and by tests that need real processes to kill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from streamscore._pdeathsig import launcher
from streamscore.logs import flush_held_back

log = logging.getLogger("streamscore.processes")


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: the one way our long-running commands stop.

    A second signal ends the process at once (``exit_now``), as a second Ctrl-C does
    in most servers: a stop is bounded (drain, flushes), but whoever sends a second
    signal has decided not to wait for it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signalled: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if signalled:
            exit_on_second_signal(sig)
        signalled.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


def exit_on_second_signal(sig: signal.Signals) -> NoReturn:
    exit_now(f"{sig.name} again while stopping: exiting now, the stop unfinished", sig)


def exit_now(message: str, sig: signal.Signals | None = None) -> NoReturn:
    """End the process at once, with no cleanup, after ``message`` at critical: for a
    stop cut short. Exit status 128 + the signal's number when one asked for it, as a
    process killed by that signal reports; else 1. Children started by ChildProcess
    die with it (PR_SET_PDEATHSIG); temporary directories are left behind."""
    flush_held_back()  # before: the line that says why it stopped stays the last
    log.critical(message)
    logging.shutdown()
    os._exit(128 + sig if sig is not None else 1)


class ChildExited(RuntimeError):
    """A child process ended while it was supposed to be running."""


class PartFailed(RuntimeError):
    """A running process stopped because a part it needs died (a server's feature
    replica, say: ``ScoringServer.failed``)."""


class ChildProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()

    @classmethod
    def streamscore(cls, name: str, *args: str, **kwargs: object) -> ChildProcess:
        """A ``streamscore`` subcommand run with this interpreter."""
        return cls(name, [sys.executable, "-m", "streamscore", *args], **kwargs)  # type: ignore[arg-type]

    @classmethod
    def serve(
        cls,
        name: str,
        bootstrap: str,
        port: int,
        repository: str | os.PathLike[str],
        *args: str,
        module: str = "streamscore",
        **kwargs: object,
    ) -> ChildProcess:
        """``serve`` on ``port`` over the broker ``bootstrap``, with text logs (tests and
        load tools read them); ``module``: the one run with ``python -m`` (a load tool
        may serve through a module of its own, with the same command line)."""
        argv = [sys.executable, "-m", module, "serve", "--kafka", bootstrap, "--port", str(port)]
        argv += ["--model-repository", os.fspath(repository), "--log-format", "text", *args]
        return cls(name, argv, **kwargs)  # type: ignore[arg-type]

    async def start(self) -> None:
        # Opened once at start; the child writes to it directly.
        output = open(self.log_path, "ab") if self.log_path else None  # noqa: ASYNC230
        try:
            self.process = await asyncio.create_subprocess_exec(
                *launcher(self.argv),
                env={**os.environ, **(self.env or {})},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output or asyncio.subprocess.DEVNULL,
                stderr=output or None,
                cwd=self.cwd,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        finally:
            if output:
                output.close()
        self._watch = asyncio.create_task(self._watch_exit(), name=f"watch-{self.name}")
        log.info("started %s", self.name, extra={"pid": self.process.pid})

    async def _watch_exit(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        self.exited.set()
        if not self._stopping:
            log.error("%s exited unexpectedly", self.name, extra={"returncode": code})

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def check_running(self) -> None:
        if self.exited.is_set():
            raise ChildExited(f"{self.name} exited with code {self.returncode}")

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.process is not None and self.process.returncode is None:
            self._stopping = True
            self.process.kill()

    async def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        self._stopping = True
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("%s ignored SIGTERM for %.0f s, killing", self.name, timeout)
                process.kill()
                await process.wait()
        if self._watch is not None:
            await self._watch
        self.process = None

"""Embedded Triton: a real ``tritonserver`` child process on a free loopback port.

The binary comes from the PyPI package ``nvidia-pytriton``, installed in its own
virtual environment (``.venv-triton``, made by ``scripts/setup_triton.sh``) because
that package pins numpy<2 and an older protobuf. Only the server runs from there; we
talk to it with ``tritonclient`` from our own environment.

``EmbeddedTriton`` shares its lifecycle with ``stream.broker.EmbeddedBroker``
(``loopback_process.LoopbackServerProcess``): start on a free port (retrying when the
port turns out to be taken), wait until the server is ready, SIGTERM then SIGKILL (of
its whole process group: the python-backend stubs too) on stop, output to a log file
(never an undrained pipe), killed with its parent (PR_SET_PDEATHSIG) even if we are
SIGKILLed.

What the bare binary needs, found the hard way:

- ``LD_LIBRARY_PATH``: the wheel's ``nvidia_pytriton.libs`` (libtritonserver and
  friends), and the lib directory of the Python that ``.venv-triton`` was made
  from, first: the python-backend stub links ``libpython3.X.so.1.0`` and must get
  the interpreter the venv runs on, not some other ``libpython3.X`` on the system.
- ``PATH`` with ``.venv-triton/bin`` first: the stub's embedded Python takes its
  ``sys.path`` (numpy, onnxruntime) from the ``python3`` first on PATH.
- ``--backend-directory`` = the wheel's ``tritonserver/backends``, whose ``python/``
  holds the stub for the venv's Python version (copied there by the setup script,
  as PyTriton does in its workspace).
- HTTP and metrics are off (``--allow-http=false --allow-metrics=false``); gRPC
  listens on 127.0.0.1 only. Models load explicitly: all at start
  (``--model-control-mode=explicit --load-model=*``), others later with
  ``load_model``. ``--exit-timeout-secs`` bounds a graceful stop.
- The GPU probe logs a CUDA warning and an error line on machines without a GPU;
  harmless, CPU models run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamscore.loopback_process import (
    LOOPBACK,
    LoopbackServerProcess,
    accepts_tcp,
)

__all__ = [
    "EmbeddedTriton",
    "TritonInstall",
    "TritonServerError",
    "default_triton_venv",
]

logger = logging.getLogger("streamscore.triton")

_ADDR_IN_USE = "already in use"  # "Socket '127.0.0.1:PORT' already in use"
_PROBE_S = 1.0
_ERROR_LINE = re.compile(r"^(E\d{4} |error: )")
VENV_ENV = "STREAMSCORE_TRITON_VENV"
_SETUP_HINT = "run scripts/setup_triton.sh (or point $STREAMSCORE_TRITON_VENV at such a venv)"


class TritonServerError(RuntimeError):
    """tritonserver is not installed, did not start, or a repository call failed."""


def default_triton_venv() -> Path:
    """``$STREAMSCORE_TRITON_VENV``, else the first ``.venv-triton`` found in the
    current directory, next to the running venv, or in this source tree's root."""
    env = os.environ.get(VENV_ENV)
    if env:
        return Path(env)
    candidates = [
        Path.cwd() / ".venv-triton",
        Path(sys.prefix).parent / ".venv-triton",
        Path(__file__).resolve().parent.parent / ".venv-triton",
    ]
    for candidate in candidates:
        if (candidate / "bin" / "python").exists():
            return candidate
    return candidates[0]


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a ``.venv-triton`` installation are."""

    venv: Path
    python_version: str  # "3.11"
    python_libdir: Path  # holds libpython3.X.so.1.0
    binary: Path
    backends: Path
    libs: Path  # nvidia_pytriton.libs

    @classmethod
    def locate(cls, venv: str | os.PathLike[str] | None = None) -> TritonInstall:
        """Find tritonserver in ``venv`` (default: ``default_triton_venv()``).

        Raises:
            TritonServerError: no such venv, or it lacks nvidia-pytriton or the stub.
        """
        return _locate(Path(venv).absolute() if venv is not None else default_triton_venv())

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment tritonserver runs with (see the module docstring)."""
        env = dict(os.environ if base is None else base)
        # Anything that would steer the stub's Python elsewhere than the venv.
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
            env.pop(name, None)
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = os.pathsep.join(p for p in (str(self.venv / "bin"), env.get("PATH", "")) if p)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(self.python_libdir), str(self.libs), env.get("LD_LIBRARY_PATH")) if p
        )
        return env


@functools.lru_cache(maxsize=8)
def _locate(venv: Path) -> TritonInstall:
    python = venv / "bin" / "python"
    if not python.exists():
        raise TritonServerError(f"no Triton venv at {venv}; {_SETUP_HINT}")
    probe = (
        "import json, sys, sysconfig; print(json.dumps({"
        "'version': '%d.%d' % sys.version_info[:2], "
        "'libdir': sysconfig.get_config_var('LIBDIR'), "
        "'purelib': sysconfig.get_paths()['purelib']}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-I", "-c", probe], capture_output=True, check=True, timeout=30
        ).stdout
        info = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise TritonServerError(f"cannot run {python}: {exc}") from exc
    site = Path(info["purelib"])
    root = site / "pytriton" / "tritonserver"
    install = TritonInstall(
        venv=venv,
        python_version=info["version"],
        python_libdir=Path(info["libdir"] or (Path(sys.base_prefix) / "lib")),
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        libs=site / "nvidia_pytriton.libs",
    )
    if not install.binary.is_file():
        raise TritonServerError(
            f"no tritonserver binary in {venv} ({install.binary}); {_SETUP_HINT}"
        )
    if not (install.backends / "python" / "triton_python_backend_stub").is_file():
        raise TritonServerError(
            f"the python-backend stub is missing from {install.backends / 'python'}; {_SETUP_HINT}"
        )
    return install


class EmbeddedTriton(LoopbackServerProcess):
    """One tritonserver process serving ``model_repository`` over gRPC on loopback."""

    label = "tritonserver"
    log_name = "tritonserver"
    error = TritonServerError
    logger = logger

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        venv: str | os.PathLike[str] | None = None,
        port: int | None = None,
        models: Sequence[str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        exit_timeout_s: int = 5,
        port_attempts: int = 3,
        log_dir: str | os.PathLike[str] | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Configure (but do not start) the server.

        Args:
            model_repository: the Triton model repository (``triton_repo`` writes it).
            venv: the Triton venv; ``None``: ``default_triton_venv()``.
            port: fixed gRPC port; ``None`` picks a free one (and retries on a clash).
            models: models to load at start; ``None``: every model in the repository.
            start_timeout: seconds, per attempt, to wait for the server and its
                models to be ready (model loading is most of startup).
            stop_timeout: seconds to wait after SIGTERM before SIGKILL.
            exit_timeout_s: tritonserver's own bound on a graceful shutdown.
            port_attempts: ports to try when they turn out to be taken.
            log_dir: where the server's output file goes; default: a temp directory
                (removed by ``stop()``).
            log_verbose: tritonserver's ``--log-verbose`` level.
            extra_args: more tritonserver flags, appended last.
        """
        super().__init__(
            port=port,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            port_attempts=port_attempts,
            log_dir=log_dir,
        )
        self.model_repository = Path(model_repository).absolute()
        self._venv = venv
        self._models = list(models) if models is not None else None
        self._exit_timeout_s = exit_timeout_s
        self._log_verbose = log_verbose
        self._extra_args = list(extra_args)
        self._server_id = ""
        self._shm_prefix = ""
        self.startup_s: float | None = None  # launch to ready, of the last start()

    # -- properties ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """``"127.0.0.1:PORT"``, the gRPC address for tritonclient."""
        return f"{LOOPBACK}:{self.port}"

    def log_errors(self, max_lines: int = 20) -> list[str]:
        """The server's error lines (``E...`` log records, ``error: ...``) so far."""
        if self._log_path is None:
            return []
        try:
            text = self._log_path.read_text("utf-8", "replace")
        except OSError:
            return []
        lines = [line for line in text.splitlines() if _ERROR_LINE.match(line)]
        # Without a GPU, Triton always logs this one; it means nothing for CPU models.
        lines = [line for line in lines if "CudaDriverHelper" not in line]
        return lines[-max_lines:]

    def log_tail(self, max_chars: int = 3000) -> str:
        return self._log_bytes(max_chars).decode("utf-8", "replace")

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start tritonserver and wait until it and its startup models are ready.

        Raises:
            TritonServerError: not installed, kept exiting (ports taken, a model that
                fails to load), or not ready within ``start_timeout``; the message
                carries the tail of the server's output.
        """
        if self._proc is not None:
            raise TritonServerError("tritonserver already started")
        install = await asyncio.to_thread(TritonInstall.locate, self._venv)
        last_error = ""
        for attempt in range(1, self._port_attempts + 1):
            port = self._next_port()
            t0 = time.monotonic()
            self._server_id = f"streamscore-{os.getpid()}-{secrets.token_hex(4)}"
            self._shm_prefix = f"{self._server_id}-shm-"
            # In this (the loop's) thread: PDEATHSIG fires when the forking *thread*
            # ends, so never launch from a worker thread. Its cwd is the log directory.
            self._launch(
                self._argv(install, port),
                port,
                env=install.env(),
                cwd_log_dir=True,
                when_forgotten=functools.partial(_remove_shm, self._shm_prefix),
            )
            outcome = await self._ready_or_abandon(port)
            if outcome is None:
                self.startup_s = time.monotonic() - t0
                logger.info(
                    "tritonserver ready on %s:%d (pid %s) in %.2fs",
                    LOOPBACK,
                    port,
                    self.pid,
                    self.startup_s,
                )
                return
            errors = "\n".join(self.log_errors()) or self.log_tail(1500)
            await self._terminate()
            last_error = f"{outcome}; tritonserver says:\n{errors}"
            if outcome != "port in use":
                break
            logger.warning(
                "tritonserver port %d taken (attempt %d/%d)", port, attempt, self._port_attempts
            )
        self._remove_log_dir()
        raise TritonServerError(f"could not start tritonserver: {last_error}")

    def kill(self) -> None:
        """SIGKILL the server and its model processes, as a crash would (tests).

        ``stop()`` still has to be called to clean up."""
        if self._proc is not None:
            _kill_group(self._proc)

    async def load_model(self, name: str, *, timeout: float = 60.0) -> None:
        """(Re)load ``name`` from the repository: picks up versions written since."""
        await self._repository_call("load_model", name, timeout)

    # -- internals ------------------------------------------------------------------

    async def _repository_call(self, method: str, name: str, timeout: float) -> None:
        from tritonclient.grpc import aio as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        try:
            await getattr(client, method)(name, client_timeout=timeout)
        except InferenceServerException as exc:
            raise TritonServerError(f"{method}({name!r}) failed: {exc.message()}") from exc
        finally:
            await client.close()

    def _argv(self, install: TritonInstall, port: int) -> list[str]:
        argv = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backends}",
            "--allow-http=false",
            "--allow-metrics=false",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={port}",
            # Without SO_REUSEPORT a taken port is an error, not a shared socket.
            "--reuse-grpc-port=false",
            # A unique id, checked at readiness: the answer must come from our server.
            f"--id={self._server_id}",
            # Our own names for the python backend's shared-memory regions, so that
            # those a killed server leaves in /dev/shm can be found and removed.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--model-control-mode=explicit",
            f"--exit-timeout-secs={self._exit_timeout_s}",
            f"--log-verbose={self._log_verbose}",
        ]
        models = ["*"] if self._models is None else self._models
        argv += [f"--load-model={name}" for name in models]
        return argv + self._extra_args

    async def _wait_ready(self, port: int) -> str | None:
        """``None`` once the server (and so its startup models) is ready, else why not."""
        from tritonclient.grpc import aio as grpcclient
        from tritonclient.utils import InferenceServerException

        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        client: Any = None
        try:
            while True:
                if self._proc.poll() is not None:
                    why = "port in use" if _ADDR_IN_USE in self.log_tail() else "exited"
                    if why == "exited":
                        why += f" (tritonserver exit status {self._proc.returncode})"
                    return why
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return f"timeout: not ready within {self._start_timeout}s"
                # gRPC starts listening after the startup models have loaded, so
                # probe with a plain connect first (no client error logging).
                if await accepts_tcp(port, min(remaining, _PROBE_S)):
                    if client is None:
                        client = grpcclient.InferenceServerClient(f"{LOOPBACK}:{port}")
                    with contextlib.suppress(InferenceServerException):
                        probe_s = min(remaining, _PROBE_S)
                        metadata = await client.get_server_metadata(client_timeout=probe_s)
                        if metadata.name != self._server_id:
                            # Someone else answers on "our" port: wait for ours to fail.
                            await asyncio.sleep(0.2)
                            continue
                        if await client.is_server_ready(client_timeout=probe_s):
                            return None
                await asyncio.sleep(0.05)
        finally:
            if client is not None:
                await client.close()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        _kill_group(proc)

    def _after_exit(self, proc: subprocess.Popen[bytes]) -> None:
        _remove_shm(self._shm_prefix)


def _remove_shm(prefix: str) -> None:
    """Unlink the shared-memory regions named ``prefix*`` (a graceful stop leaves
    none; a killed server leaves one per model instance, 1 MiB each)."""
    if not prefix:
        return
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        for path in shm.glob(glob.escape(prefix) + "*"):
            with contextlib.suppress(OSError):
                path.unlink()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL tritonserver and what it started (python-backend stubs): its process
    group, which is its own (``start_new_session``). Stubs outlive a killed server
    by several seconds otherwise. Only before we have reaped the leader: until then
    its pid (so the group id) cannot be reused by anyone else."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()

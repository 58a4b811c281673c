"""The versions a server holds: ``ModelRegistry`` loads, warms up, swaps atomically and
hot-reloads them from the repository.

The registry holds the primary version (a ``ServedModel``, served_model.py); its
watcher polls the repository (a fingerprint of version directories and metadata,
model_repository.py, once a second) and on a change loads the new version fully
(backend started, latency model seeded by warm-up batches) before one reference
assignment makes it current. The old version is stopped only once every call that
started on it has finished, so a reload fails no request. Other versions (a canary,
shadows) are loaded by name and version, and reloaded when their files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.backends.factory import backend_module_pending, import_backend_modules
from streamscore.server.model import ModelMetadata, version_dirs
from streamscore.server.model_repository import (
    ModelRepository,
    primary_dir,
    repository_fingerprint,
    version_fingerprint,
)
from streamscore.server.served_model import (
    BatchingSettings,
    ModelLoadError,
    ServedModel,
)
from streamscore.tasks import cancel_and_wait, in_daemon_thread, start_background

log = logging.getLogger("streamscore.models")


# A version that failed to load is tried again after this long, then twice as long
# each time up to the cap, while the repository stays as it was.
RELOAD_RETRY_S = 2.0
RELOAD_RETRY_MAX_S = 60.0


class ModelRegistry:
    """The primary model version, hot-reloaded from the repository, and any other
    versions loaded by name and version (canary, shadow: ``load``/``get``/``unload``)."""

    def __init__(
        self,
        repository: Path,
        name: str,
        *,
        version: str = "",
        batching: BatchingSettings = BatchingSettings(),
        triton_url: str = "",
        torch_device: str = "auto",
        onnx_kernel: str = "auto",
        reload_interval_s: float = 1.0,
        reload_retry_s: float = RELOAD_RETRY_S,
    ) -> None:
        self.repository = repository
        self.name = name
        self.pinned_version = version
        self.batching = batching
        self.triton_url = triton_url
        self.torch_device = torch_device
        self.onnx_kernel = onnx_kernel
        self.reload_interval_s = reload_interval_s
        self.reload_retry_s = reload_retry_s
        self.reloads = 0
        self.reload_failures = 0
        self._primary: ServedModel | None = None
        self._fingerprint = ""
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._others: dict[tuple[str, str], ServedModel] = {}
        # A version whose reload failed: (its files' fingerprint then, retry after).
        self._failed_others: dict[tuple[str, str], tuple[str, float]] = {}
        # Why this server's last load of a version failed, and its files' fingerprint
        # then, by (name, version); gone once one succeeds. For ListModels (the log
        # has it too, but not the caller): see ``load_error``.
        self._load_errors: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = asyncio.Lock()  # one load/swap at a time (watcher, reload, load)
        # Versions a hot reload must not stop when it replaces the primary: the
        # rollout's (RolloutManager sets it); they stay loaded, as by ``load``.
        self.keep: Callable[[str], bool] = lambda version: False
        # The primary version a rollout pins ("" for none: the registry's answers), set
        # by the rollout: for the log line of a reload that is not what answers.
        self.rollout_primary: Callable[[], str] = lambda: ""

    @property
    def primary(self) -> ServedModel:
        assert self._primary is not None, "registry not started"
        return self._primary

    def _backends_named(self) -> set[str]:
        """The backends the model's version directories name (unreadable ones skipped:
        their own loads say why)."""
        repository = ModelRepository(self.repository)
        named = set()
        for version in repository.versions(self.name):
            with contextlib.suppress(OSError, ValueError):
                named.add(repository.metadata(self.name, version).backend)
        return named

    async def _build(self, directory: Path) -> ServedModel:
        """``_served``, its backend's library imported first off the event loop when
        it is not yet (torch: ~2 s of CPU, which held a serving loop that long; in a
        thread the loop still runs, with pauses while the import holds the GIL). The
        version itself is built on the loop, as before: once its library is there,
        that is cheap, and its model files load in ``start``, off the loop."""
        with contextlib.suppress(OSError, ValueError):  # the build says what is wrong
            backend = ModelMetadata.load(directory / "metadata.json").backend
            if backend_module_pending(backend):
                await in_daemon_thread(
                    lambda: import_backend_modules({backend}), name="backend-import"
                )
        return self._served(directory)

    def _served(self, directory: Path) -> ServedModel:
        return ServedModel(
            directory,
            batching=self.batching,
            triton_url=self.triton_url,
            torch_device=self.torch_device,
            onnx_kernel=self.onnx_kernel,
        )

    def _scan(self) -> str:
        """The fingerprint of what the primary is loaded from: the pinned version alone
        (another version added or changed does not reload and re-warm it), or every
        version."""
        return repository_fingerprint(self.repository, self.name, self.pinned_version)

    def _target_dir(self) -> Path:
        return primary_dir(self.repository, self.name, self.pinned_version)

    async def _load(self, directory: Path | None = None) -> ServedModel:
        directory = directory or self._target_dir()
        with self._noting_load_errors(directory):
            served, timings = await self._started(directory)
        log.info(
            "model version ready",
            extra={
                "model": served.metadata.name,
                "version": served.metadata.version,
                "backend": served.metadata.backend,
                "warmup_us": {n: round(s * 1e6) for n, s in timings.items() if math.isfinite(s)},
            },
        )
        return served

    async def _started(self, directory: Path) -> tuple[ServedModel, dict[int, float]]:
        """The version built and started, and its warm-up timings; a version that does
        not load raises one line that says why."""
        try:
            served = await self._build(directory)
            return served, await served.start()
        except (FileNotFoundError, PermissionError) as error:
            # A version without its metadata or model file, or one not readable: as
            # bad a version as a corrupt file (no restart mends it).
            raise ModelLoadError(f"model version {directory} does not load: {error}") from error
        except (ValueError, OSError, BackendUnavailable):
            raise  # says what is wrong: bad metadata, Triton not there
        except Exception as error:
            # A corrupt or truncated model file: a backend's own error type (an
            # onnxruntime InvalidProtobuf), which would end a start in a traceback.
            raise ModelLoadError(
                f"model version {directory} does not load: {type(error).__name__}: {error}"
            ) from error

    @contextlib.contextmanager
    def _noting_load_errors(self, directory: Path) -> Iterator[None]:
        """Note why a load of ``directory`` failed (see :meth:`load_error`), or forget
        a failure noted before once one succeeds."""
        key = (self.name, directory.name)
        try:
            yield
        except Exception as error:
            # One form whichever way it was loaded: the cause, not the wrapper that
            # names the version's directory (the listing names the version).
            cause = error.__cause__ if isinstance(error, ModelLoadError) else None
            reason = cause if isinstance(cause, Exception) else error
            self._load_errors[key] = (f"{type(reason).__name__}: {reason}", _files_of(directory))
            raise
        self._load_errors.pop(key, None)

    def load_error(self, name: str, version: str) -> str:
        """Why this server's last load of a version failed ("" when it did not), and
        whether its files have changed since: a version mended on disk still said only
        why it had failed, until something loaded it again."""
        noted = self._load_errors.get((name, version))
        if noted is None:
            return ""
        error, files = noted
        if _files_of(self.repository / name / version) != files:
            return f"{error} (its files have changed since; not loaded again yet)"
        return error

    async def start(self) -> None:
        # The libraries of every backend the repository's versions name, before serving:
        # a version published or named by the rollout later then loads without them.
        await in_daemon_thread(
            lambda: import_backend_modules(self._backends_named()), name="backend-imports"
        )
        self._fingerprint = self._scan()
        try:
            self._primary = await self._load()
        except Exception as error:
            # The newest version does not load: serve the newest one that does, as a
            # running server keeps its version when a new one fails (a restart, or a
            # scale-up, during a bad publish would otherwise fail outright). The
            # watcher tries the newest again (an empty fingerprint is a change).
            older = None if self.pinned_version else await self._load_an_older_one(error)
            if older is None:
                raise
            self._primary, self._fingerprint = older, ""
        if self.reload_interval_s > 0:
            self._watcher = start_background(
                self._watch(),
                name="model-watcher",
                log=log,
                failure="model watcher stopped; new versions are not loaded",
            )

    async def _load_an_older_one(self, error: Exception) -> ServedModel | None:
        """After the newest version failed to load with ``error``: the newest version
        below it that loads (the failures logged), or None."""
        versions = version_dirs(self.repository, self.name)
        if len(versions) < 2:
            return None  # (none at all: the caller raises the load's own error)
        newest, *older = reversed(versions)
        for directory in older:
            try:
                served = await self._load(directory)
            except Exception:
                log.exception("model version failed to load", extra={"version": directory.name})
                continue
            log.error(
                "the newest model version failed to load: serving an older one until it does",
                exc_info=error,
                extra={"version": served.metadata.version, "newest": newest.name},
            )
            return served
        return None

    def get(self, name: str, version: str) -> ServedModel:
        """A loaded version: the primary or one added by ``load``; KeyError otherwise."""
        primary = self._primary
        if primary is not None and primary.key == (name, str(version)):
            return primary
        try:
            return self._others[(name, str(version))]
        except KeyError:
            raise KeyError(f"model {name!r} version {version!r} is not loaded") from None

    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of every loaded version, the primary first. (Also read on
        the metrics thread: over a copy of the others, made in C, which a version
        loaded or unloaded on the loop meanwhile cannot change under it.)"""
        keys = [] if self._primary is None else [self._primary.key]
        return keys + [key for key in dict(self._others) if key not in keys]

    async def load(self, name: str, version: str) -> ServedModel:
        """Load, start and warm up a version next to the primary (e.g. a canary or a
        shadow); the already loaded one if there is one. Hot-reloaded as the primary
        is, when its files change (``_reload_others``)."""
        async with self._lock:
            with contextlib.suppress(KeyError):
                return self.get(name, version)
            directory = ModelRepository(self.repository).version_path(name, version)
            served = await self._load(directory)
            self._others[served.key] = served
            return served

    async def unload(self, name: str, version: str) -> None:
        """Stop a version added by ``load`` once its in-flight calls are done."""
        async with self._lock:
            served = self._others.pop((name, str(version)), None)
        if served is not None:
            await served.stop()

    async def reload(self) -> bool:
        """Load the repository's target version and swap it in; False if unchanged.
        Then the other loaded versions whose files changed (each failure logged)."""
        async with self._lock:
            try:
                return await self._reload()
            finally:  # a primary that fails to load holds back no other version
                await self._reload_others()

    async def _reload_others(self) -> None:
        """A canary or shadow (or a primary the rollout names) replaced in place
        (``train --replace``) is loaded again and swapped in, as the primary is: it
        kept answering with the model no longer on disk, under the same version. A
        load that fails keeps the loaded one and is tried again when the files change
        again, or after ``RELOAD_RETRY_MAX_S``."""
        now = time.monotonic()
        for key, served in list(self._others.items()):
            directory = served.directory
            if not directory.is_dir():
                continue  # deleted: the rollout's business (it keeps what it loaded)
            fingerprint = version_fingerprint(directory)
            failed = self._failed_others.get(key)
            if fingerprint == served.fingerprint or (
                failed is not None and failed[0] == fingerprint and now < failed[1]
            ):
                continue
            try:
                new = await self._load(directory)
            except Exception:
                self.reload_failures += 1
                self._failed_others[key] = (fingerprint, now + RELOAD_RETRY_MAX_S)
                log.exception(
                    "model reload failed; still serving the previous files",
                    extra={"version": key[1]},
                )
                continue
            self._failed_others.pop(key, None)
            if self._others.get(key) is not served:  # unloaded meanwhile
                await new.stop()
                continue
            self._others[key] = new  # the atomic swap
            self.reloads += 1
            log.info("model swapped", extra={"version": key[1], "replaced_in_place": True})
            self._retire(served)

    async def _reload(self) -> bool:
        fingerprint = self._scan()
        if fingerprint == self._fingerprint:
            return False
        primary, target = self._primary, self._target_dir()
        if (
            primary is not None
            and primary.directory == target
            and primary.fingerprint == version_fingerprint(target)
        ):
            # Another version changed (one not loaded, replaced in place), not this
            # one: loaded again, it would restart every comparison against it.
            self._fingerprint = fingerprint
            return False
        new = await self._load()
        old, self._primary = self._primary, new  # the atomic swap
        self._fingerprint = fingerprint
        self.reloads += 1
        pinned = self.rollout_primary()
        if pinned and pinned != new.metadata.version:
            log.info(
                "newest model version loaded; the rollout's pinned primary still answers",
                extra={"version": new.metadata.version, "serving": pinned},
            )
        else:
            log.info("model swapped", extra={"version": new.metadata.version})
        if old is not None and old.key != new.key and self.keep(old.metadata.version):
            self._others[old.key] = old  # the rollout still uses it
        elif old is not None:
            self._retire(old)
        return True

    def _retire(self, old: ServedModel) -> None:
        """Stop a version swapped out, once the calls that started on it are done."""
        start_background(
            old.stop(),
            name="retire-model",
            log=log,
            failure="stopping a retired model version failed",
            tracked=self._retiring,
        )

    async def _watch(self) -> None:
        # Polling a few stats a second is cheaper and more portable than inotify, and
        # a bad new version must never take the server down: log it, keep serving.
        loop = asyncio.get_running_loop()
        # The repository's fingerprint when a load last failed; None: it could not be
        # read (a version or metadata.json another user published unreadable).
        failed: str | None = ""
        retry_in, retry_at = 0.0, 0.0
        while True:
            await asyncio.sleep(self.reload_interval_s)
            if failed is None and loop.time() < retry_at:
                continue
            fingerprint: str | None = None
            try:
                # Read before the attempt: a fix made while a load fails is tried next.
                fingerprint = self._scan()
                if fingerprint == failed and loop.time() < retry_at:
                    # The primary waits for its retry; the other versions do not.
                    async with self._lock:
                        await self._reload_others()
                    continue
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.reload_failures += 1
                # The same content is tried again, less and less often, not every
                # poll: a failure can pass without a change here (Triton loads a new
                # version on its own schedule, a file server comes back).
                retry_in = (
                    min(2 * retry_in, RELOAD_RETRY_MAX_S)
                    if fingerprint == failed
                    else self.reload_retry_s
                )
                failed, retry_at = fingerprint, loop.time() + retry_in
                log.exception(
                    "model reload failed; still serving the previous version",
                    extra={"retry_in_s": retry_in},
                )
            else:
                failed = ""

    async def stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        await cancel_and_wait(watcher)
        # Waited for, not cancelled: each stops a version once its calls are done.
        await asyncio.gather(*self._retiring, return_exceptions=True)
        others, self._others = list(self._others.values()), {}
        for served in others:
            await served.stop()
        if self._primary is not None:
            await self._primary.stop()
            self._primary = None


def _files_of(directory: Path) -> str:
    """A version's files' fingerprint, "" when they cannot be read."""
    try:
        return version_fingerprint(directory)
    except OSError:
        return ""

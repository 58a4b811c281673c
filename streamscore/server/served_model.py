"""One model version taking traffic: ``ServedModel``, its backend, the ``Batcher`` in
front of it, its in-process fallback, its circuit breaker and drift monitor; what a
version must be for this server to serve it (``check_served``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore.server.backends.base import Backend, Row
from streamscore.server.backends.factory import create_backend
from streamscore.server.backends.onnx_backend import OnnxBackend
from streamscore.server.batcher import Batcher
from streamscore.server.breaker import CircuitBreaker
from streamscore.server.drift import BASELINE_FILE, Baseline, DriftMonitor
from streamscore.server.errors import Overloaded
from streamscore.server.latency_model import LatencyModel
from streamscore.server.model import ModelMetadata
from streamscore.server.model_repository import check_in_place, version_fingerprint
from streamscore.stream.features import REQUEST_FEATURES, feature_names

log = logging.getLogger("streamscore.models")
fallback_log = logging.getLogger("streamscore.fallbacks")
# Weight of a lone fallback call's newest time in its moving average: a pause in one
# call fades within a few calls, a model that got slower shows within a few.
FALLBACK_COST_ALPHA = 0.2
# Lone calls timed on a version's fallback at its start (after one untimed).
FALLBACK_TIMED_CALLS = 3


@dataclass(frozen=True)
class BatchingSettings:
    max_queue: int = 1024
    # In-process backends compute on the event loop: one batch at a time. A remote
    # backend (Triton) overlaps network round trips: several batches in flight.
    max_concurrent_batches: int = 1
    remote_concurrent_batches: int = 4
    max_delay_s: float = 0.0
    # Batching off: every request is its own backend call (for benchmarks).
    enabled: bool = True
    # Circuit breaker: consecutive backend failures that open it, and its first
    # cooldown before a probe (doubling per failed probe, up to 10 s).
    breaker_failures: int = 5
    breaker_cooldown_s: float = 1.0


# What Score computes for a model to take as inputs: the default pack's stateful
# features and the request-derived ones (stream/assembly.py all_feature_names).
SERVED_FEATURE_NAMES = (*feature_names(), *REQUEST_FEATURES)


def check_served(directory: Path, metadata: ModelMetadata, computed: Collection[str]) -> None:
    """Refuse, before anything starts, a version that could not answer a single call
    as the one it claims to be: one that takes an input the server does not compute
    (every Score would fail), or whose metadata names another model or version than
    its directory (a copied directory: its answers would carry the wrong label, in
    the decision log and the rollout's comparisons too)."""
    check_in_place(directory, metadata)
    unknown = [name for name in metadata.inputs if name not in computed]
    if unknown:
        raise ValueError(
            f"{directory / 'metadata.json'}: inputs {unknown} are not features this server "
            f"computes; it computes {', '.join(computed)}"
        )


_LOADS = itertools.count(1)


class ModelLoadError(ValueError):
    """A version whose files are there but make no model its backend takes (a corrupt
    or truncated model file): bad input, as invalid metadata is (a start stops on it
    with one line, exit 2)."""


class ServedModel:
    """One model version taking traffic (or about to)."""

    def __init__(
        self,
        directory: Path,
        *,
        batching: BatchingSettings = BatchingSettings(),
        triton_url: str = "",
        torch_device: str = "auto",
        onnx_kernel: str = "auto",
        feature_names: Collection[str] = SERVED_FEATURE_NAMES,
    ) -> None:
        self.directory = directory
        # What its files were as it was loaded (``repository_fingerprint`` of its
        # version): the registry reloads it when they change.
        self.fingerprint = version_fingerprint(directory)
        # One per load: a version replaced in place is a new model under the same key,
        # so comparisons made against the old one start again (comparisons.py).
        self.serial = next(_LOADS)
        self.metadata = ModelMetadata.load(directory / "metadata.json")
        check_served(directory, self.metadata, feature_names)
        self.key = (self.metadata.name, self.metadata.version)  # (looked up per request)
        self.backend: Backend = create_backend(
            directory,
            self.metadata,
            triton_url=triton_url,
            torch_device=torch_device,
            onnx_kernel=onnx_kernel,
        )
        limit = self.metadata.max_batch_size if batching.enabled else 1
        self.batcher = Batcher(
            self.backend.infer,
            name=f"{self.metadata.name}:{self.metadata.version}",
            max_batch_size=limit,
            max_queue=batching.max_queue,
            max_concurrent_batches=(
                batching.remote_concurrent_batches
                if self.metadata.backend == "triton"
                else batching.max_concurrent_batches
            ),
            max_delay_s=batching.max_delay_s,
            latency_model=LatencyModel(limit),
            n_inputs=len(self.metadata.inputs),
            infer_inline=getattr(self.backend, "infer_inline", None),
            score_row_inline=getattr(self.backend, "score_row_inline", None),
        )
        self.breaker = CircuitBreaker(
            failures_to_open=batching.breaker_failures,
            cooldown_s=batching.breaker_cooldown_s,
            max_cooldown_s=max(10.0, batching.breaker_cooldown_s),
        )
        onnx = directory / "model.onnx"
        self.fallback = (
            OnnxBackend(
                onnx,
                len(self.metadata.inputs),
                1,
                kernel=onnx_kernel,
                sample_rows=self.metadata.warmup_rows(),
                role="the fallback's onnxruntime model",
            )
            if onnx.is_file()
            else None
        )
        # Warm-up: predicted seconds per batch size (1, 2, 4, ... max_batch_size), from
        # real batches of the metadata's warm-up rows; set by start().
        self.warmup_timings: dict[int, float] = {}
        baseline = directory / BASELINE_FILE
        self.drift = DriftMonitor(Baseline.load(baseline)) if baseline.is_file() else None
        # Score path helpers, built once: the model's inputs picked from a features
        # dict (a tuple, in input order) and, per variant, the part of a response that
        # names the model (copying it is half the cost of building the reference).
        inputs = self.metadata.inputs
        pick = itemgetter(*inputs)
        self.inputs_of: Callable[[dict[str, float]], tuple[float, ...]] = (
            pick if len(inputs) > 1 else lambda features: (pick(features),)
        )
        # The version's ModelRef per variant, encoded once for every answer it gives.
        self.model_refs = {
            variant: pb.ModelRef(
                name=self.metadata.name, version=self.metadata.version, variant=variant
            ).SerializeToString()
            for variant in (pb.PRIMARY, pb.CANARY)
        }
        self.in_flight = 0
        self._fallbacks_in_flight = 0  # calls on the fallback model now
        # Wall seconds a call alone on the fallback takes, a moving average (unknown
        # until one ran). Not the backend's own cost figure, which is capped: it only
        # places calls on the loop or in the thread.
        self._fallback_call_s = math.inf
        # While ``stop`` waits for the calls in flight to end: done when they have
        # (an Event cleared and set by every call would cost two calls per request).
        self._drained: asyncio.Future[None] | None = None

    async def start(self) -> dict[int, float]:
        """Start the backend, seed the latency model with warm-up batches, open the batcher."""
        await self.backend.start()
        try:
            if self.fallback is not None:
                await self.fallback.start()
                await self._measure_fallback(self.fallback)
            else:
                log.warning(
                    "model version has no in-process fallback (no model.onnx): a missed "
                    "deadline or a failed backend is answered with an error, not degraded",
                    extra={"model": self.metadata.name, "version": self.metadata.version},
                )
            # Three untimed calls per size: TorchScript's profiling executor specialises
            # over its first calls (here 125 ms, then 3.5 ms, then ~0.1 ms), which
            # would otherwise seed the latency model with a cold start.
            timings = await self.batcher.warm_up(self.metadata.warmup_rows(), untimed=3)
            await self.batcher.start()
        except BaseException:
            await self.backend.stop()
            if self.fallback is not None:
                await self.fallback.stop()
            raise
        self.warmup_timings = timings
        return timings

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop after the calls that started on this version have finished."""
        if self.in_flight:
            self._drained = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), drain_timeout)
        await self.batcher.stop(timeout=drain_timeout)
        await self.backend.stop()
        if self.fallback is not None:
            await self.fallback.stop()

    def use(self) -> ServedModel:
        """``with served.use():`` counts a call as running on this version for its
        whole duration (``__enter__``/``__exit__``: no generator per request)."""
        return self

    def __enter__(self) -> ServedModel:
        self.in_flight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def fallback_score(
        self, vector: Row, deadline_ns: int | None = None, *, in_time_only: bool = False
    ) -> float | None:
        """The same version in process, unbatched; None when it cannot run.

        Its calls run one at a time (a model too heavy for the event loop goes to one
        thread), so they queue: with calls already waiting on it, one whose turn
        would end past ``deadline_ns`` (``perf_counter_ns``) is refused Overloaded
        (RESOURCE_EXHAUSTED). Without that bound, a version slower than the budget
        had every call shed by the batcher queue on its fallback, answered hundreds
        of milliseconds late, none refused. One call alone always runs, unless
        ``in_time_only`` (a canary's: the primary can answer it instead) and its
        cost, measured at start and on every call alone, would take it past the
        deadline."""
        fallback = self.fallback
        if fallback is None:
            return None
        ahead = self._fallbacks_in_flight
        if deadline_ns is not None and (ahead or in_time_only):
            call_s = self._fallback_call_s
            if (ahead or call_s < math.inf) and (
                time.perf_counter_ns() + (ahead + 1) * call_s * 1e9 > deadline_ns
            ):
                raise Overloaded(
                    f"over capacity: the fallback of {self.metadata.name}:"
                    f"{self.metadata.version} ({call_s * 1e3:.3g} ms a call, {ahead} calls "
                    "already waiting on it) would take this one past its deadline"
                )
        self._fallbacks_in_flight += 1
        started = time.perf_counter()
        try:
            score = float((await fallback.infer(np.array(vector, np.float32, ndmin=2)))[0])
        except Exception:
            # Its own logger, limited like a library's: a version whose fallback
            # fails every call (NaN scores) wrote a traceback a call (audit AR).
            fallback_log.exception(
                "fallback model failed",
                extra={"model": self.metadata.name, "version": self.metadata.version},
            )
            return None
        finally:
            self._fallbacks_in_flight -= 1
        if not ahead:  # alone: its time is its own, no wait behind others
            self._fallback_took(time.perf_counter() - started)
        return score

    async def _measure_fallback(self, fallback: Backend) -> None:
        """Time lone calls on the fallback before serving, so that no caller's call is
        the one that measures it: a canary's fallback answers only in time, and its
        first call, unbounded, took seconds on a slow model (audit AR). One untimed
        call first: a cold one says little about the next. A fallback that fails here
        does not fail the version's load (its batcher's warm-up, on the version's own
        backend, is what says the version serves): its calls fail as they would have."""
        row = self.metadata.warmup_rows()[:1]
        try:
            await fallback.infer(row)
            for _ in range(FALLBACK_TIMED_CALLS):
                started = time.perf_counter()
                await fallback.infer(row)
                self._fallback_took(time.perf_counter() - started)
        except Exception as error:
            fallback_log.warning(
                "the fallback model could not be timed at start: %s",
                error,
                extra={"model": self.metadata.name, "version": self.metadata.version},
            )

    def _fallback_took(self, seconds: float) -> None:
        known = self._fallback_call_s
        self._fallback_call_s = (
            seconds
            if known == math.inf
            else FALLBACK_COST_ALPHA * seconds + (1 - FALLBACK_COST_ALPHA) * known
        )

"""Model versions: metadata, decisions, and the input/output contract every backend checks.

A model repository is a directory laid out like Triton's (see ``model_repository.py``)::

    <repo>/<name>/<version>/model.onnx      ONNX: input "features" float32 [batch, k],
                                             output "score" float32 [batch, 1]
    <repo>/<name>/<version>/model.pt        the same model as TorchScript
    <repo>/<name>/<version>/metadata.json   ModelMetadata (Triton ignores it)

Inputs are raw feature values; any normalisation lives inside the model, so the model
file alone defines its behaviour. Scores are in 0..1.

This module imports neither torch nor onnxruntime: a server using the onnxruntime
backend never pays for importing torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamscore._proto.v1 import scoring_pb2 as pb

# Tensor names of the ONNX model (Triton's config and python-backend model use them too).
INPUT_NAME = "features"
OUTPUT_NAME = "score"

BACKENDS = ("onnxruntime", "torch", "triton", "tensorrt")
DEFAULT_BACKEND = "onnxruntime"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 100


class ModelOutputError(RuntimeError):
    """The model answered with the wrong number of scores (or non-finite ones)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """score >= decline -> DECLINE; score >= review -> REVIEW; else APPROVE."""

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.review <= self.decline <= 1.0:
            raise ValueError("thresholds need 0 <= review <= decline <= 1")

    def decide(self, score: float) -> pb.Decision:
        if score >= self.decline:
            return pb.DECLINE
        if score >= self.review:
            return pb.REVIEW
        return pb.APPROVE


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """``metadata.json`` of one model version.

    ``inputs``: feature names in model input order. ``output``: the score tensor's
    name. ``backend``: which backend serves it by default. ``max_batch_size`` and
    ``max_queue_delay_us``: batching limits (the latter is Triton's dynamic batching
    delay). ``warmup``: a few input rows run before the version takes traffic (empty:
    one row of zeros). Every field after ``thresholds`` is optional in the file.
    """

    name: str
    version: str
    inputs: tuple[str, ...]
    thresholds: Thresholds
    backend: str = DEFAULT_BACKEND
    output: str = OUTPUT_NAME
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    warmup: tuple[tuple[float, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.name or not str(self.version).isdigit():
            raise ValueError(
                f"model name must be set and version a number, got {self.name!r} {self.version!r}"
            )
        if not self.inputs or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs must be distinct feature names, got {list(self.inputs)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        for i, row in enumerate(self.warmup):
            if len(row) != len(self.inputs) or not all(math.isfinite(v) for v in row):
                raise ValueError(
                    f"warmup row {i} needs {len(self.inputs)} finite values, got {len(row)}"
                )

    def warmup_rows(self) -> np.ndarray:
        """The warm-up rows as a float32 (n, k) array (one row of zeros by default)."""
        if not self.warmup:
            return np.zeros((1, len(self.inputs)), dtype=np.float32)
        return np.asarray(self.warmup, dtype=np.float32)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMetadata:
        try:
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                inputs=tuple(str(name) for name in data["inputs"]),
                thresholds=Thresholds(
                    float(data["thresholds"]["review"]), float(data["thresholds"]["decline"])
                ),
                backend=str(data.get("backend", DEFAULT_BACKEND)),
                output=str(data.get("output", OUTPUT_NAME)),
                max_batch_size=int(data.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
                max_queue_delay_us=int(data.get("max_queue_delay_us", DEFAULT_MAX_QUEUE_DELAY_US)),
                warmup=tuple(tuple(float(v) for v in row) for row in data.get("warmup") or ()),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed model metadata: {error!r}") from error

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "inputs": list(self.inputs),
            "output": self.output,
            "thresholds": {"review": self.thresholds.review, "decline": self.thresholds.decline},
            "backend": self.backend,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "warmup": [list(row) for row in self.warmup],
        }

    @classmethod
    def load(cls, path: Path) -> ModelMetadata:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def dump(self, path: Path) -> None:
        """Write atomically (a watcher may be reading the directory)."""
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask."""
    try:  # Linux: read it, without setting it process-wide for a moment
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)  # reading the umask elsewhere means setting it
        os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so readers see either the old or the new content, never a part.
    A file replaced keeps its mode; a new one gets the mode ``open()`` would give it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's file is its owner's alone (0600); the file it replaces is not: a
        # Triton server or a server under another user reads the repository too (a
        # shared config.pbtxt rewritten under a stricter umask is still theirs to read).
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- the input/output contract, checked by every backend ----------------------------------


def check_batch(batch: np.ndarray, n_inputs: int, max_batch_size: int | None = None) -> np.ndarray:
    """The batch itself when it is a float32 (n, n_inputs) array with 1 <= n <=
    max_batch_size (C-contiguous: a copy if it was not); ValueError naming the expected
    shape otherwise."""
    shape = getattr(batch, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != n_inputs:
        raise ValueError(f"expected a (n, {n_inputs}) float32 batch, got shape {shape}")
    if shape[0] < 1 or (max_batch_size is not None and shape[0] > max_batch_size):
        limit = "" if max_batch_size is None else f"..{max_batch_size}"
        raise ValueError(f"batch of {shape[0]} rows; this backend takes 1{limit}")
    if batch.dtype != np.float32:
        raise ValueError(f"expected a float32 batch, got {batch.dtype}")
    if not batch.flags.c_contiguous:
        batch = np.ascontiguousarray(batch)
    return batch


def check_scores(
    scores: np.ndarray, batch: np.ndarray | int, where: str = "the model"
) -> np.ndarray:
    """A (n, 1) or (n,) model output as (n,) float32 scores, n being the batch's row
    count; ModelOutputError when the model returned a different number, or a score
    outside 0..1 (NaN included): a broken model must fail loudly, not decide."""
    n = batch if isinstance(batch, int) else batch.shape[0]
    flat = np.asarray(scores, dtype=np.float32).reshape(-1)
    if flat.shape[0] != n:
        raise ModelOutputError(f"{where} returned {flat.shape[0]} scores for a batch of {n}")
    # On the hot path: for the small batches of a latency-bound server a Python loop
    # over the values is ~10x cheaper than numpy's vectorised compare (call overhead).
    # NaN fails either comparison, so it is refused too.
    if n <= 16:
        valid = all(0.0 <= value <= 1.0 for value in flat.tolist())
    else:
        low, high = flat.min(), flat.max()
        valid = bool(low >= 0.0 and high <= 1.0)
    if not valid:
        raise _out_of_range(where)
    return flat


def check_score(score: float, where: str = "the model") -> float:
    """``check_scores`` for one score returned as a float."""
    if not 0.0 <= score <= 1.0:  # NaN fails it too
        raise _out_of_range(where)
    return score


def _out_of_range(where: str) -> ModelOutputError:
    return ModelOutputError(f"{where} returned scores outside 0..1 (or NaN)")


# -- repository layout -------------------------------------------------------------------


def version_dirs(repository: Path, name: str) -> list[Path]:
    """A model's numeric version directories, oldest first (Triton ignores the rest)."""
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(versions, key=lambda p: int(p.name))


def latest_version(repository: Path, name: str) -> Path:
    """The directory of the highest numeric version of a model."""
    versions = version_dirs(repository, name)
    if not versions:
        raise FileNotFoundError(
            f"no versions of model {name!r} under {repository} "
            f"(streamscore train --model-repository {repository} makes one)"
        )
    return versions[-1]

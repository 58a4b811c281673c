"""Model versions: metadata, the in-process TorchScript backend, and decisions.

A model repository is a directory laid out like Triton's:
``<repo>/<name>/<version>/model.pt`` (TorchScript) and ``metadata.json`` with the
input feature order, the decision thresholds and the backend. Inputs are raw feature
values; any normalisation lives inside the TorchScript module, so the model file
alone defines its behaviour.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from streamscore._proto.v1 import scoring_pb2 as pb


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
    name: str
    version: str
    inputs: tuple[str, ...]
    thresholds: Thresholds
    backend: str = "torch"

    @classmethod
    def load(cls, path: Path) -> ModelMetadata:
        data = json.loads(path.read_text())
        return cls(
            name=data["name"],
            version=str(data["version"]),
            inputs=tuple(data["inputs"]),
            thresholds=Thresholds(**data["thresholds"]),
            backend=data.get("backend", "torch"),
        )

    def dump(self, path: Path) -> None:
        data = asdict(self)
        data["inputs"] = list(self.inputs)
        path.write_text(json.dumps(data, indent=2) + "\n")


class TorchModel:
    """A TorchScript model run in process on the CPU, one thread (the server owns the cores)."""

    def __init__(self, directory: Path) -> None:
        self.metadata = ModelMetadata.load(directory / "metadata.json")
        # One intra-op thread: batch-1 calls gain nothing from more, and the gRPC
        # loop and the replica need the other core.
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            # Deprecated in torch 2.13, still the fastest in-process path (see training.py).
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(directory / "model.pt"), map_location="cpu")
        self.module.eval()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores in 0..1 for a (n, len(inputs)) float32 batch."""
        if batch.ndim != 2 or batch.shape[1] != len(self.metadata.inputs):
            raise ValueError(f"expected (n, {len(self.metadata.inputs)}) inputs, got {batch.shape}")
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch))
        scores = out.reshape(-1).numpy()
        if scores.shape[0] != batch.shape[0]:
            raise ValueError("model returned a different number of scores than inputs")
        return scores

    def warm_up(self) -> None:
        self.predict(np.zeros((1, len(self.metadata.inputs)), dtype=np.float32))


def latest_version(repository: Path, name: str) -> Path:
    """The highest numeric version directory of a model."""
    versions = [p for p in (repository / name).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"no versions of model {name!r} under {repository}")
    return max(versions, key=lambda p: int(p.name))

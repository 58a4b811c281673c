"""Train the demo fraud model from point-in-time features of synthetic traffic.

Pipeline: generate labelled synthetic payments (``traffic.py``), compute each event's
features as of its own time with the offline backfill (the same code the server
serves from), train a small MLP, evaluate on a held-out later time slice, export
ONNX, TorchScript, metadata and Triton's files into the model repository.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from streamscore.server.backends.triton_repo import write_triton_model
from streamscore.server.drift import BASELINE_FILE, Baseline
from streamscore.server.model import BACKENDS, ModelMetadata, Thresholds, version_dirs
from streamscore.stream.assembly import all_feature_names
from streamscore.stream.backfill import backfill
from streamscore.stream.events import event_from_dict
from streamscore.stream.state import FeatureStore
from streamscore.traffic import TrafficConfig, generate_log

log = logging.getLogger("streamscore.train")

MODEL_NAME = "fraud_mlp"


class FraudMLP(nn.Module):
    """Signed-log transform, standardisation, then a small MLP with a sigmoid output."""

    def __init__(self, n_inputs: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(
            nn.Linear(n_inputs, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)
        )

    @staticmethod
    def squash(x: torch.Tensor) -> torch.Tensor:
        # Counts and sums are heavy-tailed: compress them before standardising.
        return torch.sign(x) * torch.log1p(torch.abs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.squash(x) - self.mean) / self.std  # type: ignore[operator]
        return torch.sigmoid(self.net(z))


@dataclass(frozen=True)
class TrainReport:
    path: Path
    rows: int
    fraud_rate: float
    roc_auc: float
    pr_auc: float
    thresholds: Thresholds
    seconds: float


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    all_scores = np.concatenate([pos, neg])
    # Average ranks over ties.
    for value in np.unique(all_scores):
        tied = all_scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision over the ranking by score."""
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order]
    if not hits.sum():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def build_dataset(
    config: TrafficConfig, duration_s: float
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    labelled = generate_log(config, duration_s)
    label_by_id = {item.event["event_id"]: item.is_fraud for item in labelled}
    store = FeatureStore()
    names = all_feature_names(store)
    rows, labels = [], []
    for event, features in backfill(event_from_dict(item.event) for item in labelled):
        rows.append([features[name] for name in names])
        labels.append(1 if label_by_id[event.event_id] else 0)
    return np.asarray(rows, dtype=np.float32), np.asarray(labels, dtype=np.int64), names


def _modes_of(directory: Path) -> dict[Path, int]:
    """The mode of ``directory`` and of everything under it, by relative path."""
    return {
        path.relative_to(directory): stat.S_IMODE(path.stat().st_mode)
        for path in [directory, *directory.rglob("*")]
    }


# The files of a version that ``export_version`` writes. Anything else in a version it
# replaces (an operator's notes, a model card) is not its to delete and is carried over;
# one of these it did not write this time (a baseline) would be stale, and is not.
VERSION_FILES = frozenset({"model.pt", "model.onnx", "metadata.json", BASELINE_FILE})


def _carry_over(old: Path, new: Path) -> None:
    """Copy into ``new`` what ``old`` holds beside the version's own files."""
    for path in old.iterdir():
        if path.name in VERSION_FILES or (new / path.name).exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, new / path.name, symlinks=True)
        else:
            shutil.copy2(path, new / path.name, follow_symlinks=False)


def _apply_modes(directory: Path, modes: dict[Path, int]) -> None:
    """Give the paths under ``directory`` the ``modes`` of their namesakes in the
    version it replaces: made under a stricter umask, the replaced version was
    unreadable to the Triton server or server under another user that read it before.
    A path new to the version keeps the umask's mode."""
    for path in [directory, *directory.rglob("*")]:
        mode = modes.get(path.relative_to(directory))
        if mode is not None:
            with contextlib.suppress(FileNotFoundError):
                path.chmod(mode)


def export_version(
    repository: Path,
    version: int,
    model: FraudMLP,
    names: tuple[str, ...],
    thresholds: Thresholds,
    *,
    warmup: np.ndarray,
    check: np.ndarray,
    backend: str = "onnxruntime",
    baseline: Baseline | None = None,
) -> Path:
    """Write one version (ONNX, TorchScript, metadata, Triton files) atomically.

    Files are written into a hidden staging directory that is renamed into place,
    so a server watching the repository never sees a half-written version.
    """
    model_dir = repository / MODEL_NAME
    staging = model_dir / f".{version}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    example = torch.from_numpy(check[:4] if len(check) else np.zeros((1, len(names)), np.float32))
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript in favour of torch.export, but an exported
        # program runs this MLP 3x slower in process (measured: ~200 vs ~60 us/call
        # on a loaded 2-core box), and Triton's libtorch backend still takes TorchScript.
        # The TorchScript-based ONNX exporter (also deprecated) needs no onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(staging / "model.pt"))
        torch.onnx.export(
            model,
            (example,),
            str(staging / "model.onnx"),
            input_names=["features"],
            output_names=["score"],
            dynamic_axes={"features": {0: "batch"}, "score": {0: "batch"}},
            dynamo=False,
        )
    onnx.checker.check_model(str(staging / "model.onnx"))
    _check_onnx_matches_torch(staging / "model.onnx", model, check)
    metadata = ModelMetadata(
        MODEL_NAME,
        str(version),
        names,
        thresholds,
        backend=backend,
        warmup=tuple(tuple(float(v) for v in row) for row in warmup),
    )
    metadata.dump(staging / "metadata.json")
    if baseline is not None:  # training distributions, for drift monitoring
        baseline.dump(staging / BASELINE_FILE)
    directory = model_dir / str(version)
    retired = model_dir / f".{version}.retired"
    modes: dict[Path, int] = {}
    if directory.exists():  # retraining a version: swap in two renames, never absent long
        _carry_over(directory, staging)
        modes = _modes_of(directory)
        _apply_modes(staging, modes)
        shutil.rmtree(retired, ignore_errors=True)
        directory.rename(retired)
    staging.rename(directory)
    shutil.rmtree(retired, ignore_errors=True)
    # Triton's dynamic batching from the same metadata streamscore's batcher uses.
    write_triton_model(
        repository,
        MODEL_NAME,
        version,
        directory / "model.onnx",
        len(names),
        max_batch_size=metadata.max_batch_size,
        max_queue_delay_us=metadata.max_queue_delay_us,
    )
    _apply_modes(directory, modes)  # the Triton files written just now too
    return directory


def _check_onnx_matches_torch(path: Path, model: FraudMLP, rows: np.ndarray) -> None:
    if not len(rows):
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"features": rows})
    with torch.inference_mode():
        want = model(torch.from_numpy(rows)).numpy()
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"ONNX export differs from torch by {np.abs(got - want).max()}")


class TrainingRefused(ValueError):
    """A version training will not write: one already there, or a model not fit to serve."""


def train(
    repository: Path,
    *,
    version: int | None = None,
    replace: bool = False,
    duration_s: float = 1800.0,
    rate_per_s: float = 10.0,
    seed: int = 7,
    epochs: int = 300,
    backend: str = "onnxruntime",
) -> TrainReport:
    """Train the demo model and write it as ``version`` (None: the next one).

    An existing version is replaced only when asked: a server watching the repository
    would hot-reload it under the same number, so decisions would change while every
    answer and decision record still named the old one. A model whose held-out check
    cannot be computed (too little traffic: no fraud or no legitimate payment in the
    later slice) or whose review and decline thresholds coincide is refused."""
    started = time.perf_counter()
    existing = [int(p.name) for p in version_dirs(repository, MODEL_NAME)]
    if version is None:
        version = max(existing, default=0) + 1
    elif version < 1:  # before training: Triton and the registry know only versions 1, 2...
        raise TrainingRefused(f"version must be 1 or more, not {version}")
    elif version in existing and not replace:
        raise TrainingRefused(
            f"version {version} of {MODEL_NAME} exists under {repository}; give another "
            "--version (default: the next one), or --replace to write over it"
        )
    if backend not in BACKENDS:
        raise TrainingRefused(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    torch.manual_seed(seed)
    x, y, names = build_dataset(TrafficConfig(rate_per_s=rate_per_s, seed=seed), duration_s)
    split = int(len(x) * 0.8)  # rows are in event-time order: test on the later slice
    if split < 2 or len(x) - split < 2:
        raise TrainingRefused(
            f"not fit to serve: {len(x)} rows are too few to train and check a model; "
            "train on more traffic (--duration, --rate)"
        )
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    squashed = FraudMLP.squash(torch.from_numpy(x_train))
    mean, std = squashed.mean(dim=0), squashed.std(dim=0).clamp_min(1e-6)
    model = FraudMLP(len(names), mean, std)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    positives = max(int(y_train.sum()), 1)
    pos_weight = torch.tensor((len(y_train) - positives) / positives)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train).float().unsqueeze(1)
    for _ in range(epochs):
        optimizer.zero_grad()
        z = (FraudMLP.squash(inputs) - model.mean) / model.std  # type: ignore[operator]
        loss = loss_fn(model.net(z), targets)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        test_scores = model(torch.from_numpy(x_test)).reshape(-1).numpy()
        train_scores = model(inputs).reshape(-1).numpy()
    # Thresholds by false-positive budget on legitimate training traffic:
    # review about 2% of good customers, decline about 0.2%.
    legit = train_scores[y_train == 0]
    thresholds = Thresholds(
        review=float(np.quantile(legit, 0.98)), decline=float(np.quantile(legit, 0.998))
    )
    held_out_auc = roc_auc(y_test, test_scores)
    if np.isnan(held_out_auc) or not thresholds.review < thresholds.decline:
        raise TrainingRefused(
            f"not fit to serve: {len(x)} rows, held-out ROC-AUC {held_out_auc:.3f}, thresholds "
            f"review {thresholds.review:.4f} decline {thresholds.decline:.4f}; train on more "
            "traffic (--duration, --rate)"
        )
    directory = export_version(
        repository,
        version,
        model,
        names,
        thresholds,
        warmup=x_test[:8],
        check=x_test[:256],
        backend=backend,
        baseline=Baseline.fit(x_train, names, train_scores),
    )
    return TrainReport(
        path=directory,
        rows=len(x),
        fraud_rate=float(y.mean()),
        roc_auc=held_out_auc,
        pr_auc=average_precision(y_test, test_scores),
        thresholds=thresholds,
        seconds=time.perf_counter() - started,
    )

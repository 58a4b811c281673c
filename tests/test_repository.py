"""The model repository, metadata defaults, the training export and the registry:
loading, warm-up, extra versions, and hot reload under concurrent load."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from streamscore.server.backends.torch_backend import TorchBackend
from streamscore.server.latency_model import warm_up_sizes
from streamscore.server.model import ModelMetadata, Thresholds, latest_version, write_atomic
from streamscore.server.model_repository import ModelRepository, repository_fingerprint
from streamscore.server.repository import ModelRegistry
from streamscore.server.served_model import ServedModel
from streamscore.training import FraudMLP, export_version

MODEL = "fraud_mlp"


def write_metadata(repository: Path, name: str, version: str, **fields: object) -> Path:
    directory = repository / name / version
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "name": name,
        "version": version,
        "inputs": ["a", "b"],
        "thresholds": {"review": 0.5, "decline": 0.9},
        **fields,
    }
    (directory / "metadata.json").write_text(json.dumps(data))
    return directory


# -- metadata -------------------------------------------------------------------------


def test_old_metadata_files_load_with_defaults(tmp_path: Path) -> None:
    # What the first releases wrote: no output, batching or warm-up fields.
    directory = write_metadata(tmp_path, "m", "1", backend="torch")
    metadata = ModelMetadata.load(directory / "metadata.json")
    assert metadata.backend == "torch"
    assert metadata.output == "score"
    assert metadata.max_batch_size == 64
    assert metadata.max_queue_delay_us == 100
    assert metadata.warmup == ()
    np.testing.assert_array_equal(metadata.warmup_rows(), np.zeros((1, 2), np.float32))
    assert metadata.warmup_rows().dtype == np.float32
    # No backend at all: the default, onnxruntime.
    bare = write_metadata(tmp_path, "m", "2")
    assert ModelMetadata.load(bare / "metadata.json").backend == "onnxruntime"


def test_metadata_round_trips_every_field(tmp_path: Path) -> None:
    metadata = ModelMetadata(
        "m",
        "3",
        ("a", "b"),
        Thresholds(0.1, 0.5),
        backend="triton",
        max_batch_size=16,
        max_queue_delay_us=250,
        warmup=((1.0, 2.0), (0.0, -1.5)),
    )
    metadata.dump(tmp_path / "metadata.json")
    assert ModelMetadata.load(tmp_path / "metadata.json") == metadata
    assert json.loads((tmp_path / "metadata.json").read_text())["warmup"] == [
        [1.0, 2.0],
        [0.0, -1.5],
    ]
    np.testing.assert_array_equal(metadata.warmup_rows(), [[1.0, 2.0], [0.0, -1.5]])


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"backend": "tensorflow"}, "backend must be one of"),
        ({"warmup": [[1.0]]}, "warmup row 0 needs 2"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"inputs": ["a", "a"]}, "distinct"),
        ({"thresholds": {"review": 0.9, "decline": 0.1}}, "thresholds"),
        ({"thresholds": None}, "malformed"),
    ],
)
def test_bad_metadata_is_refused_naming_the_problem(
    tmp_path: Path, fields: dict[str, object], problem: str
) -> None:
    directory = write_metadata(tmp_path, "m", "1", **fields)
    with pytest.raises(ValueError, match=problem):
        ModelMetadata.load(directory / "metadata.json")


# -- repository -----------------------------------------------------------------------


def test_repository_lists_models_and_numeric_versions(tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        write_metadata(tmp_path, "m", version)
    write_metadata(tmp_path, "other", "4")
    (tmp_path / "m" / ".11.staging").mkdir()  # being written: invisible
    (tmp_path / "m" / "config.pbtxt").write_text("")  # Triton's: ignored
    (tmp_path / "empty").mkdir()
    repository = ModelRepository(tmp_path)
    assert repository.models() == ["m", "other"]
    assert repository.versions("m") == ["1", "2", "10"]
    assert latest_version(tmp_path, "m") == tmp_path / "m" / "10"
    assert repository.metadata("m", "2").version == "2"
    with pytest.raises(FileNotFoundError):
        latest_version(tmp_path, "empty")
    with pytest.raises(FileNotFoundError):
        repository.metadata("m", "7")
    assert ModelRepository(tmp_path / "absent").models() == []


def test_metadata_must_match_its_directory(tmp_path: Path) -> None:
    directory = write_metadata(tmp_path, "m", "2")
    (directory / "metadata.json").write_text(
        (directory / "metadata.json").read_text().replace('"version": "2"', '"version": "1"')
    )
    with pytest.raises(ValueError, match="describes m v1"):
        ModelRepository(tmp_path).metadata("m", "2")


def test_the_fingerprint_changes_with_versions_and_metadata(tmp_path: Path) -> None:
    write_metadata(tmp_path, "m", "1")
    first = repository_fingerprint(tmp_path, "m")
    assert repository_fingerprint(tmp_path, "m") == first
    # Another file in a version directory (model.py for Triton) is not a change.
    (tmp_path / "m" / "1" / "model.py").write_text("")
    assert repository_fingerprint(tmp_path, "m") == first
    write_metadata(tmp_path, "m", "2")
    second = repository_fingerprint(tmp_path, "m")
    assert second != first
    # Same size, same mtime, different content: still a change.
    path = tmp_path / "m" / "2" / "metadata.json"
    stat = path.stat()
    path.write_text(path.read_text().replace("0.5", "0.6"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert repository_fingerprint(tmp_path, "m") != second
    shutil.rmtree(tmp_path / "m" / "2")
    assert repository_fingerprint(tmp_path, "m") == first


# -- the training export ----------------------------------------------------------------


def test_training_exports_onnx_torchscript_and_metadata(trained_model: Path) -> None:
    directory = trained_model / MODEL / "1"
    metadata = ModelRepository(trained_model).metadata(MODEL, "1")
    assert metadata.backend == "onnxruntime"
    assert metadata.output == "score"
    assert len(metadata.warmup) >= 1
    assert (directory / "model.pt").is_file()
    model = onnx.load(str(directory / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert graph_input.name == "features"
    assert graph_output.name == "score"
    in_dims = graph_input.type.tensor_type.shape.dim
    out_dims = graph_output.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and in_dims[1].dim_value == len(metadata.inputs)
    assert out_dims[0].dim_param and out_dims[1].dim_value == 1
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The ONNX model scores the warm-up rows like the TorchScript one.
    session = ort.InferenceSession(str(directory / "model.onnx"))
    rows = metadata.warmup_rows()
    torchscript = TorchBackend(directory / "model.pt", len(metadata.inputs), len(rows))
    torchscript.load()
    want = asyncio.run(torchscript.infer(rows))
    np.testing.assert_allclose(session.run(None, {"features": rows})[0][:, 0], want, atol=1e-5)


def test_training_writes_files_others_can_read(trained_model: Path) -> None:
    """Every file as a plain open() makes it (0666 less the umask): a Triton server or a
    server under another user reads the repository too (its atomic writes were 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    files = [path for path in (trained_model / MODEL).rglob("*") if path.is_file()]
    assert {"metadata.json", "config.pbtxt", "model.py", "model.onnx"} <= {p.name for p in files}
    modes = {path.relative_to(trained_model): oct(path.stat().st_mode & 0o777) for path in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_replaced_version_keeps_its_modes(tmp_path: Path) -> None:
    """train --replace under a stricter umask: the version's directory and files took
    the umask's modes (700, 600), unreadable to the Triton server or server under
    another user that read it before; a file new to the version keeps the umask's."""
    from streamscore.training import _apply_modes, _modes_of

    old, new = tmp_path / "1", tmp_path / ".1.staging"
    old.mkdir(mode=0o755)
    new.mkdir(mode=0o700)
    for name in ("model.onnx", "metadata.json"):
        (old / name).write_bytes(b"old")
        (old / name).chmod(0o644)
    for name in ("model.onnx", "metadata.json", "baseline.json"):
        (new / name).write_bytes(b"new")
        (new / name).chmod(0o600)
    old.chmod(0o755)
    new.chmod(0o700)
    _apply_modes(new, _modes_of(old))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [new, *new.iterdir()]}
    assert modes == {
        ".1.staging": "0o755",
        "model.onnx": "0o644",
        "metadata.json": "0o644",
        "baseline.json": "0o600",
    }


def test_a_replaced_version_keeps_files_it_did_not_write(
    trained_model: Path, tmp_path: Path
) -> None:
    """train --replace deleted whatever else the version's directory held (an
    operator's notes, a model card). Those are carried over; a file of the version's own
    that the new export does not write (a drift baseline) is not, as it would be stale."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    version = repository / MODEL / "1"
    assert (version / "baseline.json").is_file()  # the trained one has a baseline
    (version / "NOTES.md").write_text("approved by risk, ticket 42")
    (version / "card").mkdir()
    (version / "card" / "model-card.json").write_text("{}")
    old_onnx = (version / "model.onnx").read_bytes()
    publish_other_model(repository, 1, seed=3)  # exports no baseline
    assert (version / "NOTES.md").read_text() == "approved by risk, ticket 42"
    assert (version / "card" / "model-card.json").read_text() == "{}"
    assert not (version / "baseline.json").exists()
    assert (version / "model.onnx").read_bytes() != old_onnx
    assert not list((repository / MODEL).glob(".1.*"))  # no staging or retired left


def test_a_rewritten_file_keeps_its_mode(tmp_path: Path) -> None:
    """``train`` rewrites the model's shared config.pbtxt: under a stricter umask it
    became unreadable to the Triton server that had read it."""
    shared, new = tmp_path / "config.pbtxt", tmp_path / "metadata.json"
    shared.write_bytes(b"old")
    shared.chmod(0o644)
    umask = os.umask(0o077)
    try:
        write_atomic(shared, b"new")
        write_atomic(new, b"{}")
    finally:
        os.umask(umask)
    assert shared.read_bytes() == b"new" and oct(shared.stat().st_mode & 0o777) == oct(0o644)
    assert oct(new.stat().st_mode & 0o777) == oct(0o600)  # a new file: the umask's mode


# -- the registry -----------------------------------------------------------------------


def copy_repository(trained_model: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    return repository


def publish_other_model(repository: Path, version: int, seed: int) -> Path:
    """A new version with other weights (so its scores differ), written the way
    ``streamscore train`` writes one: staged, then renamed into place."""
    metadata = ModelRepository(repository).metadata(MODEL, "1")
    k = len(metadata.inputs)
    torch.manual_seed(seed)
    model = FraudMLP(k, torch.zeros(k), torch.full((k,), 3.0)).eval()
    rows = metadata.warmup_rows()
    return export_version(
        repository, version, model, metadata.inputs, Thresholds(0.2, 0.6), warmup=rows, check=rows
    )


def break_a_version(repository: Path, version: int) -> None:
    staging = repository / MODEL / f".{version}.staging"
    shutil.copytree(repository / MODEL / "1", staging)
    metadata = json.loads((staging / "metadata.json").read_text())
    (staging / "metadata.json").write_text(json.dumps({**metadata, "version": str(version)}))
    (staging / "model.onnx").write_bytes(b"not a model")
    staging.rename(repository / MODEL / str(version))


def reference_scores(repository: Path, version: str, rows: np.ndarray) -> np.ndarray:
    path = repository / MODEL / version / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"features": rows})[0].reshape(-1)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_registry_warms_up_every_batch_size_and_holds_extra_versions(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    publish_other_model(repository, 2, seed=11)
    registry = ModelRegistry(repository, MODEL, version="1", reload_interval_s=0)
    await registry.start()
    try:
        primary = registry.primary
        assert primary.key == (MODEL, "1")  # pinned, though 2 is newer
        sizes = warm_up_sizes(primary.metadata.max_batch_size)
        assert sizes == [1, 2, 4, 8, 16, 32, 64]
        assert sorted(primary.warmup_timings) == sizes
        assert all(seconds > 0 for seconds in primary.warmup_timings.values())
        # A second version next to the primary (canary/shadow), by name and version.
        canary = await registry.load(MODEL, "2")
        assert await registry.load(MODEL, "2") is canary
        assert registry.get(MODEL, "2") is canary
        assert registry.get(MODEL, "1") is primary
        assert registry.loaded() == [(MODEL, "1"), (MODEL, "2")]
        with pytest.raises(KeyError, match="not loaded"):
            registry.get(MODEL, "3")
        with pytest.raises(FileNotFoundError):
            await registry.load(MODEL, "3")
        rows = primary.metadata.warmup_rows()
        np.testing.assert_allclose(
            await canary.backend.infer(rows), reference_scores(repository, "2", rows), atol=1e-6
        )
        await registry.unload(MODEL, "2")
        assert registry.loaded() == [(MODEL, "1")]
    finally:
        await registry.stop()


async def test_reload_under_concurrent_load_fails_no_call(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0.05)
    await registry.start()
    first = registry.primary
    metadata = first.metadata
    rows = np.resize(metadata.warmup_rows(), (8, len(metadata.inputs))).astype(np.float32)
    rows[:, 0] += np.arange(8, dtype=np.float32)  # rows differ from each other
    results: list[tuple[int, str, int, np.ndarray]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def call(served: ServedModel, worker: int, i: int) -> np.ndarray:
        if worker % 2:  # through the version's batcher, as the server does
            score = await served.batcher.submit(rows[i], served.batcher.clock() + 5.0)
            return np.array([score], np.float32)
        return await served.backend.infer(rows[i : i + 1])

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i = (i + 1) % len(rows)
            try:
                with registry.primary.use() as served:
                    scores = await call(served, w, i)
                    await asyncio.sleep(0)  # hold the version across a switch
                results.append((w, served.metadata.version, i, scores))
            except Exception as error:
                failures.append(error)
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker(w)) for w in range(16)]
    try:
        await asyncio.sleep(0.2)
        await asyncio.to_thread(publish_other_model, repository, 2, 11)
        # Generous: the new version loads in a thread that gets the GIL only in turns
        # with a loop these 16 workers never let idle; in CI on a slow box that took
        # over 10 s (1-2 s here). How fast a swap is, is a benchmark's business; this
        # test is about no call failing or mixing versions across it.
        await wait_for(lambda: registry.primary.metadata.version == "2", timeout=60.0)
        swapped_at = len(results)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        # The old version is stopped once its calls have finished.
        await wait_for(lambda: not first.backend.started, timeout=60.0)  # type: ignore[attr-defined]
    finally:
        stop.set()
        await registry.stop()
    assert failures == []
    assert registry.reloads == 1 and registry.reload_failures == 0
    expected = {v: reference_scores(repository, v, rows) for v in ("1", "2")}
    assert not np.allclose(expected["1"], expected["2"], atol=1e-3)
    for _, version, i, scores in results:
        np.testing.assert_allclose(scores, expected[version][i : i + 1], atol=1e-6)
    versions = [version for _, version, _, _ in results]
    assert versions.count("1") > 50 and versions[swapped_at:].count("2") > 50
    # Once a worker saw version 2, it never saw version 1 again.
    for w in range(16):
        mine = [version for worker, version, _, _ in results if worker == w]
        assert "1" not in mine[mine.index("2") :] if "2" in mine else True


async def test_the_old_version_stays_up_while_a_call_holds_it(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0)
    await registry.start()
    try:
        old = registry.primary
        rows = old.metadata.warmup_rows()
        assert not await registry.reload()  # nothing changed
        with old.use():
            publish_other_model(repository, 2, seed=5)
            assert await registry.reload()
            assert registry.primary.metadata.version == "2"
            await asyncio.sleep(0.2)
            # Swapped out, but a call that started on it can still finish on it.
            assert old.backend.started  # type: ignore[attr-defined]
            np.testing.assert_allclose(
                await old.backend.infer(rows), reference_scores(repository, "1", rows), atol=1e-6
            )
        await wait_for(lambda: not old.backend.started)  # type: ignore[attr-defined]
    finally:
        await registry.stop()


async def test_a_broken_new_version_keeps_the_old_one_serving(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0.05)
    await registry.start()
    try:
        rows = registry.primary.metadata.warmup_rows()
        break_a_version(repository, 2)
        await wait_for(lambda: registry.reload_failures >= 1)
        await asyncio.sleep(0.2)
        assert registry.reload_failures == 1  # not retried every poll (RELOAD_RETRY_S)
        assert registry.primary.metadata.version == "1"
        assert (await registry.primary.backend.infer(rows)).shape == (len(rows),)
        # A good newer version is still picked up afterwards.
        await asyncio.to_thread(publish_other_model, repository, 3, 7)
        await wait_for(lambda: registry.primary.metadata.version == "3")
    finally:
        await registry.stop()


async def test_a_version_that_cannot_be_read_is_retried_and_the_watcher_lives_on(
    trained_model: Path, tmp_path: Path
) -> None:
    """A version published with a metadata.json the server cannot read (another user's
    umask): reading the repository raised outside the watcher's error handling, which
    ended it without a word; nothing was hot-reloaded again, and the stop re-raised
    the old error (exit 1). Unreadable here as root too: a link to /proc/self/mem,
    whose first page is unmapped (EIO)."""
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0.05)
    await registry.start()
    try:
        staging = repository / MODEL / ".2.staging"
        shutil.copytree(repository / MODEL / "1", staging)
        metadata = json.loads((staging / "metadata.json").read_text())
        (staging / "metadata.json").unlink()
        (staging / "metadata.json").symlink_to("/proc/self/mem")
        staging.rename(repository / MODEL / "2")
        with pytest.raises(OSError):
            (repository / MODEL / "2" / "metadata.json").read_bytes()
        await wait_for(lambda: registry.reload_failures >= 1)
        await asyncio.sleep(0.3)
        assert registry.reload_failures == 1  # retried after RELOAD_RETRY_S, not every poll
        assert registry._watcher is not None and not registry._watcher.done()
        assert registry.primary.metadata.version == "1"
        fixed = repository / MODEL / "2" / "metadata.json"
        fixed.unlink()
        fixed.write_text(json.dumps({**metadata, "version": "2"}))
        await wait_for(lambda: registry.primary.metadata.version == "2")
    finally:
        await registry.stop()  # raised the watcher's old error


def test_serve_on_a_corrupt_model_stops_with_one_line(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated or corrupt model file, and no other version: as invalid metadata,
    one line naming the version and the backend's reason, exit 2 (it was a 49-line
    traceback of onnxruntime's own error type, exit 1)."""
    from streamscore.cli import main

    repository = copy_repository(trained_model, tmp_path)
    (repository / MODEL / "1" / "model.onnx").write_bytes(b"not a model")
    argv = ["serve", "--kafka", "127.0.0.1:9", "--port", "0", "--model-repository"]
    assert main([*argv, str(repository), "--log-format", "text"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"streamscore: model version {repository / MODEL / '1'} does not")
    assert "INVALID_PROTOBUF" in err[0]


@pytest.mark.parametrize("layout", ["empty", "absent"])
def test_serve_with_no_model_says_which_and_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    """`serve` before `train`: it stopped on "not enough values to unpack (expected at
    least 1, got 0)", naming neither the repository nor the model."""
    from streamscore.cli import main

    repository = tmp_path / "models"
    if layout == "empty":
        repository.mkdir()
    argv = ["serve", "--kafka", "127.0.0.1:9", "--port", "0", "--model-repository"]
    assert main([*argv, str(repository), "--log-format", "text"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"streamscore: no versions of model 'fraud_mlp' under {repository} "
        f"(streamscore train --model-repository {repository} makes one)"
    ]


def misdescribe_a_version(repository: Path, directory: int, changes: dict[str, object]) -> None:
    """A copy of version 1 renamed in as ``directory``, its metadata changed as given."""
    staging = repository / MODEL / f".{directory}.staging"
    shutil.copytree(repository / MODEL / "1", staging)
    metadata = json.loads((staging / "metadata.json").read_text())
    (staging / "metadata.json").write_text(
        json.dumps({**metadata, "version": str(directory), **changes})
    )
    staging.rename(repository / MODEL / str(directory))


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        # A typo in an input: every Score would fail on it (it did, INTERNAL).
        ({"inputs_typo": True}, "inputs \\['card_txn_count_10m'\\] are not features"),
        # A copied directory whose metadata still names the version it was copied
        # from: its answers would be labelled with the other version.
        ({"version": "1"}, "describes fraud_mlp v1, but lies in the directory of fraud_mlp v2"),
    ],
)
async def test_a_version_that_could_not_answer_as_itself_is_refused_at_load(
    trained_model: Path, tmp_path: Path, changes: dict[str, object], refusal: str
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    inputs = list(ModelRepository(repository).metadata(MODEL, "1").inputs)
    if changes.pop("inputs_typo", False):
        changes["inputs"] = ["card_txn_count_10m", *inputs[1:]]
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0)
    await registry.start()
    try:
        misdescribe_a_version(repository, 2, changes)
        with pytest.raises(ValueError, match=refusal):
            await registry.reload()  # the watcher logs this and keeps serving 1
        assert registry.primary.metadata.version == "1"
    finally:
        await registry.stop()
    with pytest.raises(ValueError, match=refusal):
        ServedModel(repository / MODEL / "2")
    # The newest version at a start: the newest that loads serves (a restart during a
    # bad publish failed outright), and the newest is tried again.
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0)
    await registry.start()
    try:
        assert registry.primary.metadata.version == "1"
        with pytest.raises(ValueError, match=refusal):
            await registry.reload()
    finally:
        await registry.stop()
    with pytest.raises(ValueError, match=refusal):
        # Pinned to it: the server does not start.
        await ModelRegistry(repository, MODEL, version="2", reload_interval_s=0).start()


def replace_model_file(repository: Path, version: int, data: bytes) -> None:
    """A version's model file written over in place (atomically), as train --replace
    leaves it: same version, other files."""
    staged = repository / MODEL / str(version) / ".model.onnx.new"
    staged.write_bytes(data)
    staged.rename(repository / MODEL / str(version) / "model.onnx")


async def test_a_version_not_loaded_changing_reloads_nothing(
    trained_model: Path, tmp_path: Path
) -> None:
    """Unpinned, the primary (the highest version) was loaded again, the same files,
    when an older version was replaced in place: every comparison against it started
    again, the canary's rollback window with them."""
    repository = copy_repository(trained_model, tmp_path)
    await asyncio.to_thread(publish_other_model, repository, 2, 7)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0)
    await registry.start()
    try:
        serving = registry.primary
        assert serving.metadata.version == "2"
        replace_model_file(repository, 1, (repository / MODEL / "2" / "model.onnx").read_bytes())
        assert await registry.reload() is False
        assert registry.primary is serving and registry.reloads == 0
    finally:
        await registry.stop()


async def test_a_primary_waiting_to_retry_holds_back_no_other_version(
    trained_model: Path, tmp_path: Path
) -> None:
    """A pinned primary whose reload keeps failing waits seconds between tries; a
    canary or shadow replaced meanwhile is reloaded at the next poll, not then."""
    repository = copy_repository(trained_model, tmp_path)
    await asyncio.to_thread(publish_other_model, repository, 2, 7)
    registry = ModelRegistry(
        repository, MODEL, version="1", reload_interval_s=0.05, reload_retry_s=60
    )
    await registry.start()
    try:
        other = await registry.load(MODEL, "2")
        replace_model_file(repository, 1, b"not a model")
        await wait_for(lambda: registry.reload_failures >= 1)
        replace_model_file(repository, 2, (repository / MODEL / "2" / "model.onnx").read_bytes())
        await wait_for(lambda: registry.get(MODEL, "2") is not other)  # not in 60 s
        assert registry.primary.metadata.version == "1" and registry.reload_failures == 1
    finally:
        await registry.stop()


async def test_a_pinned_version_is_not_reloaded_when_another_version_changes(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, version="1", reload_interval_s=0)
    await registry.start()
    try:
        primary = registry.primary
        await asyncio.to_thread(publish_other_model, repository, 2, 7)
        assert not await registry.reload()  # a new version 2: nothing to reload
        assert registry.primary is primary and registry.reloads == 0
        metadata = repository / MODEL / "1" / "metadata.json"
        metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "warmup": []}))
        assert await registry.reload()  # its own metadata changed: reloaded
        assert registry.primary is not primary and registry.primary.metadata.warmup == ()
    finally:
        await registry.stop()


BackendFactory = Callable[..., object]


async def publish_version_2_with(
    registry: ModelRegistry,
    monkeypatch: pytest.MonkeyPatch,
    factory: Callable[[BackendFactory], BackendFactory],
) -> ModelMetadata:
    """Version 2 published (as ``train`` does) to a running ``registry`` whose backend
    factory ``factory`` wraps; once version 2 serves, its metadata (as loaded)."""
    import streamscore.server.served_model as served_model

    monkeypatch.setattr(served_model, "create_backend", factory(served_model.create_backend))
    await registry.start()
    try:
        await asyncio.to_thread(publish_other_model, registry.repository, 2, 7)
        await wait_for(lambda: registry.primary.metadata.version == "2")
        return registry.primary.metadata
    finally:
        await registry.stop()


async def test_a_version_that_failed_to_load_is_tried_again_without_a_change(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load can fail for a while with nothing changed in the repository (Triton had
    not loaded the new version yet): it is tried again after a delay, not only when
    the repository changes."""
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0.05, reload_retry_s=0.3)
    not_ready = {"2": 2}  # version 2's backend fails its first two loads

    def flaky(create_backend: BackendFactory) -> BackendFactory:
        def create(directory: Path, *args: object, **kwargs: object) -> object:
            if not_ready.get(directory.name, 0) > 0:
                not_ready[directory.name] -= 1
                raise RuntimeError(f"model not ready: version {directory.name}")
            return create_backend(directory, *args, **kwargs)

        return create

    await publish_version_2_with(registry, monkeypatch, flaky)
    assert registry.reload_failures == 2


async def test_a_fix_made_while_a_load_fails_is_tried_next(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository's state a failed load is remembered by is the one read before
    it: a fix written while the load was failing is loaded at the next poll, not
    taken for the broken content (and left until the long retry)."""
    repository = copy_repository(trained_model, tmp_path)
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0.05, reload_retry_s=3600)

    def fixed_while_failing(create_backend: BackendFactory) -> BackendFactory:
        def create(directory: Path, *args: object, **kwargs: object) -> object:
            metadata = directory / "metadata.json"
            data = json.loads(metadata.read_text())
            if directory.name == "2" and data["max_queue_delay_us"] != 150:
                # The load fails on what it read; meanwhile its author fixes the file.
                metadata.write_text(json.dumps({**data, "max_queue_delay_us": 150}))
                raise RuntimeError("a slow load that failed")
            return create_backend(directory, *args, **kwargs)

        return create

    served = await publish_version_2_with(registry, monkeypatch, fixed_while_failing)
    assert registry.reload_failures == 1
    assert served.max_queue_delay_us == 150


async def test_a_version_without_onnx_serves_and_warns_it_has_no_fallback(
    trained_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TorchScript-only version (as an older `streamscore train` wrote them) serves,
    but its missed deadlines cannot degrade to the in-process fallback: said at load."""
    repository = copy_repository(trained_model, tmp_path)
    version = repository / MODEL / "1"
    (version / "model.onnx").unlink()
    metadata = json.loads((version / "metadata.json").read_text())
    (version / "metadata.json").write_text(json.dumps({**metadata, "backend": "torch"}))
    with_onnx = ServedModel(trained_model / MODEL / "1")
    torch_only = ServedModel(version)
    caplog.set_level(logging.WARNING, logger="streamscore.models")
    await with_onnx.start()
    await torch_only.start()
    try:
        warned = [r for r in caplog.records if "no in-process fallback" in r.getMessage()]
        assert [(r.model, r.version) for r in warned] == [(MODEL, "1")]  # type: ignore[attr-defined]
        assert torch_only.fallback is None and with_onnx.fallback is not None
        rows = torch_only.metadata.warmup_rows()
        np.testing.assert_allclose(
            await torch_only.backend.infer(rows),
            reference_scores(trained_model, "1", rows),
            atol=1e-5,
        )
        assert await torch_only.fallback_score(rows[0]) is None
    finally:
        await torch_only.stop()
        await with_onnx.stop()


async def test_registry_places_torch_versions_on_the_configured_device(
    trained_model: Path, tmp_path: Path
) -> None:
    """The torch_device setting reaches every version the registry loads."""
    repository = copy_repository(trained_model, tmp_path)
    metadata_path = repository / MODEL / "1" / "metadata.json"
    metadata_path.write_text(
        json.dumps({**json.loads(metadata_path.read_text()), "backend": "torch"})
    )
    registry = ModelRegistry(repository, MODEL, reload_interval_s=0, torch_device="cpu")
    await registry.start()
    try:
        backend = registry.primary.backend
        assert isinstance(backend, TorchBackend) and backend.device.type == "cpu"
    finally:
        await registry.stop()


async def test_backend_libraries_are_imported_off_the_event_loop(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch version's first construction imports torch (~2 s of CPU): on the loop,
    publishing one froze a serving process that long and its calls failed (audit AF).
    The libraries of the backends the repository names are imported at start, before
    serving, and a version whose backend's library is still to import (published
    later) has it imported in a thread of its own before it is built."""
    import threading

    import streamscore.server.repository as repository_module

    repository = copy_repository(trained_model, tmp_path)
    torch_version = repository / MODEL / "2"
    shutil.copytree(repository / MODEL / "1", torch_version)
    metadata = json.loads((torch_version / "metadata.json").read_text())
    (torch_version / "metadata.json").write_text(
        json.dumps({**metadata, "version": "2", "backend": "torch"})
    )
    imported: list[tuple[set[str], bool]] = []
    import_modules = repository_module.import_backend_modules

    def record_imports(backends: set[str]) -> None:
        imported.append((set(backends), threading.current_thread() is threading.main_thread()))
        import_modules(backends)

    monkeypatch.setattr(repository_module, "import_backend_modules", record_imports)
    registry = ModelRegistry(repository, MODEL, version="1", reload_interval_s=0)
    await registry.start()
    try:
        assert imported == [({"onnxruntime", "torch"}, False)]
        # As in a server whose repository had no torch version at its start (this
        # test process has imported torch already).
        monkeypatch.setattr(
            repository_module, "backend_module_pending", lambda backend: backend == "torch"
        )
        served = await registry.load(MODEL, "2")
        assert isinstance(served.backend, TorchBackend)
        assert imported[1:] == [({"torch"}, False)]
    finally:
        await registry.stop()


def test_train_writes_the_next_version_and_replaces_one_only_when_asked(
    trained_model: Path,
) -> None:
    """A server watching the repository would hot-reload a version written over, under
    the same number: train writes the next version, an existing one only with
    replace; and it refuses a model its held-out check cannot judge."""
    from streamscore.training import TrainingRefused, train

    with pytest.raises(TrainingRefused, match="version 1 of fraud_mlp exists"):
        train(trained_model, version=1)
    for version in (0, -3):  # refused before a minute of training, not after
        with pytest.raises(TrainingRefused, match=f"1 or more, not {version}"):
            train(trained_model, version=version)
    with pytest.raises(TrainingRefused, match="not fit to serve"):
        train(trained_model, duration_s=1, epochs=1)  # ten rows: no fraud held out
    with pytest.raises(TrainingRefused, match="not fit to serve"):
        train(trained_model, duration_s=1, rate_per_s=1, epochs=1)  # one row: it crashed
    assert sorted(p.name for p in (trained_model / "fraud_mlp").iterdir() if p.is_dir()) == ["1"]
    with pytest.raises(TrainingRefused, match="backend must be one of"):
        train(trained_model, backend="tensorflow")
    report = train(trained_model, duration_s=600, epochs=20, backend="torch")
    assert report.path == trained_model / "fraud_mlp" / "2"
    assert ModelRepository(trained_model).metadata(MODEL, "2").backend == "torch"


async def test_a_fallback_that_cannot_be_timed_at_start_does_not_fail_the_load(
    trained_model: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version's fallback is timed at its start, so that a canary's fallback answers
    only in time. That timing is not what says whether the version serves (its
    batcher's warm-up on its own backend is): a fallback failing there leaves the
    version loaded, its cost unknown, with one warning."""
    served = ServedModel(trained_model / MODEL / "1")
    assert served.fallback is not None

    async def failing(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("the fallback's runtime is broken")

    monkeypatch.setattr(served.fallback, "infer", failing)
    caplog.set_level(logging.WARNING, logger="streamscore.fallbacks")
    await served.start()
    try:
        [warned] = [r for r in caplog.records if "could not be timed" in r.getMessage()]
        assert "broken" in warned.getMessage()
        rows = served.metadata.warmup_rows()
        np.testing.assert_allclose(
            await served.backend.infer(rows), reference_scores(trained_model, "1", rows), atol=1e-5
        )
    finally:
        await served.stop()

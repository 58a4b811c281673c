"""The servers and model repositories the load tools start: the echo baseline, a
``streamscore serve`` on a private copy of a repository, per-backend repositories,
and the synthetic features every server folds before the load."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from aiokafka import AIOKafkaProducer

from loadtest.workdir import exit_on_sigterm
from streamscore.processes import ChildProcess
from streamscore.server.rollout_store import FILE_NAME as ROLLOUT_FILE
from streamscore.stream import kafka_compat
from streamscore.stream.events import event_from_dict
from streamscore.stream.topics import ENTITY_EVENTS, route_events

MODEL = "fraud_mlp"


def echo_process(
    port: int,
    log_path: str | None = None,
    *,
    reuseport: bool = False,
    name: str = "echo",
    model_repository: Path | None = None,
    model_version: str = "",
) -> ChildProcess:
    """The bare grpc.aio echo server (the baseline) on ``port`` (``reuseport``: one of
    several echo processes sharing it; ``model_repository``: the model echo, which also
    calls that repository's model once per answer)."""
    echo_server = str(Path(__file__).resolve().parent / "echo_server.py")
    argv = [sys.executable, echo_server, "--port", str(port)]
    if reuseport:
        argv.append("--reuseport")
    if model_repository is not None:
        argv += ["--model-repository", str(model_repository), "--model-version", model_version]
    return ChildProcess(name, argv, log_path=log_path)


# The copies of repositories made for load tools' servers, removed at exit.
_PRIVATE: list[tempfile.TemporaryDirectory[str]] = []


def private_repository(source: Path) -> Path:
    """A copy of the model repository ``source`` as it is now, for one of a load tool's
    servers, without its stored rollout. Served in place, a benchmark's server applied
    its own settings to the shared rollout (``rollout.json``) as a change: a live
    server on the same repository lost its promoted primary to the benchmark's
    version. One copy per call: a tool adds versions between its servers (shadows).
    Removed at exit, a SIGTERM's included (not at a SIGKILL)."""
    exit_on_sigterm()
    copy = tempfile.TemporaryDirectory(prefix="streamscore-bench-models-")
    _PRIVATE.append(copy)
    target = Path(copy.name) / "models"
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns(ROLLOUT_FILE, f"{ROLLOUT_FILE}.lock")
    )
    return target


def serve_process(
    name: str,
    bootstrap: str,
    port: int,
    repository: Path,
    *,
    env: dict[str, str],
    log_path: str,
    cwd: str | None = None,
    module: str = "streamscore",
) -> ChildProcess:
    """A quiet ``streamscore serve`` under load (warnings only, text logs), with ``env``
    on top of this process's environment; ``cwd`` picks the checkout it imports.
    ``module``: the one run with ``python -m`` (``loadtest.null_score``: Score empty).
    It serves a private copy of ``repository`` (``private_repository``)."""
    return ChildProcess.serve(
        name,
        bootstrap,
        port,
        private_repository(repository),
        "--log-level",
        "warning",
        module=module,
        env=env,
        log_path=log_path,
        cwd=cwd,
    )


def repository_for(base: Path, root: Path, backend: str) -> Path:
    repository = root / backend
    if repository.exists():  # one repository per backend, shared by batching on/off
        return repository
    shutil.copytree(base, repository)
    for metadata_path in (repository / MODEL).glob("*/metadata.json"):
        metadata = json.loads(metadata_path.read_text())
        metadata_path.write_text(json.dumps({**metadata, "backend": backend}))
    return repository


def add_copy(repository: Path, version: str) -> None:
    """Version ``version`` as a copy of version 1 (a shadow that costs what the primary does)."""
    target = repository / MODEL / version
    if target.exists():
        return
    shutil.copytree(repository / MODEL / "1", target)
    metadata_path = target / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "version": version}))


async def load_features(bootstrap: str, events: list[dict]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=8 << 20, **kafka_compat.producer_kwargs()
    )
    await producer.start()
    try:
        parsed = [event_from_dict(e) for e in events]
        for i in range(0, len(parsed), 500):
            for partition, value in route_events(parsed[i : i + 500], 4):
                await producer.send(ENTITY_EVENTS, value, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()

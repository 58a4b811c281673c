"""Model versions in the real server: hot reload under load, the deadline policy,
and the Triton backend with its fallback when Triton dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.server.app import ScoringServer
from streamscore.server.served_model import ServedModel
from streamscore.triton_server import EmbeddedTriton, TritonInstall, TritonServerError

from system import KERNELS_AGREE, model_score

MODEL = "fraud_mlp"


def copy_repository(trained_model: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    return repository


def add_version(repository: Path, version: int, **metadata_changes: object) -> None:
    """Copy version 1 as ``version`` with changed metadata, renamed into place at once
    (as ``streamscore train`` does), so a watcher never sees it half written."""
    staging = repository / MODEL / f".{version}.staging"
    shutil.copytree(repository / MODEL / "1", staging)
    metadata = json.loads((staging / "metadata.json").read_text())
    metadata.update(version=str(version), **metadata_changes)
    (staging / "metadata.json").write_text(json.dumps(metadata))
    staging.rename(repository / MODEL / str(version))


def request(i: int) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id=f"r-{i}",
        transaction=pb.Transaction(
            transaction_id=f"t-{i}",
            card_id=f"c-{i % 17}",
            merchant_id="m-1",
            device_id="d-1",
            ip="198.51.100.7",
            amount_minor=1_000 + i,
            currency="EUR",
            mcc="5411",
            country="DE",
        ),
        include_features=True,
    )


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[pb_grpc.ScoringStub]:
    server = ScoringServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.ScoringStub(channel)
    finally:
        await server.stop()


async def test_hot_reload_under_load_fails_no_request(trained_model: Path, tmp_path: Path) -> None:
    repository = copy_repository(trained_model, tmp_path)
    settings = Settings(port=0, model_repository=repository, model_reload_interval_s=0.1)
    versions: Counter[str] = Counter()
    failures: list[str] = []
    stop = asyncio.Event()
    async with serving(settings) as stub:

        async def client(k: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    reply = await stub.Score(request(k * 100_000 + i), timeout=5)
                    versions[reply.model.version] += 1
                    assert not reply.degraded, reply.degraded
                except Exception as error:  # counted, never raised: every one is a failure
                    failures.append(repr(error))
                i += 1

        clients = [asyncio.create_task(client(k)) for k in range(16)]
        await asyncio.sleep(0.5)
        add_version(repository, 2, thresholds={"review": 0.0, "decline": 1.0})
        for _ in range(100):  # until answers come from version 2 (at most 10 s)
            if versions["2"] >= 50:
                break
            await asyncio.sleep(0.1)
        # A config change of the same version is a reload too.
        add_version(repository, 3)
        for _ in range(100):
            if versions["3"] >= 50:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*clients)
        last = await stub.Score(request(0))
    assert failures == []
    assert versions["1"] > 0 and versions["2"] >= 50 and versions["3"] >= 50, versions
    assert last.model.version == "3"


async def test_a_broken_new_version_keeps_the_old_one_serving(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    settings = Settings(port=0, model_repository=repository, model_reload_interval_s=0.1)
    async with serving(settings) as stub:
        add_version(repository, 2)
        (repository / MODEL / "2" / "model.onnx").write_bytes(b"not a model")
        await asyncio.sleep(0.6)
        reply = await stub.Score(request(1))
        assert reply.model.version == "1"
        assert not reply.degraded


async def test_deadline_policy_fallback_marks_the_answer(trained_model: Path) -> None:
    # A budget no batch can meet: every request is answered by the fallback at once.
    settings = Settings(port=0, model_repository=trained_model, budget_ms=0.001)
    async with serving(settings) as stub:
        reply = await stub.Score(request(1))
    assert list(reply.degraded) == [pb.DEADLINE_FALLBACK]
    assert reply.score == pytest.approx(
        model_score(trained_model, MODEL, "1", dict(reply.features)), **KERNELS_AGREE
    )


async def test_deadline_policy_error_gives_deadline_exceeded(trained_model: Path) -> None:
    settings = Settings(
        port=0, model_repository=trained_model, budget_ms=0.001, deadline_policy="error"
    )
    async with serving(settings) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Score(request(1))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


try:
    TritonInstall.locate()
    NO_TRITON = ""
except TritonServerError as exc:
    NO_TRITON = str(exc)


def test_batches_in_flight_to_triton_come_from_the_settings(
    trained_model: Path, tmp_path: Path
) -> None:
    """``batch_remote_concurrency`` sets how many batches a Triton version's batcher
    keeps in flight; an in-process version keeps one (it computes on the loop)."""
    repository = copy_repository(trained_model, tmp_path)
    settings = Settings(port=0, model_repository=repository, batch_remote_concurrency=2)
    batching = ScoringServer(settings).models.batching
    version = repository / MODEL / "1"
    in_process = ServedModel(version, batching=batching)
    metadata_path = version / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "backend": "triton"}))
    remote = ServedModel(version, batching=batching, triton_url="127.0.0.1:1")
    assert (in_process.batcher.max_concurrent_batches, remote.batcher.max_concurrent_batches) == (
        1,
        2,
    )


@pytest.mark.skipif(bool(NO_TRITON), reason=f"no tritonserver: {NO_TRITON}")
async def test_triton_backend_scores_like_onnxruntime_and_falls_back_when_triton_dies(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    local = Settings(port=0, model_repository=repository, model_reload_interval_s=0)
    async with serving(local) as stub:
        expected = await stub.Score(request(7))
    metadata_path = repository / MODEL / "1" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "backend": "triton"}))
    async with EmbeddedTriton(repository) as triton:
        settings = Settings(
            port=0, model_repository=repository, triton_url=triton.url, model_reload_interval_s=0
        )
        async with serving(settings) as stub:
            replies = await asyncio.gather(*(stub.Score(request(7)) for _ in range(20)))
            for reply in replies:
                assert not reply.degraded
                assert reply.score == pytest.approx(expected.score, **KERNELS_AGREE)
            triton.kill()
            after = await stub.Score(request(7), timeout=5)
            assert list(after.degraded) == [pb.FALLBACK_MODEL]
            assert after.score == pytest.approx(expected.score, **KERNELS_AGREE)


async def test_metrics_endpoint_exports_batcher_and_rollout_series(
    trained_model: Path,
) -> None:
    import urllib.request

    from streamscore.loopback_process import find_free_port

    port = find_free_port()
    settings = Settings(port=0, model_repository=trained_model, metrics_port=port)
    async with serving(settings) as stub:
        for i in range(5):
            await stub.Score(request(i))
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(
            None, lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        )
    text = body.decode()
    batched = [
        line
        for line in text.splitlines()
        if line.startswith('streamscore_batch_size_count{model="fraud_mlp:1"}')
    ]
    assert batched and float(batched[0].split()[-1]) >= 5
    assert "streamscore_rollout_canary_percent 0.0" in text
    assert "streamscore_backend_seconds_bucket" in text


@pytest.mark.skipif(bool(NO_TRITON), reason=f"no tritonserver: {NO_TRITON}")
async def test_triton_killed_opens_the_breaker_and_recovers_when_it_returns(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = copy_repository(trained_model, tmp_path)
    metadata_path = repository / MODEL / "1" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "backend": "triton"}))
    triton = EmbeddedTriton(repository)
    await triton.start()
    port = int(triton.url.rsplit(":", 1)[1])
    settings = Settings(
        port=0,
        model_repository=repository,
        triton_url=triton.url,
        model_reload_interval_s=0,
        breaker_failures=3,
        breaker_cooldown_s=0.5,
    )
    server = ScoringServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            assert not (await stub.Score(request(1), timeout=5)).degraded
            breaker = server.models.primary.breaker
            triton.kill()
            # Every call is still answered, by the fallback; after 3 failures the
            # breaker opens and calls stop trying the dead server.
            replies = [await stub.Score(request(i), timeout=5) for i in range(20)]
            assert all(list(r.degraded) == [pb.FALLBACK_MODEL] for r in replies)
            assert breaker.state != "closed" and breaker.times_opened >= 1
            # Triton comes back on the same address: a probe finds it, the breaker
            # closes and answers are whole again.
            await triton.stop()
            triton = EmbeddedTriton(repository, port=port)
            await triton.start()
            # Recovered: five whole answers in a row (a fresh Triton's first calls can
            # be slow enough for a deadline fallback), within the breaker's cooldown
            # (up to 10 s) plus the latency model's memory of a slow call (10 s).
            seen: Counter[str] = Counter()
            in_a_row, give_up = 0, time.monotonic() + 45
            while in_a_row < 5 and time.monotonic() < give_up:
                reply = await stub.Score(request(in_a_row), timeout=5)
                if reply.degraded:
                    in_a_row = 0
                    seen.update(pb.DegradedReason.Name(r) for r in reply.degraded)
                    await asyncio.sleep(0.1)
                else:
                    in_a_row += 1
            assert in_a_row == 5, f"never recovered after Triton came back: {seen}"
            assert breaker.state == "closed"
    finally:
        await server.stop()
        await triton.stop()

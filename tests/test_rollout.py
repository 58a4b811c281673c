"""Rollouts in the real server: Admin auth, sticky canary, automatic rollback of a
failing and of a slow candidate with no failed primary request, promote, shadows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from prometheus_client import REGISTRY

from streamscore._proto.v1 import admin_pb2 as apb
from streamscore._proto.v1 import admin_pb2_grpc as apb_grpc
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.cli import main as cli_main
from streamscore.config import Settings
from streamscore.server import rollout as rollout_module
from streamscore.server.app import ScoringServer
from streamscore.server.rollout import RolloutManager
from streamscore.server.rollout_stats import in_canary
from streamscore.server.served_model import ServedModel

MODEL = "fraud_mlp"
TOKEN = "test-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def onnx_bytes(k: int, kind: str, repeats: int = 2_000_000) -> bytes:
    """A real ONNX model with the contract's tensor names that misbehaves on purpose.

    ``nan``: 0 for all-zero rows (so warm-up passes), NaN for real features.
    ``slow``: tiles each row ``repeats``-fold before averaging (2M: tens of ms per call)."""
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", k])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])
    if kind == "nan":
        nodes = [
            helper.make_node("ReduceSum", ["features", "axes"], ["s"], keepdims=1),
            helper.make_node("Abs", ["s"], ["a"]),
            helper.make_node("Neg", ["a"], ["n"]),
            helper.make_node("Log", ["n"], ["l"]),  # log(-|sum|): NaN unless the sum is 0
            helper.make_node("Sigmoid", ["l"], ["score"]),
        ]
        inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    else:
        nodes = [
            helper.make_node("Tile", ["features", "repeats"], ["t"]),
            helper.make_node("ReduceMean", ["t", "axes"], ["m"], keepdims=1),
            helper.make_node("Mul", ["m", "zero"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["score"]),
        ]
        inits = [
            helper.make_tensor("repeats", TensorProto.INT64, [2], [1, repeats]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
    graph = helper.make_graph(nodes, kind, [features], [score], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def add_version(
    repository: Path, version: int, kind: str = "copy", repeats: int = 2_000_000
) -> None:
    source, target = repository / MODEL / "1", repository / MODEL / str(version)
    staging = repository / MODEL / f".{version}.staging"
    shutil.copytree(source, staging)
    (staging / "model.pt").unlink()
    metadata = json.loads((staging / "metadata.json").read_text())
    metadata["version"] = str(version)
    if kind != "copy":
        (staging / "model.onnx").write_bytes(onnx_bytes(len(metadata["inputs"]), kind, repeats))
        metadata.update(warmup=[], max_batch_size=2)
    (staging / "metadata.json").write_text(json.dumps(metadata))
    staging.rename(target)


def request(i: int, card: str) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id=f"r-{i}",
        transaction=pb.Transaction(
            transaction_id=f"t-{i}",
            card_id=card,
            merchant_id="m-1",
            device_id="d-1",
            ip="198.51.100.7",
            amount_minor=1_000 + i,
            currency="EUR",
            mcc="5411",
            country="DE",
        ),
    )


@contextlib.asynccontextmanager
async def serving(
    trained_model: Path, tmp_path: Path, **overrides: object
) -> AsyncIterator[tuple[pb_grpc.ScoringStub, apb_grpc.AdminStub, ScoringServer, Path]]:
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    for version, kind in ((2, "copy"), (3, "nan"), (4, "slow")):
        add_version(repository, version, kind)
    options = {"model_version": "1", "model_reload_interval_s": 0, **overrides}
    async with server_on(repository, **options) as (scoring, admin, server):
        yield scoring, admin, server, repository


@contextlib.asynccontextmanager
async def server_on(
    repository: Path, **overrides: object
) -> AsyncIterator[tuple[pb_grpc.ScoringStub, apb_grpc.AdminStub, ScoringServer]]:
    """A server on an existing repository (as another process of the host would be)."""
    settings = Settings(
        port=0,
        model_repository=repository,
        admin_token=TOKEN,
        model_reload_interval_s=0.1,
        rollback_min_requests=30,
    ).override(dict(overrides))
    server = ScoringServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.ScoringStub(channel), apb_grpc.AdminStub(channel), server
    finally:
        await server.stop()


async def assert_rolled_back_automatically(admin: apb_grpc.AdminStub, *reasons: str) -> None:
    """The canary is at 0 %, by one automatic rollback for one of ``reasons``."""
    status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
    assert status.rollout.canary_percent == 0
    [event] = status.rollbacks
    assert event.automatic and any(r in event.reason for r in reasons), event.reason


async def set_rollout(admin: apb_grpc.AdminStub, **fields: object) -> apb.RolloutStatus:
    return await admin.SetRollout(
        apb.SetRolloutRequest(rollout=apb.Rollout(**{"primary_version": "1", **fields})),
        metadata=AUTH,
    )


async def drive(scoring: pb_grpc.ScoringStub, cards: int, rounds: int) -> list[pb.ScoreResponse]:
    """Score every card ``rounds`` times, 16 at a time. Answer i is for card i % cards; a
    failed call is kept as an empty answer whose request_id says ``failed:CODE``."""
    semaphore = asyncio.Semaphore(16)
    answers = [pb.ScoreResponse() for _ in range(cards * rounds)]

    async def one(i: int) -> None:
        async with semaphore:
            try:
                answers[i] = await scoring.Score(request(i, f"card-{i % cards}"), timeout=5)
            except grpc.aio.AioRpcError as error:
                answers[i] = pb.ScoreResponse(request_id=f"failed:{error.code().name}")

    await asyncio.gather(*(one(i) for i in range(cards * rounds)))
    return answers


def admin_calls(method: str, code: str) -> float:
    labels = {"rpc": f"Admin/{method}", "code": code}
    return REGISTRY.get_sample_value("streamscore_rpc_seconds_count", labels) or 0.0


async def test_admin_needs_the_token(
    trained_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused calls are counted, and logged with the caller, never the token (a
    security log must see a token being guessed)."""
    refused_before, ok_before = (
        admin_calls("GetRollout", "UNAUTHENTICATED"),
        admin_calls("GetRollout", "OK"),
    )
    async with serving(trained_model, tmp_path) as (_, admin, _, _):
        with caplog.at_level(logging.WARNING, logger="streamscore.auth"):
            for metadata in (
                (),
                (("authorization", "Bearer wrong-guess"),),
                (("authorization", TOKEN),),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await admin.GetRollout(apb.GetRolloutRequest(), metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refusals = [r for r in caplog.records if r.name == "streamscore.auth"]
        assert refusals and all("127.0.0.1" in str(getattr(r, "peer", "")) for r in refusals)
        assert not any("wrong-guess" in r.getMessage() or TOKEN in r.getMessage() for r in refusals)
        assert admin_calls("GetRollout", "UNAUTHENTICATED") == refused_before + 3
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert admin_calls("GetRollout", "OK") == ok_before + 1
        # The scheme in any case (RFC 7235): some clients send it lowercased.
        lowercased = (("authorization", f"bearer {TOKEN}"),)
        assert (await admin.GetRollout(apb.GetRolloutRequest(), metadata=lowercased)).rollout
        assert status.rollout.primary_version == "1"
        listed = await admin.ListModels(apb.ListModelsRequest(), metadata=AUTH)
        assert [v.version for v in listed.versions] == ["1", "2", "3", "4"]
    async with serving(trained_model, tmp_path / "b", admin_token="") as (_, admin, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert "disabled" in (caught.value.details() or "")


async def test_admin_refuses_unknown_versions_naming_the_field(
    trained_model: Path, tmp_path: Path
) -> None:
    """Each version field is checked against the repository and refused by name,
    without the repository's path; a name no file can have is refused the same way
    (it once reached the file system: FAILED_PRECONDITION, "File name too long")."""
    async with serving(trained_model, tmp_path) as (_, admin, _, repository):
        cases = [
            ({"canary_version": "99", "canary_percent": 5}, "rollout.canary_version"),
            ({"canary_version": "9" * 1000, "canary_percent": 5}, "rollout.canary_version"),
            ({"primary_version": "02"}, "rollout.primary_version"),
            ({"shadow_versions": ["2", "../fraud_mlp/1"]}, "rollout.shadow_versions[1]"),
            ({"model_name": "other"}, "rollout.model_name"),
            ({"canary_version": "1", "canary_percent": 5}, "rollout.canary_version"),
            ({"shadow_versions": ["2", "2"]}, "rollout.shadow_versions[1]"),
            ({"canary_version": "2", "shadow_versions": ["2"]}, "rollout.shadow_versions[0]"),
            ({"shadow_versions": ["2", ""]}, "rollout.shadow_versions[1]"),
            ({"canary_version": "2", "canary_percent": 101}, "rollout.canary_percent"),
            ({"canary_version": "2", "canary_percent": float("nan")}, "rollout.canary_percent"),
            ({"canary_percent": 5}, "rollout.canary_percent"),
        ]
        for fields, field in cases:
            rollout = apb.Rollout(**{"primary_version": "1", **fields})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.SetRollout(apb.SetRolloutRequest(rollout=rollout), metadata=AUTH)
            details = caught.value.details() or ""
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, details)
            assert details.startswith(f"{field}: "), (fields, details)
            assert str(repository) not in details and len(details) < 200, details
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollout.generation == 1  # nothing changed
        # Promoting with no canary: the rollout's state is wrong, not the request.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.Promote(apb.PromoteRequest(), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no canary to promote" in (caught.value.details() or "")
        # Nor to roll back: an operator must not believe a promote undone.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.Rollback(apb.RollbackRequest(reason="chargebacks"), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no canary to roll back" in (caught.value.details() or "")


async def test_a_version_that_cannot_be_served_is_listed_as_such_and_refused_by_field(
    trained_model: Path, tmp_path: Path
) -> None:
    """A copied version directory (its metadata names version 1) or one without
    metadata.json made ListModels fail INVALID_ARGUMENT, the whole list lost, and a
    SetRollout naming it was refused without naming the field (audit AF)."""
    async with serving(trained_model, tmp_path) as (_, admin, _, repository):
        shutil.copytree(repository / MODEL / "1", repository / MODEL / "8")
        shutil.copytree(repository / MODEL / "1", repository / MODEL / "9")
        (repository / MODEL / "9" / "metadata.json").unlink()
        listed = await admin.ListModels(apb.ListModelsRequest(), metadata=AUTH)
        by_version = {v.version: v for v in listed.versions}
        assert list(by_version) == ["1", "2", "3", "4", "8", "9"]
        assert all(by_version[v].backend == "onnxruntime" for v in "1234")
        assert not any(by_version[v].error for v in "1234")
        for version in ("8", "9"):
            assert by_version[version].backend == "" and by_version[version].error
            assert str(repository) not in by_version[version].error
        assert "describes fraud_mlp v1" in by_version["8"].error
        for version in ("8", "9"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await set_rollout(admin, canary_version=version, canary_percent=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details() or ""
            assert details.startswith("rollout.canary_version: "), details
            assert str(repository) not in details


async def test_a_version_whose_files_do_not_load_is_listed_with_why(
    trained_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A version whose model file is corrupt was listed as "not loaded", like any
    version not in use, and why it failed was in the server's log only (audit AI)."""

    async def listed(admin: apb_grpc.AdminStub) -> dict[str, apb.ModelVersionInfo]:
        response = await admin.ListModels(apb.ListModelsRequest(), metadata=AUTH)
        return {v.version: v for v in response.versions}

    async def until(
        admin: apb_grpc.AdminStub, version: str, check: Callable[[apb.ModelVersionInfo], object]
    ) -> apb.ModelVersionInfo:
        deadline = time.monotonic() + 30
        while not check(info := (await listed(admin))[version]):
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.05)
        return info

    async with serving(trained_model, tmp_path, model_reload_interval_s=0.1) as served:
        _, admin, _, repository = served
        add_version(repository, 8)
        (repository / MODEL / "8" / "model.onnx").write_bytes(b"not a model")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await set_rollout(admin, canary_version="8", canary_percent=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Logged in one line, not a traceback per refused change (audit AQ).
        [refused] = [r for r in caplog.records if "rollout change refused" in r.getMessage()]
        assert refused.levelname == "WARNING" and refused.exc_info is None
        assert "INVALID_PROTOBUF" in refused.getMessage()
        versions = await listed(admin)
        assert not versions["8"].loaded and not versions["8"].error
        assert versions["8"].load_error.startswith("InvalidProtobuf: ")
        assert "INVALID_PROTOBUF" in versions["8"].load_error
        assert str(repository) not in versions["8"].load_error
        assert not any(versions[v].load_error for v in "1234")
        target = f"127.0.0.1:{served[2].port}"
        models = ["rollout", "models", "--target", target, "--token", TOKEN]
        assert await asyncio.get_running_loop().run_in_executor(None, cli_main, models) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "fraud_mlp 3: onnxruntime, not loaded" in lines, lines
        [line] = [line for line in lines if line.startswith("fraud_mlp 8:")]
        assert line.startswith("fraud_mlp 8: onnxruntime, not loaded (its last load failed: ")
        assert "INVALID_PROTOBUF" in line

        # Mended on disk, it says so (it still said only why it had failed); loaded, it
        # has no error.
        shutil.copy(repository / MODEL / "1" / "model.onnx", repository / MODEL / "8")
        mended = (await listed(admin))["8"].load_error
        assert mended.startswith("InvalidProtobuf: ")
        assert mended.endswith("(its files have changed since; not loaded again yet)")
        await set_rollout(admin, canary_version="8", canary_percent=10)
        assert not (await listed(admin))["8"].load_error
        await set_rollout(admin, canary_version="", canary_percent=0)

        # A loaded canary's files replaced by a corrupt one: it serves what it loaded,
        # and says its files on disk did not load; mended, it loads them.
        await set_rollout(admin, canary_version="2", canary_percent=10)
        good = (repository / MODEL / "2" / "model.onnx").read_bytes()
        (repository / MODEL / "2" / "model.onnx").write_bytes(b"not a model either")
        info = await until(admin, "2", lambda info: info.load_error)
        assert info.loaded and info.load_error.startswith("InvalidProtobuf: ")  # the same form
        (repository / MODEL / "2" / "model.onnx").write_bytes(good)
        info = await until(admin, "2", lambda info: not info.load_error)
        assert info.loaded


async def test_unpinning_cannot_make_a_candidate_the_primary(
    trained_model: Path, tmp_path: Path
) -> None:
    """Unpinned, the primary is the highest version (4 here): unpinning while 4 is the
    canary or a shadow would compare it with itself. Refused, naming the field."""
    async with serving(trained_model, tmp_path, model_version="") as (_, admin, _, _):
        await set_rollout(admin, primary_version="1", canary_version="4", canary_percent=5)
        for fields, field in (
            ({"canary_version": "4", "canary_percent": 5}, "rollout.canary_version"),
            ({"shadow_versions": ["4"]}, "rollout.shadow_versions[0]"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await set_rollout(admin, primary_version="", **fields)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == f"{field}: version '4' is already the primary"


async def test_canary_is_a_sticky_slice_then_promoted(trained_model: Path, tmp_path: Path) -> None:
    # Version 2 is version 1: no automatic rollback here, even when a loaded box makes
    # the max of a few dozen canary answers (their p99) an outlier.
    loose = {"rollback_p99_margin_ms": 60_000.0, "rollback_error_margin": 1.0}
    async with serving(trained_model, tmp_path, **loose) as (scoring, admin, _, _):
        status = await set_rollout(admin, canary_version="2", canary_percent=30)
        # Generation 1 is the rollout from config at start.
        assert status.rollout.canary_version == "2" and status.rollout.generation == 2
        answers = await drive(scoring, cards=200, rounds=2)
        by_card: dict[str, set[tuple[str, int]]] = {}
        for i, answer in enumerate(answers):
            assert not answer.request_id.startswith("failed"), answer.request_id
            card = f"card-{i % 200}"
            by_card.setdefault(card, set()).add((answer.model.version, answer.model.variant))
        assert all(len(seen) == 1 for seen in by_card.values()), "a card switched variant"
        canary = sum(1 for seen in by_card.values() if ("2", pb.CANARY) in seen)
        assert 30 <= canary <= 90  # about 30 % of 200 cards
        status = await admin.Promote(apb.PromoteRequest(), metadata=AUTH)
        assert status.rollout.primary_version == "2" and not status.rollout.canary_version
        reply = await scoring.Score(request(1, "card-1"))
        assert (reply.model.version, reply.model.variant) == ("2", pb.PRIMARY)


@pytest.mark.parametrize("version, what", [("3", "error rate"), ("4", "p99|error rate")])
async def test_bad_canary_is_rolled_back_automatically(
    trained_model: Path, tmp_path: Path, version: str, what: str
) -> None:
    async with serving(trained_model, tmp_path) as (scoring, admin, _, _):
        await set_rollout(admin, canary_version=version, canary_percent=50)
        answers = await drive(scoring, cards=100, rounds=3)
        # Cards outside the canary slice were answered by the primary, every time.
        primary_answers = [a for i, a in enumerate(answers) if not in_canary(f"card-{i % 100}", 50)]
        bad = [
            (a.request_id, list(a.degraded))
            for a in primary_answers
            if a.request_id.startswith("failed") or a.degraded
        ]
        assert primary_answers and not bad, bad
        # The canary's cards were answered too: by the primary when the candidate could
        # not (marked FALLBACK_MODEL), never with an error.
        failed = [a.request_id for a in answers if a.request_id.startswith("failed")]
        assert not failed, failed
        # The slow one is caught by its p99, or first by the refusals its queue causes.
        await assert_rolled_back_automatically(admin, *what.split("|"))
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollbacks[0].version == version
        # After the rollback every card is answered by the primary, without failures.
        after = await drive(scoring, cards=50, rounds=1)
        assert all(a.model.variant == pb.PRIMARY and not a.degraded for a in after)
        assert not any(a.request_id.startswith("failed") for a in after)


async def test_shadows_are_compared_off_the_response_path(
    trained_model: Path, tmp_path: Path
) -> None:
    async with serving(trained_model, tmp_path) as (scoring, admin, server, _):
        await set_rollout(admin, shadow_versions=["2"])
        answers = await drive(scoring, cards=100, rounds=2)
        assert all(a.model.version == "1" and a.model.variant == pb.PRIMARY for a in answers)
        for _ in range(50):
            status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
            shadow = [c for c in status.candidates if c.variant == "shadow"]
            if shadow and shadow[0].stats["compared"] >= 150:
                break
            await asyncio.sleep(0.1)
        [stats] = [c.stats for c in shadow]
        # Version 2 is version 1's model: identical scores, full agreement.
        assert stats["agreement"] == pytest.approx(1.0)
        assert stats["compared"] + server.rollouts.shadow_dropped >= 150  # type: ignore[union-attr]


async def test_a_rollout_set_that_changes_nothing_keeps_its_generation(
    trained_model: Path, tmp_path: Path
) -> None:
    """Setting the rollout it already has made a new generation, which refused, as
    stale, a change another operator had prepared on the one before."""
    async with serving(trained_model, tmp_path) as (_, admin, _server, repository):
        first = await set_rollout(admin, shadow_versions=["2"])
        stored = (repository / MODEL / "rollout.json").read_bytes()
        again = await set_rollout(admin, shadow_versions=["2"])
        assert again.rollout.generation == first.rollout.generation
        assert (repository / MODEL / "rollout.json").read_bytes() == stored
        # A change prepared on that generation still applies.
        changed = await admin.SetRollout(
            apb.SetRolloutRequest(
                rollout=apb.Rollout(primary_version="1", shadow_versions=["2", "4"]),
                expected_generation=first.rollout.generation,
            ),
            metadata=AUTH,
        )
        assert changed.rollout.generation == first.rollout.generation + 1
        # A no-op on a stale generation is refused like any change.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.SetRollout(
                apb.SetRolloutRequest(
                    rollout=apb.Rollout(primary_version="1", shadow_versions=["2", "4"]),
                    expected_generation=first.rollout.generation,
                ),
                metadata=AUTH,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_client_commands_say_a_refusal_in_one_plain_line(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rollout`` printed its own ``streamscore rollout: CODE: ...`` line while
    ``features`` wrote a JSON log line: a command a person types says it plainly."""
    async with serving(trained_model, tmp_path) as (_, _admin, server, _repository):
        target = ["--target", f"127.0.0.1:{server.port}"]
        capsys.readouterr()
        wrong = ["rollout", "show", *target, "--token", "not-the-token-at-all"]
        # The last line: in process, logging set up by an earlier test may write to a
        # stream its capture has closed ("--- Logging error ---") before it.
        assert await asyncio.to_thread(cli_main, wrong) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("streamscore: UNAUTHENTICATED: "), last
        # What the server refuses as invalid is a bad flag's value: exit 2, not the
        # exit 1 of a server that is not there (README, "Exit codes").
        as_of = ["features", "card", "card-1", *target, "--as-of-ms", "5"]
        assert await asyncio.to_thread(cli_main, as_of) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("streamscore: INVALID_ARGUMENT: as_of_ms"), last
        no_such = ["rollout", "set", *target, "--token", TOKEN, "--canary", "99", "--percent", "5"]
        assert await asyncio.to_thread(cli_main, no_such) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("streamscore: INVALID_ARGUMENT: rollout.canary_version"), last


async def test_a_dead_shadow_worker_fails_the_server(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shadow worker ending on an error it did not expect (a bug) left the server
    SERVING with no shadow nor canary compared, so no bad canary rolled back, and said
    so only in one log line. The server is told, as for a dead replica: ``serve``
    drains and exits 1 naming it (test_serve_workers), to be restarted."""

    async def broken(self: object, pairs: object, version: str) -> None:
        raise RuntimeError("shadow bug")

    from streamscore.server.comparisons import Comparisons

    monkeypatch.setattr(Comparisons, "_shadow_batch", broken)
    async with serving(trained_model, tmp_path) as (scoring, admin, server, _):
        assert not server.failed.is_set()
        await set_rollout(admin, shadow_versions=["2"])
        await drive(scoring, cards=5, rounds=1)
        await asyncio.wait_for(server.failed.wait(), 10)
        assert server.failure == "rollout failed: RuntimeError: shadow bug"


async def test_a_canary_replaced_in_place_is_reloaded_and_compared_afresh(
    trained_model: Path, tmp_path: Path
) -> None:
    """train --replace of the canary's version: the canary answers with the new files
    (it kept answering with the model no longer on disk, under the same version), and
    its comparison starts again (pairs of the old model say nothing of the new)."""
    async with serving(trained_model, tmp_path) as (scoring, admin, server, repository):
        await set_rollout(admin, canary_version="2", canary_percent=100)
        answers = await drive(scoring, cards=20, rounds=1)
        assert all((a.model.version, a.model.variant) == ("2", pb.CANARY) for a in answers)
        assert all(a.score != 0.5 for a in answers)

        async def canary_requests() -> float:
            status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
            return next(c.stats["requests"] for c in status.candidates if c.variant == "canary")

        assert await canary_requests() == 20
        version_dir = repository / MODEL / "2"
        k = len(json.loads((version_dir / "metadata.json").read_text())["inputs"])
        staged = version_dir / ".model.onnx.new"
        staged.write_bytes(onnx_bytes(k, "slow", repeats=1))  # sigmoid(0): always 0.5
        staged.rename(version_dir / "model.onnx")
        assert await server.models.reload() is False  # the primary's files are unchanged
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert [c for c in status.candidates if c.variant == "canary"] == []  # none yet
        reply = await scoring.Score(request(1, "card-1"))
        assert (reply.model.version, reply.model.variant, reply.score) == ("2", pb.CANARY, 0.5)
        assert await canary_requests() == 1
        assert await server.models.reload() is False  # nothing changed since: no reload
        assert server.models.reloads == 1


async def test_a_slow_shadow_does_not_hold_the_primarys_answers(
    trained_model: Path, tmp_path: Path
) -> None:
    """Off the response path: a shadow whose every call takes tens of milliseconds
    (version 4) leaves the primary's answers as quick as they were. Scored on the
    path, each answer would take at least one of its calls."""
    async with serving(trained_model, tmp_path) as (scoring, admin, _, _):
        await set_rollout(admin, shadow_versions=["4"])
        answers = await drive(scoring, cards=40, rounds=1)
        assert all(a.model.version == "1" and a.model.variant == pb.PRIMARY for a in answers)
        shadow: dict[str, float] = {}
        for _ in range(100):
            status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
            shadow = next((dict(c.stats) for c in status.candidates if c.variant == "shadow"), {})
            if shadow.get("compared", 0) >= 1:
                break
            await asyncio.sleep(0.1)
        shadow_call_s = shadow["p99_s"]
        assert shadow_call_s > 0.005, shadow  # the shadow is slow...
        answer_s = float(np.median([a.timings.total_us for a in answers])) / 1e6
        assert answer_s < shadow_call_s / 4, (answer_s, shadow)  # ...its callers are not


def test_rollout_cli_shows_and_sets(trained_model: Path, tmp_path: Path, capsys) -> None:
    async def scenario() -> None:
        # No primary named: it is the repository's highest version, 4.
        async with serving(trained_model, tmp_path, model_version="") as (_, _, server, _):
            target = f"127.0.0.1:{server.port}"
            loop = asyncio.get_running_loop()
            args = [
                "rollout",
                "set",
                "--target",
                target,
                "--token",
                TOKEN,
                "--canary",
                "2",
                "--percent",
                "10",
            ]
            show = ["rollout", "show", "--target", target, "--token", TOKEN]
            assert await loop.run_in_executor(None, cli_main, show) == 0
            assert await loop.run_in_executor(None, cli_main, args) == 0
            # A set without --primary leaves a primary that follows new versions so.
            assert server.rollouts.state.primary == ""
            assert await loop.run_in_executor(None, cli_main, show) == 0
            pin = ["rollout", "set", "--target", target, "--token", TOKEN, "--primary", "1"]
            assert await loop.run_in_executor(None, cli_main, pin) == 0
            models = ["rollout", "models", "--target", target, "--token", TOKEN]
            assert await loop.run_in_executor(None, cli_main, models) == 0
            back = ["rollout", "rollback", "--target", target, "--token", TOKEN, "--reason", "fp"]
            assert await loop.run_in_executor(None, cli_main, back) == 0
            assert await loop.run_in_executor(None, cli_main, show) == 0
            wrong = ["rollout", "show", "--target", target, "--token", "nope"]
            assert await loop.run_in_executor(None, cli_main, wrong) == 1

    asyncio.run(scenario())
    out = capsys.readouterr()
    shown = [line for line in out.out.splitlines() if line.startswith("fraud_mlp:")]
    # Unpinned, the primary shows as following new versions, not as a pinned "4";
    # then as pinned once named.
    floating = "fraud_mlp: primary 4 (unpinned: follows new versions), canary"
    assert shown[0] == f"{floating} - at 0%, shadows - (generation 1)", shown
    assert shown[1] == f"{floating} 2 at 10%, shadows - (generation 2)", shown
    assert shown[2] == shown[1], shown
    assert shown[3] == "fraud_mlp: primary 1, canary 2 at 10%, shadows - (generation 3)", shown
    listed = [line for line in out.out.splitlines() if line.startswith("fraud_mlp ")]
    assert listed[:2] == ["fraud_mlp 1: onnxruntime, loaded", "fraud_mlp 2: onnxruntime, loaded"]
    assert len(listed) == 4, listed
    # A rollback's time as a reader reads one (it was epoch milliseconds).
    rolled = next(line for line in out.out.splitlines() if "rollback of 2" in line)
    assert re.fullmatch(
        r"  rollback of 2 \(manual\) at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: fp", rolled
    )
    assert "UNAUTHENTICATED" in out.err


async def test_an_automatic_rollback_during_a_change_is_not_undone(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change that loads a version awaits the load; a rollback that lands meanwhile
    (the canary failing) must stand: the change is refused as a conflict, not written
    over it with the same generation. And the canary, enabled again, starts a fresh
    comparison instead of the window that rolled it back."""
    from streamscore.server.errors import RolloutConflict
    from streamscore.server.rollout import RolloutState

    async with serving(trained_model, tmp_path) as (_, admin, server, _):
        await set_rollout(admin, canary_version="2", canary_percent=10)
        rollouts = server.rollouts
        primary = rollouts.primary_model()
        canary = rollouts.registry.get(rollouts.registry.name, "2")
        load = rollouts.registry.load

        async def slow_load(name: str, version: str) -> object:
            await asyncio.sleep(0.2)
            return await load(name, version)

        monkeypatch.setattr(rollouts.registry, "load", slow_load)
        before = rollouts.state
        change = asyncio.create_task(
            rollouts.set(
                RolloutState(primary="1", canary="2", canary_percent=10.0, shadows=("4",)),
                expected_generation=before.generation,
            )
        )
        await asyncio.sleep(0.05)
        for _ in range(100):
            rollouts.observe(pb.PRIMARY, primary, 0.001, ok=True)
        for _ in range(40):
            rollouts.observe(pb.CANARY, canary, 0.001, ok=False)
        assert rollouts.state.canary_percent == 0 and len(rollouts.rollbacks) == 1
        with pytest.raises(RolloutConflict):
            await change
        assert rollouts.state.canary_percent == 0
        assert ("fraud_mlp", "4") not in rollouts.registry.loaded()  # loaded for nothing
        # Enabled again, the canary is judged afresh: healthy answers keep it.
        await rollouts.set(RolloutState(primary="1", canary="2", canary_percent=10.0))
        for _ in range(100):
            rollouts.observe(pb.PRIMARY, primary, 0.001, ok=True)
            rollouts.observe(pb.CANARY, canary, 0.001, ok=True)
        assert rollouts.state.canary_percent == 10.0 and len(rollouts.rollbacks) == 1


async def test_calls_queued_on_a_slow_fallback_past_their_deadline_are_refused(
    trained_model: Path, tmp_path: Path
) -> None:
    """A version slower than the budget has every call shed by its batcher and answered
    by its fallback, which runs one call at a time: 60 at once were all answered, up
    to 400 ms past a 5 ms budget, none refused (audit AF). Now a call whose turn on the
    fallback would end past its deadline is refused RESOURCE_EXHAUSTED at once."""
    async with serving(trained_model, tmp_path, model_version="4", budget_ms=5) as (
        scoring,
        _,
        _,
        _,
    ):
        await scoring.Score(request(0, "warm"), timeout=10)  # the fallback's cost measured

        async def one(i: int) -> str:
            try:
                answer = await scoring.Score(request(i, f"card-{i}"), timeout=10)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            assert list(answer.degraded) == [pb.DEADLINE_FALLBACK]
            return "OK"

        codes = await asyncio.gather(*(one(i) for i in range(60)))
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes


async def test_a_canary_answered_only_by_deadline_fallbacks_is_rolled_back(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canary that never makes the deadline is answered by its fallback, marked
    DEADLINE_FALLBACK, and quickly: those answers count against it like errors, or a
    canary too slow for its budget would never be rolled back."""
    from streamscore.server.errors import DeadlineUnreachable

    async with serving(trained_model, tmp_path) as (scoring, admin, server, _):
        await set_rollout(admin, canary_version="2", canary_percent=50)
        registry = server.rollouts.registry
        canary = registry.get(registry.name, "2")

        async def never_in_time(vector: object, deadline: float, *rest: object) -> float:
            raise DeadlineUnreachable("submit", "this canary never makes the deadline")

        monkeypatch.setattr(canary.batcher, "submit", never_in_time)
        answers = await drive(scoring, cards=100, rounds=3)
        canary_answers = [a for a in answers if a.model.variant == pb.CANARY]
        assert canary_answers and all(
            list(a.degraded) == [pb.DEADLINE_FALLBACK] for a in canary_answers
        )
        await assert_rolled_back_automatically(admin, "error rate")


async def all_cards_to_canary_2(
    admin: apb_grpc.AdminStub, server: ScoringServer
) -> tuple[RolloutManager, ServedModel]:
    """Canary 2 (the primary's copy) at 100 %: the server's rollout and that canary."""
    await set_rollout(admin, canary_version="2", canary_percent=100)
    rollouts = server.rollouts
    assert rollouts is not None
    return rollouts, rollouts.registry.get(rollouts.registry.name, "2")


def primary_with_work_ahead(
    monkeypatch: pytest.MonkeyPatch, primary: object, ahead_s: float
) -> None:
    """The primary's batcher as if it had ``ahead_s`` of work queued: it sheds as over
    capacity a request due sooner, and says so to ``admits_by`` too (its own rule)."""
    from streamscore.server.errors import Overloaded

    batcher = primary.batcher  # type: ignore[attr-defined]
    submit = batcher.submit

    async def busy_submit(vector: object, deadline: float, *rest: object) -> float:
        if deadline - batcher.clock() < ahead_s:
            raise Overloaded(f"{ahead_s}s of work ahead")
        return await submit(vector, deadline, *rest)

    monkeypatch.setattr(batcher, "submit", busy_submit)
    monkeypatch.setattr(batcher, "admits_by", lambda d: d - batcher.clock() >= ahead_s)


def canary_that_fails_after(monkeypatch: pytest.MonkeyPatch, canary: object, s: float) -> None:
    """The canary's batcher spends ``s`` on each call, then sheds it."""
    from streamscore.server.errors import Overloaded

    async def slow_shed(vector: object, deadline: float, *rest: object) -> float:
        await asyncio.sleep(s)
        raise Overloaded("the canary cannot keep up")

    monkeypatch.setattr(canary.batcher, "submit", slow_shed)  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", ["fallback", "error"])
async def test_a_rescue_shed_only_for_the_time_the_canary_took_meets_the_deadline_policy(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """A canary that fails late leaves the primary's rescue little of the budget. A
    primary with 20 ms of work ahead sheds it then, though it would have taken the call
    had the canary not spent 40 of the 50 ms. That is the deadline not met, not the
    primary over capacity: a fallback answer or DEADLINE_EXCEEDED, by policy, never
    RESOURCE_EXHAUSTED (once in CI a slow canary's card got RESOURCE_EXHAUSTED so). Nor
    does the rescue count in the primary's window, the canary's baseline: its time is
    mostly the canary's."""
    async with serving(trained_model, tmp_path, budget_ms=50, deadline_policy=policy) as (
        scoring,
        admin,
        server,
        _,
    ):
        rollouts, canary = await all_cards_to_canary_2(admin, server)
        canary_that_fails_after(monkeypatch, canary, 0.040)
        primary_with_work_ahead(monkeypatch, rollouts.primary_model(), 0.020)
        primary_seen = rollouts._primary_window.count
        if policy == "fallback":
            answer = await scoring.Score(request(0, "card-late"), timeout=5)
            assert answer.model.variant == pb.PRIMARY
            assert list(answer.degraded) == [pb.DEADLINE_FALLBACK, pb.FALLBACK_MODEL]
        else:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await scoring.Score(request(0, "card-late"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert rollouts._primary_window.count == primary_seen


@pytest.mark.parametrize("policy", ["fallback", "error"])
async def test_a_canary_slower_than_the_budget_is_answered_by_the_primary(
    trained_model: Path, tmp_path: Path, policy: str
) -> None:
    """A canary slower than the budget misses its deadline; its own fallback is the
    same slow model, which answered each call tens of milliseconds late. Its cost is
    measured at start: the primary answers the canary's cards instead, in the budget,
    marked FALLBACK_MODEL (the miss counts against the canary all the same). Under the
    error policy too: there the canary's miss was DEADLINE_EXCEEDED for its cards, with
    nearly the whole budget left (audit AR)."""
    async with serving(trained_model, tmp_path, budget_ms=5, deadline_policy=policy) as (
        scoring,
        admin,
        server,
        _,
    ):
        await set_rollout(admin, canary_version="4", canary_percent=100)
        # The canary batcher's first call is a probe (nothing measured yet), rescued
        # with what is left: under the error policy that may be too little.
        skip = 0 if policy == "fallback" else 2
        for i in range(skip):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await scoring.Score(request(i, f"card-{i}"), timeout=10)
        answers = [
            await scoring.Score(request(i, f"card-{i}"), timeout=10) for i in range(skip, 12)
        ]
        assert [(a.model.variant, pb.FALLBACK_MODEL in a.degraded) for a in answers] == [
            (pb.PRIMARY, True)
        ] * len(answers)
        canary = {(v, kind): s for v, kind, s in server.rollouts.candidate_stats()}  # type: ignore[union-attr]
        assert canary[("4", "canary")]["errors_total"] >= len(answers)


async def test_a_rescue_the_primary_could_not_take_with_the_whole_budget_is_over_capacity(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side: a primary with more work ahead than the whole budget is over
    capacity for the canary's cards as for its own, whatever the canary took."""
    async with serving(trained_model, tmp_path, budget_ms=50) as (scoring, admin, server, _):
        rollouts, canary = await all_cards_to_canary_2(admin, server)
        canary_that_fails_after(monkeypatch, canary, 0.010)
        primary_with_work_ahead(monkeypatch, rollouts.primary_model(), 0.080)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await scoring.Score(request(0, "card-busy"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_primarys_comparison_calls_wait_for_its_own_requests(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Canary answers are scored by the primary too, for the comparison, on the
    primary's backend: those calls wait while the primary's batcher has requests
    queued or running (they must not delay the primary's answers), then catch up."""
    from streamscore.server.batcher import Batcher

    async with serving(trained_model, tmp_path) as (scoring, admin, server, _):
        await set_rollout(admin, canary_version="2", canary_percent=50)
        primary = server.rollouts.primary_model()
        busy = [True]
        idle = Batcher.idle

        def primary_busy(batcher: Batcher) -> bool:
            return False if batcher is primary.batcher and busy[0] else idle.fget(batcher)  # type: ignore[attr-defined]

        monkeypatch.setattr(Batcher, "idle", property(primary_busy))

        def compared() -> float:
            stats = {(v, kind): s for v, kind, s in server.rollouts.candidate_stats()}
            return stats.get(("2", "canary"), {}).get("compared", 0.0)

        answers = await drive(scoring, cards=40, rounds=2)
        assert any(a.model.variant == pb.CANARY for a in answers)
        await asyncio.sleep(0.2)
        assert compared() == 0  # held back while the primary is busy
        busy[0] = False
        for _ in range(100):
            if compared():
                break
            await asyncio.sleep(0.02)
        assert compared() > 0


async def test_a_canary_at_100_percent_is_judged_against_the_primarys_recent_answers(
    trained_model: Path, tmp_path: Path
) -> None:
    """At 100 % the primary answers nothing live: the primary's window from before the
    canary started is its baseline (a new canary does not empty it). The answers are
    fed to the rollout's check directly, with chosen latencies."""
    async with serving(trained_model, tmp_path) as (_, admin, server, _):
        rollouts = server.rollouts
        assert rollouts is not None
        primary = rollouts.primary_model()
        for _ in range(30):  # rollback_min_requests
            rollouts.observe(pb.PRIMARY, primary, 0.001, ok=True)
        await set_rollout(admin, canary_version="2", canary_percent=100)
        canary = rollouts.registry.get(rollouts.registry.name, "2")
        for _ in range(30):
            rollouts.observe(pb.CANARY, canary, 0.050, ok=True)  # 50x slower, no errors
        await assert_rolled_back_automatically(admin, "p99")


async def test_a_backend_that_hangs_opens_the_breaker(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that stops answering (a hung Triton, not a dead one) fails every call
    at its deadline: after breaker_failures of them the breaker opens and calls go
    straight to the fallback, instead of each waiting its whole budget."""
    from streamscore.server.errors import DeadlineUnreachable

    async with serving(trained_model, tmp_path, budget_ms=20.0) as (scoring, _, server, _):
        primary = server.rollouts.primary_model()
        calls = 0

        async def hung(vector: object, deadline: float, *rest: object) -> float:
            nonlocal calls
            calls += 1
            await asyncio.sleep(max(0.0, deadline - primary.batcher.clock()))
            raise DeadlineUnreachable(
                "in_flight", "the backend is slower than the deadline", overdue=True
            )

        monkeypatch.setattr(primary.batcher, "submit", hung)
        answers = [await scoring.Score(request(i, f"card-{i}"), timeout=5) for i in range(12)]
        assert all(list(a.degraded) == [pb.DEADLINE_FALLBACK] for a in answers[:5])
        assert all(list(a.degraded) == [pb.FALLBACK_MODEL] for a in answers[5:])
        assert calls == 5 and primary.breaker.state != "closed"


async def test_a_version_that_fails_to_load_is_refused_without_the_repositorys_path(
    trained_model: Path, tmp_path: Path
) -> None:
    async with serving(trained_model, tmp_path) as (_, admin, _, repository):
        add_version(repository, 9)
        (repository / MODEL / "9" / "model.onnx").write_bytes(b"not an onnx model")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await set_rollout(admin, shadow_versions=["9"])
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = caught.value.details() or ""
        assert "rollout not changed" in details and str(repository) not in details, details
        assert "<model repository>" in details, details


async def test_shadow_comparisons_start_again_when_the_primary_changes(
    trained_model: Path, tmp_path: Path
) -> None:
    """Pairs against the old primary, at its thresholds, say nothing of the new one; a
    shadow's counts are per request, as a canary's are, not per backend call; and a
    shadow removed and added again starts again."""
    async with serving(trained_model, tmp_path) as (scoring, admin, server, repository):
        add_version(repository, 5)
        await set_rollout(admin, canary_version="2", canary_percent=50, shadow_versions=["5"])

        async def shadow_stats(at_least: float) -> dict[str, float]:
            compared = 0.0
            for _ in range(100):
                status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
                # None until the shadow's first comparison (a shadow added afresh).
                shadows = [dict(c.stats) for c in status.candidates if c.variant == "shadow"]
                assert len(shadows) <= 1, shadows
                compared = shadows[0]["compared"] if shadows else 0.0
                if compared >= at_least:
                    return shadows[0]
                await asyncio.sleep(0.05)
            raise AssertionError(f"shadow compared {compared} < {at_least}")

        answers = await drive(scoring, cards=60, rounds=1)
        before = [a for a in answers if a.model.variant == pb.PRIMARY]
        stats = await shadow_stats(len(before))
        assert stats["requests"] == stats["compared"] == len(before)
        await admin.Promote(apb.PromoteRequest(), metadata=AUTH)
        assert server.rollouts.primary_model().metadata.version == "2"
        after = await drive(scoring, cards=30, rounds=1)
        stats = await shadow_stats(1)
        assert stats["compared"] <= len(after), (stats, len(after))  # none from before
        # A shadow taken out of the rollout takes its comparison along; added again,
        # it starts afresh.
        await set_rollout(admin, primary_version="2")
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert [c.version for c in status.candidates if c.variant == "shadow"] == []
        await set_rollout(admin, primary_version="2", shadow_versions=["5"])
        again = await drive(scoring, cards=10, rounds=1)
        stats = await shadow_stats(len(again))
        assert stats["requests"] == stats["compared"] == len(again), stats


async def test_shadow_work_queued_before_a_removal_is_not_counted_when_added_again(
    trained_model: Path, tmp_path: Path
) -> None:
    """Shadow work still queued when its shadow leaves the rollout goes with its
    comparison: added again straight after, the shadow's fresh comparison counted it
    (a flaky 12 against 10 requests under load)."""
    async with serving(trained_model, tmp_path) as (_, admin, server, repository):
        add_version(repository, 5)
        await set_rollout(admin, shadow_versions=["5"])
        rollouts = server.rollouts
        vector = tuple(0.0 for _ in rollouts.primary_model().metadata.inputs)
        for i in range(600):  # more than the worker takes at once: most stay queued
            rollouts.shadow(rollouts.primary_model(), vector, 0.5, f"q-{i}")
        await set_rollout(admin)
        await set_rollout(admin, shadow_versions=["5"])
        await asyncio.sleep(0.5)  # the worker has long taken whatever was left
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        counted = [dict(c.stats) for c in status.candidates if c.variant == "shadow"]
        assert counted == [] or counted[0]["requests"] == 0, counted


async def test_a_rollout_change_reaches_every_process_and_survives_a_restart(
    trained_model: Path, tmp_path: Path
) -> None:
    """serve --workers N: an Admin call reaches one process; the others adopt its
    change from the rollout's file within a poll, and a stale generation is refused
    whichever process it reaches. A restart with the same settings keeps a promote
    and the rollbacks; other settings are a change, applied."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    async with (
        server_on(repository) as (_, admin_a, _),
        server_on(repository) as (
            scoring_b,
            admin_b,
            server_b,
        ),
    ):
        status = await admin_a.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        generation = status.rollout.generation
        changed = await admin_a.SetRollout(
            apb.SetRolloutRequest(
                rollout=apb.Rollout(primary_version="1", canary_version="2", canary_percent=100),
                expected_generation=generation,
            ),
            metadata=AUTH,
        )
        for _ in range(50):
            if server_b.rollouts.state.generation == changed.rollout.generation:
                break
            await asyncio.sleep(0.05)
        reply = await scoring_b.Score(request(1, "card-1"))
        assert (reply.model.version, reply.model.variant) == ("2", pb.CANARY)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # read before A's change
            await admin_b.SetRollout(
                apb.SetRolloutRequest(
                    rollout=apb.Rollout(primary_version="1"), expected_generation=generation
                ),
                metadata=AUTH,
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await admin_b.Rollback(apb.RollbackRequest(reason="chargebacks"), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # rolled back: not promoted
            await admin_b.Promote(apb.PromoteRequest(), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "was rolled back (chargebacks)" in (caught.value.details() or "")
        await set_rollout(admin_a, canary_version="2", canary_percent=10)  # enabled again
        await admin_b.Promote(apb.PromoteRequest(), metadata=AUTH)
    async with server_on(repository) as (scoring, admin, _):  # restarted, same settings
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollout.primary_version == "2" and not status.rollout.canary_version
        assert [r.reason for r in status.rollbacks] == ["chargebacks"]
        reply = await scoring.Score(request(2, "card-2"))
        assert (reply.model.version, reply.model.variant) == ("2", pb.PRIMARY)
    async with server_on(repository, model_version="1") as (scoring, admin, _):  # new settings
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollout.primary_version == "1"


async def test_a_pinned_primary_keeps_answering_when_a_newer_version_appears(
    trained_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollout that names its primary: a hot reload of the repository's highest
    version must not replace it (Score answered the new version while the rollout
    still named the old one). Nor does its log line say "model swapped" (an SRE took
    version 2 for what answered)."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    caplog.set_level(logging.INFO, logger="streamscore.models")
    async with server_on(repository) as (scoring, admin, server):
        await set_rollout(admin)  # primary "1", named
        reloads = server.models.reloads
        add_version(repository, 2)
        for _ in range(50):
            if server.models.reloads > reloads:
                break
            await asyncio.sleep(0.05)
        assert server.models.primary.metadata.version == "2"  # the registry reloaded
        reply = await scoring.Score(request(1, "card-1"))
        assert reply.model.version == "1"
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollout.primary_version == "1"
    loaded = [r for r in caplog.records if r.name == "streamscore.models"]
    assert "model swapped" not in [r.getMessage() for r in loaded]
    [line] = [r for r in loaded if "pinned primary still answers" in r.getMessage()]
    assert (line.version, line.serving) == ("2", "1")  # type: ignore[attr-defined]


async def test_the_listening_line_names_the_stored_rollouts_primary(
    trained_model: Path, tmp_path: Path
) -> None:
    """A restart on a stored rollout that pins version 1 beside a newer 2: the start's
    "grpc server listening" line named 2 (the registry's newest), which never answered."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    async with server_on(repository) as (_, admin, _):
        await set_rollout(admin, canary_version="2", canary_percent=10)

    class Listening(logging.Handler):
        fields: dict[str, object] = {}

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "grpc server listening":
                Listening.fields = dict(record.__dict__)

    logger = logging.getLogger("streamscore.server")
    level, handler = logger.level, Listening()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        async with server_on(repository) as (scoring, _, server):
            assert server.models.primary.metadata.version == "2"  # the registry's newest
            card = next(c for c in (f"card-{i}" for i in range(100)) if not in_canary(c, 10))
            reply = await scoring.Score(request(1, card))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    fields = Listening.fields
    assert (fields["version"], fields["pinned"]) == ("1", True), fields
    assert (fields["canary"], fields["canary_percent"]) == ("2", 10.0), fields
    assert fields["shadows"] is None
    assert (reply.model.version, reply.model.variant) == ("1", pb.PRIMARY)  # as it said


async def test_processes_that_reached_one_generation_differently_agree(
    trained_model: Path, tmp_path: Path
) -> None:
    """A change stored through one process, and an automatic rollback in another just
    after (it cannot store it: the stored rollout moved on). Both were at the same
    generation with different rollouts, and stayed so: they compared generations.
    By content, the second adopts the stored one."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    add_version(repository, 5)
    async with (
        server_on(repository) as (_, admin_a, server_a),
        server_on(repository) as (
            _,
            _,
            server_b,
        ),
    ):
        await set_rollout(admin_a, canary_version="2", canary_percent=50)
        for _ in range(50):
            if server_b.rollouts.state == server_a.rollouts.state:
                break
            await asyncio.sleep(0.05)
        await set_rollout(admin_a, canary_version="5", canary_percent=50)
        server_b.rollouts._roll_back_now("automatic: a test", automatic=True)
        for _ in range(100):
            if server_b.rollouts.state == server_a.rollouts.state:
                break
            await asyncio.sleep(0.05)
        assert server_b.rollouts.state == server_a.rollouts.state
        assert server_a.rollouts.state.canary == "5"


async def test_a_stored_rollout_that_cannot_be_served_gives_way_to_the_settings(
    trained_model: Path, tmp_path: Path
) -> None:
    """The stored rollout names a version since deleted: the server starts on its
    settings' rollout (it used to exit), and says why."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    async with server_on(repository) as (_, admin, _):
        await set_rollout(admin, canary_version="2", canary_percent=10)
        await admin.Rollback(apb.RollbackRequest(reason="bad"), metadata=AUTH)
    shutil.rmtree(repository / MODEL / "2")
    async with server_on(repository) as (scoring, admin, _):
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert not status.rollout.canary_version
        assert (await scoring.Score(request(1, "card-1"))).model.version == "1"


async def test_a_stored_rollout_whose_candidate_does_not_load_now_is_kept_for_every_server(
    trained_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server started while the stored rollout's canary could not load (its Triton
    down) set the stored rollout aside and wrote its settings' over it: every other
    server then dropped the canary, and with no pinned primary sent the canary version
    all of its traffic (audit AI). It now serves the stored primary alone, writes
    nothing, and takes the whole rollout once the canary loads. One whose primary does
    not load fails the start, the stored rollout untouched."""
    monkeypatch.setattr(rollout_module, "ADOPT_RETRY_S", 0.2)
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    stored_path = repository / MODEL / "rollout.json"
    model_file = repository / MODEL / "2" / "model.onnx"
    good = model_file.read_bytes()
    async with server_on(repository) as (_, admin_a, server_a):
        changed = (await set_rollout(admin_a, canary_version="2", canary_percent=50)).rollout
        stored = stored_path.read_text()
        model_file.write_bytes(b"not a model")  # version 2 does not load now
        async with server_on(repository) as (scoring_b, admin_b, server_b):
            assert server_b.rollouts.state.canary == "" and server_b.rollouts.state.primary == "1"
            answers = [await scoring_b.Score(request(i, f"card-{i}")) for i in range(20)]
            assert {a.model.version for a in answers} == {"1"}
            assert stored_path.read_text() == stored  # nothing written over it
            await asyncio.sleep(0.5)  # the other server's follower polls every 0.1 s
            assert server_a.rollouts.state.canary == "2"
            assert server_a.rollouts.state.canary_percent == changed.canary_percent
            # Asked, it shows the shared rollout and why it serves its primary alone (it
            # showed no canary, and a `rollout set` read from it and written back
            # dropped the canary for every server; a rollback through it was refused).
            shown = await admin_b.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
            assert shown.rollout == changed
            assert "INVALID_PROTOBUF" in shown.primary_alone_because
            assert str(repository) not in shown.primary_alone_because
            show = ["rollout", "show", "--target", f"127.0.0.1:{server_b.port}", "--token", TOKEN]
            assert await asyncio.get_running_loop().run_in_executor(None, cli_main, show) == 0
            [alone] = [line for line in capsys.readouterr().out.splitlines() if "alone" in line]
            assert alone.startswith("  this server answers with the primary alone until")
            assert "INVALID_PROTOBUF" in alone
            for change in (
                set_rollout(admin_b, canary_version="2", canary_percent=60),
                admin_b.Promote(apb.PromoteRequest(), metadata=AUTH),
            ):  # both need version 2 here: refused, saying why, the shared rollout kept
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await change
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "INVALID_PROTOBUF" in (caught.value.details() or "")
                assert stored_path.read_text() == stored
            rolled = await admin_b.Rollback(apb.RollbackRequest(reason="bad"), metadata=AUTH)
            assert rolled.rollout.canary_version == "2" and rolled.rollout.canary_percent == 0
            assert rolled.rollout.generation == changed.generation + 1
            assert rolled.primary_alone_because and rolled.rollbacks[-1].reason == "bad"
            deadline = time.monotonic() + 20
            while server_a.rollouts.state.canary_percent:  # the other server follows
                assert time.monotonic() < deadline, server_a.rollouts.state
                await asyncio.sleep(0.05)
            assert server_a.rollouts.state.generation == rolled.rollout.generation
            await set_rollout(admin_a, canary_version="2", canary_percent=50)  # enabled again
            model_file.write_bytes(good)  # it loads again
            deadline = time.monotonic() + 20
            while server_b.rollouts.state != server_a.rollouts.state:
                assert time.monotonic() < deadline, server_b.rollouts.state
                await asyncio.sleep(0.05)
        await set_rollout(admin_a, primary_version="2")
        stored = stored_path.read_text()
        model_file.write_bytes(b"not a model")
        with pytest.raises(Exception, match="does not load"):
            async with server_on(repository):
                pass
        assert stored_path.read_text() == stored


async def test_a_rollback_reason_is_bounded_so_admin_answers_stay_within_grpcs_limit(
    trained_model: Path, tmp_path: Path
) -> None:
    """Every Admin answer carries the kept rollbacks: two reasons of 150 KB made every
    answer, GetRollout included, fail RESOURCE_EXHAUSTED after applying its change,
    restarts included. A long reason is refused naming the field, nothing changed;
    one stored before the limit (or by hand) is read cut."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    async with server_on(repository) as (_, admin, _):
        before = await set_rollout(admin, canary_version="2", canary_percent=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.Rollback(apb.RollbackRequest(reason="x" * 1001), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("reason: at most 1000 characters")
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollout == before.rollout and not status.rollbacks
        await admin.Rollback(apb.RollbackRequest(reason="y" * 1000), metadata=AUTH)
    stored_path = repository / MODEL / "rollout.json"
    stored = json.loads(stored_path.read_text())
    stored["rollbacks"] = stored["rollbacks"] * 100
    for record in stored["rollbacks"]:
        record["reason"] = "z" * 50_000  # 5 MB of reasons in all
    stored_path.write_text(json.dumps(stored))
    async with server_on(repository) as (_, admin, _):
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert len(status.rollbacks) == 100
        assert {r.reason for r in status.rollbacks} == {"z" * 999 + "…"}


def rollbacks_counted(server: ScoringServer) -> float:
    """The rollbacks counter as /metrics exports it (the server's scrape-time metrics)."""
    from streamscore.server.collector import ServerCollector

    samples = (sample for metric in ServerCollector(server).collect() for sample in metric.samples)
    return next(s.value for s in samples if s.name == "streamscore_rollout_rollbacks_total")


def exported(server: ScoringServer, name: str) -> float:
    """A scrape-time series of the server's /metrics (``ServerCollector``)."""
    from streamscore.server.collector import ServerCollector

    samples = (sample for metric in ServerCollector(server).collect() for sample in metric.samples)
    return next(s.value for s in samples if s.name == name)


async def test_a_published_version_that_fails_to_load_is_counted_on_metrics(
    trained_model: Path, tmp_path: Path
) -> None:
    """The old version kept answering and the failure was logged, but /metrics had no
    series for it: a failed publish was invisible to alerting (audit AI)."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    async with server_on(repository) as (scoring, _, server):
        assert exported(server, "streamscore_model_reload_failures_total") == 0
        # Published as `train` publishes (staged, renamed into place), unloadable.
        staging = repository / MODEL / ".2.staging"
        shutil.copytree(repository / MODEL / "1", staging)
        metadata = json.loads((staging / "metadata.json").read_text())
        (staging / "metadata.json").write_text(json.dumps({**metadata, "version": "2"}))
        (staging / "model.onnx").write_bytes(b"not a model")
        staging.rename(repository / MODEL / "2")
        deadline = time.monotonic() + 20
        while exported(server, "streamscore_model_reload_failures_total") < 1:
            assert time.monotonic() < deadline, "the failed load was never counted"
            await asyncio.sleep(0.05)
        assert (await scoring.Score(request(1, "card-1"))).model.version == "1"
        assert exported(server, "streamscore_model_reloads_total") == 0
        add_version(repository, 3)
        while exported(server, "streamscore_model_reloads_total") < 1:
            assert time.monotonic() < deadline, "the good version was never swapped in"
            await asyncio.sleep(0.05)


async def test_the_rollbacks_a_process_keeps_stay_bounded_and_its_counter_only_grows(
    trained_model: Path, tmp_path: Path
) -> None:
    """The file kept the last 100 rollbacks, but the process's list grew with every one,
    and every Admin answer carries it: past ~257 rollbacks of 1,000 characters every
    Admin call failed RESOURCE_EXHAUSTED until a restart. And the rollbacks counter was
    that list's length: adopting another process's stored list moved it back."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    made = 120
    async with server_on(repository) as (_, admin, server):
        for i in range(made):
            await set_rollout(admin, canary_version="2", canary_percent=10)
            await admin.Rollback(apb.RollbackRequest(reason=f"{i:04}" + "r" * 996), metadata=AUTH)
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert len(status.rollbacks) == 100
        assert status.rollbacks[-1].reason.startswith(f"{made - 1:04}")
        assert len(server.rollouts.rollbacks) == 100
        assert rollbacks_counted(server) == made
        # Another process of the host changes the rollout; this one adopts it, with
        # the stored list, and its own count stays.
        async with server_on(repository) as (_, other, _):
            changed = await set_rollout(other, canary_version="2", canary_percent=5)
        deadline = time.monotonic() + 10
        while server.rollouts.state.generation != changed.rollout.generation:
            assert time.monotonic() < deadline, "the stored change was never adopted"
            await asyncio.sleep(0.05)
        assert len(server.rollouts.rollbacks) == 100
        assert rollbacks_counted(server) == made


async def test_a_changed_setting_is_applied_over_the_stored_rollout_alone(
    trained_model: Path, tmp_path: Path
) -> None:
    """A restart with one rollout setting added changes that one only: a promoted
    primary stays (the whole settings' rollout, primary "highest" included, used to
    replace it)."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    add_version(repository, 3)
    async with server_on(repository) as (_, admin, _):
        await set_rollout(admin, canary_version="2", canary_percent=10)
        await admin.Promote(apb.PromoteRequest(), metadata=AUTH)
    async with server_on(repository, shadow_versions="3") as (scoring, admin, _):
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert status.rollout.primary_version == "2"
        assert list(status.rollout.shadow_versions) == ["3"]
        assert (await scoring.Score(request(1, "card-1"))).model.version == "2"


async def test_a_setting_that_gives_the_stored_canary_another_role_leaves_it_one(
    trained_model: Path, tmp_path: Path
) -> None:
    """A restart whose settings name the stored canary as the primary stored primary 2
    and canary 2 at 50 %, a rollout the Admin API refuses (every later percent change
    then failed), and every server adopted it (audit AQ). The version keeps one role:
    the primary's, as after a promote; a shadow that is the canary is dropped too."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    add_version(repository, 3)
    async with server_on(repository, model_version="1") as (_, admin, _):
        await set_rollout(admin, canary_version="2", canary_percent=50)
    async with server_on(repository, model_version="2", shadow_versions="2,3") as served:
        _, admin, server = served
        state = server.rollouts.state
        assert (state.primary, state.canary, state.canary_percent) == ("2", "", 0.0)
        assert state.shadows == ("3",)
        stored = json.loads((repository / MODEL / "rollout.json").read_text())
        assert (stored["primary"], stored["canary"], stored["shadows"]) == ("2", "", ["3"])
        changed = await set_rollout(
            admin, primary_version="2", canary_version="1", canary_percent=5
        )
        assert changed.rollout.canary_version == "1"
        # `rollout set --canary ''` takes the canary off, its percent with it (it was
        # refused: a percent without a canary).
        target = f"127.0.0.1:{server.port}"
        off = ["rollout", "set", "--target", target, "--token", TOKEN, "--canary", ""]
        assert await asyncio.get_running_loop().run_in_executor(None, cli_main, off) == 0
        assert (server.rollouts.state.canary, server.rollouts.state.canary_percent) == ("", 0)


async def test_a_rollout_that_cannot_be_locked_is_the_process_s_alone(
    trained_model: Path, tmp_path: Path
) -> None:
    """A repository the server cannot write (here: the lock's path is taken): it
    serves, its rollout its own (it used to exit)."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    (repository / MODEL / "rollout.json.lock").mkdir()
    async with server_on(repository) as (scoring, admin, server):
        assert server.rollouts.state_file is None
        await set_rollout(admin, shadow_versions=[])
        assert (await scoring.Score(request(1, "card-1"))).model.version == "1"


async def test_settings_that_do_not_fit_the_stored_rollout_are_applied_whole(
    trained_model: Path, tmp_path: Path
) -> None:
    """The settings drop their canary (at 0 % in them) while the stored rollout has it
    at 20 %: that change alone (no canary, 20 %) is no rollout, so the settings' one is
    taken (it used to stop the server)."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 2)
    async with server_on(repository, canary_version="2") as (_, admin, _):
        await set_rollout(admin, canary_version="2", canary_percent=20)
    async with server_on(repository) as (_, admin, _):
        status = await admin.GetRollout(apb.GetRolloutRequest(), metadata=AUTH)
        assert not status.rollout.canary_version and status.rollout.canary_percent == 0


async def test_timings_show_the_wait_in_the_batchers_queue(
    trained_model: Path, tmp_path: Path
) -> None:
    """queue_us is the wait in the batcher's queue (it was always 0, the wait counted in
    model_us): calls that come together to a model of a few ms a call wait, and a
    call's parts never add up to more than its total. (A budget of seconds: with the
    default 50 ms, a loaded box made the slow model shed some as over capacity.)"""
    async with serving(trained_model, tmp_path, budget_ms=2000) as (scoring, admin, _, repository):
        add_version(repository, 5, "slow", repeats=100_000)
        await set_rollout(admin, primary_version="5")
        answers = await drive(scoring, cards=32, rounds=2)
    assert all(a.model.version == "5" for a in answers), {a.request_id for a in answers}
    waited = [a.timings.queue_us for a in answers if a.timings.queue_us > 0]
    assert len(waited) >= len(answers) // 4, [a.timings for a in answers[:8]]
    for a in answers:
        t = a.timings
        assert t.queue_us + t.features_us + t.model_us <= t.total_us, t
        assert t.model_us > 0, t  # the model's own call, after the wait


async def test_canary_answers_in_flight_across_a_promote_leave_no_comparison(
    trained_model: Path, tmp_path: Path
) -> None:
    """A canary answer, or its comparison, that lands after the promote made a
    comparison for a canary that no longer was, shown for ever after (re-audit K)."""
    async with serving(trained_model, tmp_path) as (scoring, admin, server, _):
        await set_rollout(admin, canary_version="2", canary_percent=50)
        await drive(scoring, cards=20, rounds=1)
        canary = server.rollouts.registry.get(server.rollouts.registry.name, "2")
        await admin.Promote(apb.PromoteRequest(), metadata=AUTH)
        # What was in flight lands now.
        vector = canary.inputs_of(dict.fromkeys(canary.metadata.inputs, 0.0))
        server.rollouts.observe(pb.CANARY, canary, 0.001, ok=True)
        server.rollouts.compare_canary(canary, vector, 0.5)
        await asyncio.sleep(0.5)  # the comparison worker's turn
        assert [(v, kind) for v, kind, _ in server.rollouts.candidate_stats()] == []


async def test_an_unreadable_stored_rollout_is_said_once_not_every_poll(
    trained_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Read every poll (0.1 s here, 1 s by default): an unreadable file was logged at
    error every time, for as long as it lasted. Once per cause, and once when read
    again."""
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    caplog.set_level(logging.INFO, logger="streamscore.rollout")
    async with server_on(repository) as (_, _, server):
        stored = repository / MODEL / "rollout.json"
        good = stored.read_bytes()
        stored.write_text("{not json")
        await asyncio.sleep(1.0)  # ten polls
        told = [r for r in caplog.records if r.getMessage() == "rollout file unreadable: ignored"]
        assert len(told) == 1, [r.getMessage() for r in caplog.records]
        stored.write_bytes(good)
        for _ in range(50):
            if any(r.getMessage() == "rollout file readable again" for r in caplog.records):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("not said when readable again")
        assert server.rollouts is not None and server.rollouts.failure is None

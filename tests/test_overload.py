"""Overload: offered 3x what a real `streamscore serve` can score, admitted calls keep
their latency budget and the rest are refused fast with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_rollout import add_version, request

from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import wait_serving
from streamscore.loopback_process import find_free_port
from streamscore.stream.broker import EmbeddedBroker

from system import print_logs, serve_process

BUDGET_MS = 100.0


async def test_three_times_capacity_sheds_fast_and_keeps_the_budget(
    trained_model: Path, tmp_path: Path, broker: EmbeddedBroker
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    # A primary whose backend, not gRPC, is the bottleneck: ~10-15 ms per batch of 2.
    add_version(repository, 6, "slow", repeats=300_000)
    port = find_free_port()
    target = f"127.0.0.1:{port}"
    server = serve_process(
        broker.bootstrap,
        port,
        repository,
        tmp_path,
        model_version="6",
        budget_ms=str(BUDGET_MS),
        drain_delay_s="0",
    )
    await server.start()
    try:
        await wait_serving(target, timeout=90)
        async with grpc.aio.insecure_channel(target) as channel:
            scoring = pb_grpc.ScoringStub(channel)
            # Capacity: closed loop, 8 callers for 2 s (warms the latency model too).
            done = 0
            until = time.monotonic() + 2.0

            async def caller(c: int) -> None:
                nonlocal done
                i = 0
                while time.monotonic() < until:
                    i += 1
                    try:
                        await scoring.Score(request(i, f"card-{c}-{i}"), timeout=5)
                        done += 1
                    except grpc.aio.AioRpcError:
                        pass

            await asyncio.gather(*(caller(c) for c in range(8)))
            capacity = done / 2.0
            assert capacity > 10, capacity
            # Open loop at three times that, for 3 s; latency from the intended send.
            rate, seconds = 3 * capacity, 3.0
            # (code, client ms from the intended send, client ms from the actual send,
            # server ms, degraded)
            outcomes: list[tuple[str, float, float, float, bool]] = []

            async def one(i: int, due: float) -> None:
                server_ms, degraded = 0.0, False
                sent = time.monotonic()
                try:
                    reply = await scoring.Score(request(i, f"card-{i % 500}"), timeout=5)
                    code, degraded = "OK", bool(reply.degraded)
                    server_ms = reply.timings.total_us / 1000
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                end = time.monotonic()
                outcomes.append(
                    (code, (end - due) * 1000, (end - sent) * 1000, server_ms, degraded)
                )

            # No collector pauses in the load generator: in a long pytest session a
            # full collection of everything the earlier tests left can stall this
            # loop for hundreds of ms (CI once sent ~0.5 s late), which is not the
            # server's doing.
            gc.collect()
            gc.freeze()
            gc.disable()
            try:
                start = time.monotonic()
                calls = []
                for i in range(int(rate * seconds)):
                    due = start + i / rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    calls.append(asyncio.create_task(one(i, due)))
                await asyncio.gather(*calls)
            finally:
                gc.enable()
                gc.unfreeze()
        server.check_running()
    finally:
        await server.stop()
        print_logs(tmp_path)
    codes: dict[str, int] = {}
    for code, *_ in outcomes:
        codes[code] = codes.get(code, 0) + 1
    ok_ms = np.array([ms for code, ms, *_ in outcomes if code == "OK"])
    ok_sent_ms = np.array([ms for code, _, ms, _, _ in outcomes if code == "OK"])
    # Scored by the model (not degraded): the batcher's promise is about these. The
    # few deadline fallbacks (degraded, counted below) run this same heavy model
    # unbatched and can finish late: a known limit, see BENCHMARKS.md.
    ok_server_ms = np.array([ms for code, _, _, ms, d in outcomes if code == "OK" and not d])
    shed_ms = np.array([ms for code, ms, *_ in outcomes if code == "RESOURCE_EXHAUSTED"])
    # A refusal's round trip from the moment the call was actually made: without the
    # generator's own lateness in sending, which on 2 shared cores (CI runs this among
    # other tests) alone reached the budget in a p99 tail while the server refused in
    # about 2 ms.
    shed_sent_ms = np.array([ms for code, _, ms, _, _ in outcomes if code == "RESOURCE_EXHAUSTED"])
    degraded = sum(1 for *_, d in outcomes if d)
    print(
        f"capacity {capacity:.0f}/s, offered {rate:.0f}/s: {codes}, degraded {degraded}; "
        f"admitted p50 {np.percentile(ok_ms, 50):.1f} p99 {np.percentile(ok_ms, 99):.1f} ms "
        f"(from the actual send p99 {np.percentile(ok_sent_ms, 99):.1f}, "
        f"server p99 {np.percentile(ok_server_ms, 99):.1f}); "
        f"shed p50 {np.percentile(shed_ms, 50):.1f} p99 {np.percentile(shed_ms, 99):.1f} ms "
        f"(from the actual send p99 {np.percentile(shed_sent_ms, 99):.1f})"
    )
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    # It kept scoring at about its capacity and refused the excess.
    assert len(ok_ms) >= 0.5 * capacity * seconds, (len(ok_ms), capacity)
    assert len(shed_ms) >= 0.3 * rate * seconds, (len(shed_ms), rate)
    # Admitted calls made their budget, as the server measured them (the client's view
    # adds the client's own delays on the same 2 cores: checked loosely, and from the
    # actual send, since the generator itself can fall behind its schedule);
    # refusals came much faster than an answer.
    # A score is only ever set by its deadline; what follows it (decision, response)
    # runs on the loaded loop too: 10 % over is allowed for that.
    assert np.percentile(ok_server_ms, 99) <= 1.1 * BUDGET_MS, np.percentile(ok_server_ms, 99)
    assert np.percentile(ok_sent_ms, 99) <= 3 * BUDGET_MS, np.percentile(ok_sent_ms, 99)
    assert np.median(shed_ms) <= 0.25 * BUDGET_MS, np.median(shed_ms)
    assert np.percentile(shed_sent_ms, 99) <= BUDGET_MS, np.percentile(shed_sent_ms, 99)
    # Admission is a prediction: under CPU contention a few admitted calls still miss
    # and are answered by the fallback (degraded), never many.
    assert degraded <= 0.1 * len(ok_ms), degraded


async def test_a_burst_past_the_pending_limit_is_refused_at_once_the_rest_answered(
    trained_model: Path, tmp_path: Path
) -> None:
    """2,500 calls at once, no deadline. Past ``max_pending_calls`` gRPC refuses calls
    at once (CANCELLED): the queue before the handlers is bounded, so that under a
    sustained overload calls do not all wait past their deadlines. Raised, the same
    burst waits its turn and is answered."""
    from collections import Counter

    from test_rollout import serving

    async def burst(scoring: pb_grpc.ScoringStub) -> Counter[str]:
        async def one(i: int) -> str:
            try:
                await scoring.Score(request(i, f"card-{i % 97}"))
                return "OK"
            except grpc.aio.AioRpcError as error:
                return error.code().name

        await scoring.Score(request(0, "card-0"))
        return Counter(await asyncio.gather(*(one(i) for i in range(2_500))))

    async with serving(trained_model, tmp_path / "default") as (scoring, _, server, _):
        assert server.settings.max_pending_calls < 2_500
        codes = await burst(scoring)
        assert set(codes) <= {"OK", "CANCELLED"} and codes["OK"] >= 256, codes
        # Refused past the limit: about the limit answered (258 in every run here),
        # the rest CANCELLED (a limit ignored answered all 2,500).
        assert codes["OK"] <= 2 * 256 and codes["CANCELLED"] >= 2_500 - 2 * 256, codes
        print(f"burst of 2,500, max_pending_calls 256: {dict(codes)}")
    raised = {"max_pending_calls": 10_000}
    async with serving(trained_model, tmp_path / "raised", **raised) as (scoring, _, _, _):
        assert await burst(scoring) == {"OK": 2_500}


@pytest.mark.parametrize("budget_ms", [BUDGET_MS, 20.0])
async def test_a_lone_stream_faster_than_the_model_is_answered_in_full(
    trained_model: Path, tmp_path: Path, budget_ms: float
) -> None:
    """A ScoreStream reads up to 64 messages ahead. Sent at once to a model that takes
    milliseconds a batch, they filled the batcher's queue past the budget and the
    stream shed its own messages: it ended with RESOURCE_EXHAUSTED after 30-40 of 200
    (a stream has one status). A message shed while the stream's own messages are
    being scored now waits for one of them to end and tries again, as often as that
    holds, so the stream paces itself. (Waiting only once, for the message before it,
    ended the stream now and then at a 100 ms budget under CPU load, and mostly at 20
    ms: the stream's later messages, admitted meanwhile, were queued ahead of it.)"""
    from test_rollout import server_on

    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 6, "slow", repeats=300_000)
    requests = [request(i, f"card-{i}") for i in range(400)]
    async with server_on(repository, model_version="6", budget_ms=budget_ms) as (scoring, *_):
        answers = [answer async for answer in scoring.ScoreStream(iter(requests), timeout=60)]
    assert [a.request_id for a in answers] == [r.request_id for r in requests]


async def test_a_stream_faster_than_the_model_leaves_room_for_unary_calls(
    trained_model: Path, tmp_path: Path
) -> None:
    """Audit AX: one ScoreStream sent faster than the model took the model's whole
    queue (a message shed beside its own waited, then took the room the next of its
    own Scores left), and unary calls at a tenth of the model's capacity were refused
    78-87 % of the time. A stream's message tried beside its own now takes only a share
    of the queue (STREAM_QUEUE_SHARE): the stream paces itself, and the rest of the
    queue takes the unary calls."""
    from test_rollout import server_on

    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 6, "slow", repeats=300_000)
    messages = [request(i, f"card-{i}") for i in range(1500)]
    async with server_on(repository, model_version="6") as (scoring, *_):
        stream = asyncio.create_task(_answers(scoring.ScoreStream(iter(messages), timeout=120)))
        await asyncio.sleep(0.5)  # the stream has read ahead and filled what it may
        codes: list[str] = []
        while not stream.done() and len(codes) < 30:
            try:
                await scoring.Score(request(10_000 + len(codes), "unary-card"), timeout=2)
                codes.append("OK")
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
            await asyncio.sleep(0.05)
        answers = await stream
    assert [a.request_id for a in answers] == [m.request_id for m in messages]
    assert len(codes) >= 10, codes  # (calls made while the stream was busy)
    assert codes.count("OK") >= 0.8 * len(codes), codes


async def _answers(call: object) -> list[object]:
    return [answer async for answer in call]  # type: ignore[attr-defined]


async def test_a_message_refused_in_its_score_ends_the_stream_after_every_answer_before_it(
    trained_model: Path, tmp_path: Path
) -> None:
    """Audit AY: on a slow model, 30 messages then one whose event time is an hour
    ahead (refused inside its Score, after the reader's checks). The error woke the
    messages before it that were waiting their turn, to try at once; shed, they ended
    the stream with RESOURCE_EXHAUSTED at a valid message, 3-15 of its 30 answers
    sent, in 12 of 12 streams. Read with the synchronous client: grpc.aio's can drop
    answers sent before an error (README)."""
    from test_rollout import server_on

    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 6, "slow", repeats=300_000)
    messages = [request(i, f"card-{i}") for i in range(31)]
    messages[30].transaction.event_time_ms = int(time.time() * 1000) + 3_600_000

    def read_all(port: int) -> tuple[int, grpc.StatusCode, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers = pb_grpc.ScoringStub(channel).ScoreStream(iter(messages), timeout=60)
            read = 0
            try:
                for _ in answers:
                    read += 1
            except grpc.RpcError as error:
                return read, error.code(), error.details()
            raise AssertionError("the stream ended OK")

    async with server_on(repository, model_version="6") as (_, _, server):
        for _ in range(3):
            read, code, details = await asyncio.to_thread(read_all, server.port)
            assert (read, code) == (30, grpc.StatusCode.INVALID_ARGUMENT), details
            assert "transaction.event_time_ms" in details and "'r-30'" in details, details

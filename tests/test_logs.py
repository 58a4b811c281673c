"""Structured logs: JSON lines, each written while serving a request names it, and
card numbers never appear in clear (hashed)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import orjson
import pytest
from test_rollout import add_version

from streamscore import logs
from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.logs import CURRENT_REQUEST, JsonFormatter, hash_id
from streamscore.server.app import ScoringServer
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.topics import TopicLayout

CARD = "4111111111111111"  # a card number, as a careless client might send


def score_request(request_id: str, **fields: object) -> pb.ScoreRequest:
    transaction = {"card_id": CARD, "merchant_id": "m-1", "amount_minor": 500, **fields}
    return pb.ScoreRequest(request_id=request_id, transaction=pb.Transaction(**transaction))


async def test_logs_are_json_name_the_request_and_hash_the_card(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    add_version(repository, 3, "nan")  # scores NaN for real features: backend and fallback fail
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    server = ScoringServer(
        Settings(port=0, model_repository=repository, model_version="3", model_reload_interval_s=0)
    )
    try:
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Score(score_request("r-broken-model"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Score(score_request("r-bad-amount", amount_minor=-1), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stream = stub.ScoreStream(iter([score_request("r-stream-bad", amount_minor=-1)]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream:
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Refused inside Score, which a stream runs in a context of its own: the
            # refusal's line is written in the handler's, and names it too.
            future_ms = int(time.time() * 1000) + 600_000
            for request, code in (
                (score_request("r-stream-future", event_time_ms=future_ms), "INVALID_ARGUMENT"),
                (score_request("r-stream-broken-model"), "UNAVAILABLE"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.ScoreStream(iter([request])):
                        pass
                assert caught.value.code().name == code
    finally:
        await server.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = captured.getvalue()
    entries = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert entries, "nothing logged"
    assert CARD not in text
    by_request: dict[str, list[dict]] = {}
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= set(entry)
        if "request_id" in entry:
            assert entry["card_hash"] == hash_id(CARD)
            by_request.setdefault(entry["request_id"], []).append(entry)
    broken = {e["msg"] for e in by_request["r-broken-model"]}
    assert "model backend failed, using the fallback" in broken
    assert "fallback model failed" in broken
    assert [e["code"] for e in by_request["r-bad-amount"]] == ["INVALID_ARGUMENT"]
    assert [e["code"] for e in by_request["r-stream-bad"]] == ["INVALID_ARGUMENT"]
    assert [e["code"] for e in by_request["r-stream-future"]] == ["INVALID_ARGUMENT"]
    stream_broken = by_request["r-stream-broken-model"]
    assert [e["code"] for e in stream_broken if "code" in e] == ["UNAVAILABLE"]
    assert "fallback model failed" in {e["msg"] for e in stream_broken}
    # Lines outside any request carry no request fields.
    assert any("request_id" not in e for e in entries)
    # Extras with non-string keys are logged too (warm-up time per batch size).
    ready = [e for e in entries if e["msg"] == "model version ready"]
    assert ready and ready[0]["version"] == "3", entries
    assert ready[0]["warmup_us"] and all(size.isdigit() for size in ready[0]["warmup_us"])


def test_card_hashes_are_keyed_so_card_numbers_cannot_be_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A card number has about 10^5 candidates once its BIN and last four digits are
    known: an unkeyed hash of it is reversed in a second. Keyed, the hash says nothing
    without the key; with a shared key (card_hash_key) it is the same everywhere."""
    monkeypatch.setattr(logs, "_HASH_KEY", logs._HASH_KEY)
    monkeypatch.setattr(logs, "_HASH_KEY_SHARED", False)
    card = "4111111111111111"
    unkeyed = hashlib.blake2b(card.encode(), digest_size=8, person=b"ss-card").hexdigest()
    per_process = hash_id(card)
    assert per_process != unkeyed and not logs.hash_key_shared()
    logs.set_hash_key("one secret")
    shared = hash_id(card)
    assert shared not in (unkeyed, per_process) and logs.hash_key_shared()
    assert hash_id(card) == shared  # stable
    logs.set_hash_key("another secret")
    assert hash_id(card) != shared


def test_a_requests_line_names_its_id_clipped_and_no_hash_of_no_card() -> None:
    """A request that did not parse (or left the card out) had the hash of an empty
    card id, one value for unrelated requests; an id of any length was written whole."""
    record = logging.LogRecord("streamscore.scoring", logging.INFO, "", 0, "refused", None, None)
    lines = []
    for request in (("r-1", ""), ("R" * 1000, "4111")):
        token = CURRENT_REQUEST.set(request)
        try:
            lines.append(orjson.loads(JsonFormatter().format(record)))
        finally:
            CURRENT_REQUEST.reset(token)
    assert lines[0]["request_id"] == "r-1" and "card_hash" not in lines[0]
    assert lines[1]["request_id"] == "R" * 64 + "... (1000 characters)"
    assert lines[1]["card_hash"] == hash_id("4111")


async def test_the_worker_writes_only_json_lines(tmp_path: Path) -> None:
    """stdout and stderr merged, as a container runtime does: every line is JSON (Faust's
    progress spinner wrote terminal escapes to stdout, corrupting the next line)."""
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamscore",
            "worker",
            "--kafka",
            broker.bootstrap,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        await asyncio.sleep(6)  # joined its group, routing
        worker.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(worker.communicate(), 60)
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and worker.returncode == 0
    for line in lines:
        orjson.loads(line)  # raises on anything else


def test_a_librarys_repeated_errors_are_limited_and_counted() -> None:
    """A broker outage: aiokafka logs each failed reconnect and fetch, ~10 a second per
    client. One line a template per 10 s passes, the next saying how many were held
    back; ours are never held back."""
    from streamscore.logs import RepeatLimiter

    now = [0.0]
    limiter = RepeatLimiter(clock=lambda: now[0])

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("node 1",), None)

    passed = []
    for _ in range(50):
        passed.append(limiter.filter(record("aiokafka.conn", "Unable connect to %s")))
        now[0] += 0.1
    assert passed.count(True) == 1
    assert limiter.filter(record("aiokafka.cluster", "Unable to update metadata"))  # another
    now[0] = 10.5
    again = record("aiokafka.conn", "Unable connect to %s")
    assert limiter.filter(again) and again.repeats_held_back == 49
    assert all(limiter.filter(record("streamscore.replica", "fetch failed")) for _ in range(20))
    # A producer sending bad events: each is dead-lettered and counted, its line limited.
    dead = [limiter.filter(record("streamscore.dead_letters", "dead-lettered event"))]
    dead += [limiter.filter(record("streamscore.dead_letters", "dead-lettered event"))]
    assert dead == [True, False]
    # Limited per reason: the first event of another kind is still told.
    reasons = []
    for reason in ("bad_json", "bad_json", "too_late"):
        line = record("streamscore.dead_letters", "dead-lettered event")
        line.reason = reason
        reasons.append(limiter.filter(line))
    assert reasons == [True, False, True]
    # A fallback model failing every call (a canary returning NaN): one line, counted.
    fallback = [limiter.filter(record("streamscore.fallbacks", "fallback model failed"))]
    fallback += [limiter.filter(record("streamscore.fallbacks", "fallback model failed"))]
    assert fallback == [True, False]


def test_lines_held_back_for_a_stream_closed_since_are_dropped_quietly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At exit, the held-back lines of a handler whose stream was closed before (a test
    run's captured stderr, closed by pytest) printed "--- Logging error ---" and a
    traceback after the test summary."""
    import io

    from streamscore.logs import RepeatLimiter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    limiter = RepeatLimiter()
    for _ in range(3):
        record = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "down %s", ("x",), None)
        if limiter.filter(record):
            handler.handle(record)
    stream.close()
    limiter.flush(handler)
    assert "Logging error" not in capsys.readouterr().err


def test_the_count_held_back_after_the_last_line_is_written_at_exit() -> None:
    """A burst of bad events, then none: the line after the burst that would have said
    how many were held back never came, so the log undercounted for good. At exit the
    last one held back is written, with how many others were."""
    script = (
        "import logging\n"
        "from streamscore.logs import setup_logging\n"
        "setup_logging()\n"
        "log = logging.getLogger('streamscore.dead_letters')\n"
        "for i in range(5):\n"
        "    log.warning('dead-lettered event', extra={'reason': 'bad_json', 'n': i})\n"
        "log.warning('dead-lettered event', extra={'reason': 'too_late', 'n': 9})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    told = [(e["reason"], e["n"], e.get("repeats_held_back")) for e in lines]
    assert told == [("bad_json", 0, None), ("too_late", 9, None), ("bad_json", 4, 3)], told


@pytest.mark.parametrize("level", ["info", "debug"])
def test_grpcs_error_for_an_answer_sent_past_its_deadline_is_a_debug_line(level: str) -> None:
    """gRPC logs "ExecuteBatchError raised in core" at error, with a traceback, when a
    unary answer goes out as its caller's deadline runs out: once or twice per 30,000
    short-deadline calls, an error line that alerting would page on (audit AM). At
    debug only, without the traceback; gRPC's other errors stay errors."""
    script = (
        "import logging\n"
        "from streamscore.logs import GRPC_AIO_LOGGER, setup_logging\n"
        f"setup_logging({level!r})\n"
        "log = logging.getLogger(GRPC_AIO_LOGGER)\n"
        "try:\n"
        "    raise RuntimeError('Failed \"execute_batch\": (<grpc._cython.cygrpc...>)')\n"
        "except RuntimeError:\n"
        "    log.exception('ExecuteBatchError raised in core by servicer method "
        "[/streamscore.v1.Scoring/Score]')\n"
        "    log.exception('Unexpected [RuntimeError] raised by servicer method')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    told = [(e["level"], e["msg"].split()[0], "exc" in e) for e in lines]
    other = ("error", "Unexpected", True)
    if level == "info":
        assert told == [other], told
    else:
        assert told == [("debug", "ExecuteBatchError", False), other], told


def test_text_logs_keep_the_fields() -> None:
    """``--log-format text`` wrote the message alone: "grpc server listening", without
    the port that ``serve --port 0`` had picked, and no request id on a request's lines."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logs.TextFormatter())
    record = logging.LogRecord(
        "streamscore.server", logging.INFO, __file__, 1, "listening", (), None
    )
    record.__dict__.update(port=50123, host="127.0.0.1", own_port=None, note="two words")
    token = CURRENT_REQUEST.set(("req-7", "4111111111111111"))
    try:
        line = handler.format(record)
    finally:
        CURRENT_REQUEST.reset(token)
    assert line.endswith(
        "INFO streamscore.server: listening request_id=req-7 "
        f"card_hash={hash_id('4111111111111111')} port=50123 host=127.0.0.1 "
        'note="two words"'
    ), line
    assert "4111111111111111" not in line and "own_port" not in line
    # A caller's id cannot forge a line or hide one behind a terminal escape.
    token = CURRENT_REQUEST.set(("r\n2026-11-30 INFO forged\x1b[2K", ""))
    try:
        forged = handler.format(record)
    finally:
        CURRENT_REQUEST.reset(token)
    assert "\n" not in forged and "\x1b" not in forged, forged
    assert 'request_id="r\\n2026-11-30 INFO forged\\u001b[2K"' in forged, forged
    record.msg = "line\none"
    assert "listening" not in handler.format(record) and "line\\x0aone" in handler.format(record)


def test_lines_held_back_come_before_the_line_a_command_stops_with(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Written at exit, the held-back lines came after the one line that says why the
    command stopped, which must stay the last (a container's last log line)."""
    import argparse

    from streamscore.cli import _fatal

    root = logging.getLogger()
    handlers, level, flush = root.handlers[:], root.level, logs._flush_at_exit
    try:
        logs.setup_logging(fmt="text")
        dead = logging.getLogger("streamscore.dead_letters")
        for _ in range(3):
            dead.info("dead-lettered event", extra={"reason": "bad_json"})
        _fatal("the reason it stopped", argparse.Namespace(log_format="text"))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logs._flush_at_exit = flush
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "streamscore: the reason it stopped", lines
    assert "repeats_held_back=1" in lines[-2], lines

"""Smoke test of the Locust load test (loadtest/locustfile.py) against a real server.

The server runs in this process (as in test_server.py); Locust runs as subprocesses,
because it monkey-patches the standard library with gevent on import, which must
never happen inside pytest. The three runs (``Score``, ``ScoreStream``, and a short
``spike`` shape mixing both) share the server and run at the same time to keep the
test short; each writes its own CSV and HTML reports.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.server.app import ScoringServer

pytestmark = pytest.mark.integration

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"


@pytest.fixture
async def target(trained_model: Path) -> AsyncIterator[str]:
    server = ScoringServer(Settings(port=0, model_repository=trained_model))
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def run_locust(
    target: str,
    prefix: Path,
    *args: str,
    env: dict[str, str] | None = None,
    exit_code: int = 0,
) -> str:
    """Run Locust headless; returns its output, asserting its exit code (1: there
    were failures)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        target,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--loglevel",
        "WARNING",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "STREAMSCORE_WAIT_S": "0.01", **(env or {})},
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    output = out.decode(errors="replace")
    assert process.returncode == exit_code, output
    return output


def stats_rows(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def assert_clean(prefix: Path, name: str, output: str) -> None:
    rows = stats_rows(prefix)
    assert name in rows, (sorted(rows), output)
    row = rows[name]
    assert row["Type"] == "grpc"
    assert int(row["Request Count"]) > 0, (row, output)
    assert int(row["Failure Count"]) == 0, (row, output)
    # The CSV has the whole run: the count of the summary Locust prints at exit (its
    # CSV writer ran once a second and missed the last second). (Not its --json-file:
    # writing that resets the counts.)
    # The last table printed is the final percentiles', whose last column is the count.
    printed = re.findall(rf"^grpc\s+{name}\s.*\s(\d+)\s*$", output, re.MULTILINE)
    assert printed, output
    assert int(row["Request Count"]) == int(printed[-1]), (row, output)
    html = Path(f"{prefix}.html")
    assert html.exists() and html.stat().st_size > 0


async def test_locust_score_stream_and_shape(target: str, tmp_path: Path) -> None:
    score, stream, shape = tmp_path / "score", tmp_path / "stream", tmp_path / "spike"
    outputs = await asyncio.gather(
        run_locust(target, score, "-u", "4", "-r", "4", "-t", "5s", "ScoreUser"),
        run_locust(target, stream, "-u", "4", "-r", "4", "-t", "5s", "ScoreStreamUser"),
        run_locust(
            target,
            shape,
            env={
                "STREAMSCORE_SHAPE": "spike",
                "STREAMSCORE_SHAPE_SECONDS": "5",
                "STREAMSCORE_SHAPE_USERS": "1",
                "STREAMSCORE_SPIKE_FACTOR": "3",
            },
        ),
    )
    assert_clean(score, "Score", outputs[0])
    assert_clean(stream, "ScoreStream", outputs[1])
    # No user class named: the shape mixes both users.
    assert_clean(shape, "Score", outputs[2])
    assert_clean(shape, "ScoreStream", outputs[2])


class DropsStreamMessages(pb_grpc.ScoringServicer):
    """A ScoreStream server that never answers messages 10 to 12 of each stream and
    answers the rest at once: every message it read is counted."""

    def __init__(self) -> None:
        self.read = 0
        self.dropped = 0

    async def ScoreStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for i, request in _enumerate(request_iterator):
            self.read += 1
            if 10 <= i <= 12:
                self.dropped += 1
                continue
            yield pb.ScoreResponse(request_id=request.request_id, score=0.5)


async def _enumerate(items):  # type: ignore[no-untyped-def]
    i = 0
    async for item in items:
        yield i, item
        i += 1


async def test_locust_reports_every_stream_message_the_server_leaves_unanswered(
    tmp_path: Path,
) -> None:
    """With several messages in flight a stream's unanswered one was never reported
    (only once every slot held such a message), its slot held for the rest of the
    run, and those pending at the end were dropped from the stats (audit AJ). Each
    message now has its own deadline, and the run's last ones are awaited or failed."""
    servicer = DropsStreamMessages()
    server = grpc.aio.server()
    pb_grpc.add_ScoringServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        prefix = tmp_path / "lost"
        output = await run_locust(
            f"127.0.0.1:{port}",
            prefix,
            *("-u", "2", "-r", "2", "-t", "4s", "ScoreStreamUser"),
            env={"STREAMSCORE_STREAM_DEPTH": "4", "STREAMSCORE_TIMEOUT_S": "1"},
            exit_code=1,
        )
    finally:
        await server.stop(None)
    row = stats_rows(prefix)["ScoreStream"]
    # Every message the server read is in the stats once, answered or failed; each
    # dropped one failed, at its deadline (not seconds later, when the slots ran out).
    assert int(row["Request Count"]) == servicer.read, (row, servicer.read, output)
    assert servicer.dropped >= 6
    assert servicer.dropped <= int(row["Failure Count"]) <= servicer.dropped + 8, (row, output)
    assert float(row["Max Response Time"]) < 1500, row

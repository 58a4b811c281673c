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

import pytest

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
    target: str, prefix: Path, *args: str, env: dict[str, str] | None = None
) -> str:
    """Run Locust headless; returns its output, asserting a clean exit."""
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
    assert process.returncode == 0, output
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

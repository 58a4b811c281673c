"""Smoke tests of the load tools: ``loadtest.sweep`` and ``loadtest.report --quick``.

The sweep runs as a subprocess (its client processes are spawned from there) against
a real server in this process (as in test_server.py), for about two seconds per RPC
at low rates; the report runs its whole quick suite (its own broker, echo server and
two ``streamscore serve`` processes) with the session's trained model.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamscore.config import Settings
from streamscore.server.app import ScoringServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


@pytest.fixture
async def target(trained_model: Path) -> AsyncIterator[str]:
    server = ScoringServer(Settings(port=0, model_repository=trained_model))
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def run_module(*argv: str, timeout: float) -> str:
    """``python -m ARGV`` from the repository root; its output, asserting exit 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    output = out.decode(errors="replace")
    assert process.returncode == 0, output
    return output


@pytest.mark.parametrize("rpc", ["score", "stream"])
async def test_sweep_two_clients_json(target: str, tmp_path: Path, rpc: str) -> None:
    out = tmp_path / "sweep.json"
    output = await run_module(
        "loadtest.sweep",
        "--target",
        target,
        "--rpc",
        rpc,
        "--rates",
        "40,80",
        "--seconds",
        "1",
        "--clients",
        "2",
        "--budget-p99-ms",
        "5000",
        "--server-pid",
        str(os.getpid()),  # the server runs in this process
        "--requests",
        "1000",
        "--json",
        str(out),
        timeout=60,
    )
    report = json.loads(out.read_text())
    assert report["rpc"] == rpc and report["clients"] == 2, output
    rows = report["rows"]
    assert [row["offered_rate"] for row in rows] == [40.0, 80.0], output
    for row in rows:
        assert row["achieved_rate"] > 0, (row, output)
        assert row["ok"] == int(row["offered_rate"] * 1), (row, output)
        assert row["errors"] == 0 and row["dropped"] == 0, (row, output)
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        assert row["p99_ms"] <= row["p999_ms"] <= row["max_ms"], row
        assert row["server_cpu_us"] > 0 and row["passed"] is True, row
    assert report["max_rate"] == 80.0, output
    assert "highest offered rate" in output


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table: rows of cells, header first (the |---| line checked and dropped)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            assert len(current) >= 3, current
            assert all(re.fullmatch(r"-{3,}", cell) for cell in current[1]), current[1]
            assert all(len(row) == len(current[0]) for row in current), current
            tables.append([current[0], *current[2:]])
            current = []
    return tables


async def test_report_quick(trained_model: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "BENCH.md", tmp_path / "plots"
    before = "# Benchmarks\n\nHand-written text, never touched.\n"
    out.write_text(before)
    await run_module(
        "loadtest.report",
        "--quick",
        "--out",
        str(out),
        "--plots",
        str(plots),
        "--model-repository",  # the session's model: no second training here
        str(trained_model),
        timeout=150,
    )
    text = out.read_text()
    assert text.startswith(before)
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert "python -m loadtest.report --quick" in section
    assert "grpcio" in section and "onnxruntime" in section and "CPUs" in section

    latency, best = markdown_tables(section)[:2]
    header = latency[0]
    column = {name: i for i, name in enumerate(header)}
    assert {"configuration", "offered/s", "p50 ms", "p99 ms", "server CPU us/req"} <= set(header)
    configs = {row[0] for row in latency[1:]}
    assert configs == {"echo", "onnxruntime, batching on", "onnxruntime, batching off"}
    assert {float(row[column["offered/s"]]) for row in latency[1:]} == {100.0, 200.0}
    for row in latency[1:]:
        p50, p99 = float(row[column["p50 ms"]]), float(row[column["p99 ms"]])
        assert 0 < p50 <= p99 <= float(row[column["max ms"]]), row
        assert float(row[column["achieved/s"]]) > 0, row
        assert int(row[column["errors"]]) == 0, row
        assert float(row[column["server CPU us/req"]]) > 0, row
    assert {row[0] for row in best[1:]} == configs

    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
    assert len(links) >= 2, section
    for link in links:
        png = (out.parent / link).resolve()
        assert png.is_relative_to(plots.resolve()), link
        assert png.read_bytes()[:8] == PNG, link
    assert json.loads((plots / "report.json").read_text())["rows"]


def test_report_section_replaces_only_between_markers(tmp_path: Path) -> None:
    from loadtest.report import write_section

    path = tmp_path / "B.md"
    path.write_text("head\nno newline at end")
    write_section(path, "first\n")
    assert path.read_text() == f"head\nno newline at end\n\n{BEGIN}\nfirst\n{END}\n"
    path.write_text(path.read_text() + "tail, kept\n")
    write_section(path, "second\n")
    assert path.read_text() == f"head\nno newline at end\n\n{BEGIN}\nsecond\n{END}\ntail, kept\n"
    path.write_text(f"{END}\n{BEGIN}\n")
    with pytest.raises(SystemExit):
        write_section(path, "x\n")
    assert path.read_text() == f"{END}\n{BEGIN}\n"

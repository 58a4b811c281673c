"""The README's examples run as written: the payment event, the sample log command, and
the Python client (a user copies these; audit AZ found the schema and a client call
missing from it)."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from test_rollout import server_on

from streamscore.stream.events import parse_event

README = Path(__file__).resolve().parent.parent / "README.md"


def block_after(marker: str, language: str) -> str:
    """The first ``language`` code block after ``marker`` in the README."""
    text = README.read_text()
    start = text.index(marker)
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.M | re.S).search(text, start)
    assert match is not None, (marker, language)
    return match.group(1)


def test_the_readmes_payment_event_is_valid_and_its_sample_log_backfills(tmp_path: Path) -> None:
    event = parse_event(block_after("**Payment events.**", "json"))
    assert (event.card_id, event.amount_minor, event.status) == ("c-42", 1999, "approved")

    command = block_after("A sample log of synthetic traffic", "bash")
    assert command.startswith(".venv/bin/python "), command
    subprocess.run(
        command.replace(".venv/bin/python", shlex.quote(sys.executable), 1),
        shell=True,
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) > 1000, len(lines)  # 60 s at 50 events/s
    for line in lines:
        parse_event(line)  # every generated event is valid
    out = tmp_path / "features.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "streamscore", "backfill", "events.jsonl", "-o", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == len(lines)


async def test_the_readmes_python_client_scores_on_a_real_server(
    trained_model: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(trained_model, repository)
    code = block_after("From Python, with the generated code", "python")
    assert '"127.0.0.1:50051"' in code
    async with server_on(repository, model_version="1") as (_, _, server):
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code.replace("50051", str(server.port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(client.communicate(), timeout=60)
    assert client.returncode == 0, stderr.decode()
    decision, score, version = stdout.decode().split()
    assert decision in {"APPROVE", "REVIEW", "DECLINE"}
    assert 0.0 <= float(score) <= 1.0
    assert version == "1"

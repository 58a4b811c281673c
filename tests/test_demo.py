"""The README's main command: ``streamscore demo`` runs, scores, and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_tls import Authority

from system import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def _temporary_files_in_the_tests_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A demo that fails keeps its logs' temporary directory, by design: under the
    test's own directory, not left in /tmp by every run of the suite."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def demo_argv(trained_model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamscore",
        "demo",
        "--rate",
        "100",
        "--port",
        str(free_port()),
        "--model-repository",
        str(trained_model),
        "--log-format",
        "text",
        *extra,
    ]


def assert_scored_and_stopped(output: str) -> None:
    assert "stopped cleanly" in output, output[-3000:]
    done = re.search(r"done: (\d+) scored, (\d+) failed", output)
    assert done is not None, output[-3000:]
    assert int(done.group(1)) > 100
    assert re.search(r"scores/s\s+p50\s+[\d.]+ ms\s+p99", output)


def demo_serving(argv: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    """A demo started and read until its server is on: the process and its lines."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    while not any("server on" in line for line in lines):
        lines.append(process.stdout.readline())
        if not lines[-1]:
            process.kill()
            raise AssertionError("".join(lines)[-3000:])
    return process, lines


def stop_line(
    argv: list[str], env: dict[str, str], *, code: int, within_s: float
) -> tuple[str, str]:
    """The one ``streamscore:`` line of a demo that stops at start with ``code``, as
    it should, and all it wrote."""
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert time.monotonic() - started < within_s, output[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("streamscore:")]
    return line, output


def children_of(pid: int) -> list[str]:
    result = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_demo_runs_for_a_duration_and_exits_zero(trained_model: Path) -> None:
    result = subprocess.run(
        demo_argv(trained_model, "--duration", "6"),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert_scored_and_stopped(output)
    # Its parts' logs were in a temporary directory, which a clean stop removes.
    logs = re.search(r"logs in (\S+) \(removed after a clean stop", output)
    assert logs is not None, output[-3000:]
    assert not Path(logs.group(1)).exists()


def test_demo_stops_cleanly_on_ctrl_c(trained_model: Path, tmp_path: Path) -> None:
    # Ctrl-C in a terminal signals the whole foreground process group: do the same.
    # Its logs asked for in a directory of the user's, which is kept.
    log_dir = tmp_path / "demo-logs"
    process = subprocess.Popen(
        demo_argv(trained_model, "--log-dir", str(log_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "scores/s" in line and len([x for x in lines if "scores/s" in x]) >= 2:
            break
    children = children_of(process.pid)
    assert any("worker" in c for c in children) and any("serve" in c for c in children)
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    output = "".join(lines) + rest
    assert process.returncode == 0, output[-3000:]
    assert_scored_and_stopped(output)
    assert "exited unexpectedly" not in output
    assert f"logs in {log_dir}\n" in output, output[-3000:]
    for part in ("server", "worker"):
        assert (log_dir / f"{part}.log").stat().st_size > 0, part
    for child in children:
        pid = int(child.split()[0])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_demo_keeps_an_existing_model_and_notes_a_missing_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamscore.config import Settings
    from streamscore.demo import ensure_model

    settings = Settings(model_repository=tmp_path)
    old = tmp_path / settings.model_name / "3"
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes(b"kept as it is")
    await ensure_model(settings)  # no training: a version is there
    out = capsys.readouterr().out
    assert "training" not in out
    assert f"{old} has no model.onnx" in out and "--version 4" in out, out
    assert sorted(p.name for p in old.iterdir()) == ["model.pt"]
    (old / "model.onnx").write_bytes(b"")
    await ensure_model(settings)
    assert capsys.readouterr().out == ""


def test_demo_whose_server_cannot_start_says_why_at_once(
    trained_model: Path, tmp_path: Path
) -> None:
    """Its port taken, the demo refuses at once, naming it (the server failed to bind
    and the demo waited 120 s, deaf to Ctrl-C; with another gRPC server there, it
    scored that one). Its server's metrics port taken, the server exits at start and
    the demo ends at once with the cause and the part's log."""
    temp = tmp_path / "temp"
    temp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for setting, expected in (("--port", "the demo's port"), ("metrics", "exited at start")):
            argv = demo_argv(trained_model, "--duration", "5")
            env = {**os.environ, "TMPDIR": str(temp)}
            if setting == "--port":
                argv[argv.index("--port") + 1] = str(port)
            else:
                env["STREAMSCORE_METRICS_PORT"] = str(port)
            line, _ = stop_line(argv, env, code=1, within_s=60)
            assert expected in line, line
            kept = list(temp.glob("streamscore-demo-*"))
            if setting == "--port":
                # Nothing had started, nothing to read: no empty directory left unnamed.
                assert kept == [], kept
            if setting == "metrics":  # the server's, P (or the worker's, P + 1, if taken)
                assert "metrics_port" in line and ".log)" in line, line
                # The log it names is kept: only a clean stop removes the demo's logs.
                named = re.search(r"(/\S+\.log)\)", line)
                assert named is not None and Path(named.group(1)).stat().st_size > 0, line
                assert Path(named.group(1)).parent in kept, (line, kept)


@pytest.mark.parametrize("secured", ["grpc", "kafka"])
def test_demo_with_tls_settings_refuses_at_once(
    trained_model: Path, tmp_path: Path, secured: str
) -> None:
    """Its own clients speak plaintext: with TLS settings reaching its server, it
    waited 120 s for SERVING, then failed without a word about TLS; with Kafka
    security settings and its plaintext embedded broker, 10 s, "Unable to bootstrap"."""
    cert, key = Authority(tmp_path, "demo-ca").issue("server", server=True)
    env = {**os.environ, "STREAMSCORE_TLS_CERT_FILE": cert, "STREAMSCORE_TLS_KEY_FILE": key}
    expected = ("plaintext", "STREAMSCORE_TLS_CERT_FILE", "tls_key_file")
    if secured == "kafka":
        env = {**os.environ, "STREAMSCORE_KAFKA_SECURITY_PROTOCOL": "ssl"}
        expected = ("embedded broker is plaintext", "kafka_security_protocol ssl")
    argv = demo_argv(trained_model, "--duration", "5")
    line, output = stop_line(argv, env, code=2, within_s=30)
    assert "embedded broker (tansu) on" not in output, output[-3000:]  # nothing started
    assert all(part in line for part in expected), line


def test_demo_hands_its_config_file_to_its_server_and_worker(
    trained_model: Path, tmp_path: Path
) -> None:
    """Settings from --config reach the demo's children (they did not: no /metrics, no
    Admin), each with its own metrics port; --port 0 picks a port it then reaches."""
    metrics = free_port()
    config = tmp_path / "demo.toml"
    config.write_text(f'metrics_port = {metrics}\nadmin_token = "demo-admin-token-0123"\n')
    argv = demo_argv(trained_model, "--duration", "8", "--config", str(config))
    argv[argv.index("--port") + 1] = "0"
    process, lines = demo_serving(argv)
    try:
        target = re.search(r"server on (\S+),", "".join(lines))
        assert target is not None
        for port, name in ((metrics, "server"), (metrics + 1, "worker")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                assert b"streamscore_" in reply.read(), name
        shown = subprocess.run(
            [sys.executable, "-m", "streamscore", "rollout", "show", "--target", target.group(1)],
            env={**os.environ, "STREAMSCORE_ADMIN_TOKEN": "demo-admin-token-0123"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, rest[-3000:]
    assert_scored_and_stopped("".join(lines) + rest)


def test_demo_ends_when_a_part_dies_while_running(trained_model: Path) -> None:
    """Its worker killed mid-run: the demo stops at once with the cause (it went on
    scoring to the end of --duration, then said only "exited with code -9")."""
    process, _ = demo_serving(demo_argv(trained_model, "--duration", "60"))
    try:
        [worker] = [c for c in children_of(process.pid) if " worker" in c]
        os.kill(int(worker.split()[0]), signal.SIGKILL)
        started = time.monotonic()
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - started < 20
    assert process.returncode == 1, rest[-3000:]
    assert "worker exited while running (code -9)" in rest, rest[-3000:]


def test_demo_ends_when_its_embedded_broker_dies(trained_model: Path) -> None:
    """tansu killed mid-run: the demo ran on past --duration and ignored SIGTERM (every
    slot held by a call hanging on the broker), and wrote hundreds of "exception was
    never retrieved". It stops at once, naming the broker."""
    process, _ = demo_serving(demo_argv(trained_model, "--duration", "60"))
    try:
        [tansu] = [c for c in children_of(process.pid) if "tansu" in c]
        time.sleep(1)
        os.kill(int(tansu.split()[0]), signal.SIGKILL)
        started = time.monotonic()
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - started < 20, rest[-3000:]
    assert process.returncode == 1, rest[-3000:]
    assert "the demo's embedded broker (tansu) exited while running (code -9)" in rest, rest[-3000:]
    assert "never retrieved" not in rest, rest[-3000:]


def test_demo_on_a_broker_of_its_own_that_dies_says_what_was_lost(trained_model: Path) -> None:
    """With ``--kafka``, a broker the demo does not run: killed mid-run, the demo ended
    with "stopped cleanly" and exit 0, its events lost without a word."""
    broker = subprocess.Popen(
        [sys.executable, "-m", "streamscore", "broker", "--log-format", "text"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert broker.stdout is not None
        with broker.stdout:
            bootstrap = broker.stdout.readline().strip()
        process, _ = demo_serving(demo_argv(trained_model, "--duration", "8", "--kafka", bootstrap))
        try:
            time.sleep(1)
            broker.kill()  # its tansu child follows (PDEATHSIG)
            rest, _ = process.communicate(timeout=90)
        finally:
            process.kill()
    finally:
        broker.kill()
        broker.wait()
    assert process.returncode == 1, rest[-3000:]
    # Whichever it meets first: its worker exits on the broker gone, or its events
    # are found undelivered at the end.
    lost = re.search(r"\d+ of \d+ payment events were not delivered to Kafka", rest)
    assert lost or "the demo's worker exited while running" in rest, rest[-3000:]
    assert "stopped cleanly" not in rest and "never retrieved" not in rest, rest[-3000:]

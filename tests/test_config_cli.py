"""Settings precedence and the console script's surface."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streamscore.cli import build_parser
from streamscore.config import Settings, load_settings
from streamscore.supervisor import check_ports, spread_target, worker_environment

SUBCOMMANDS = ("demo", "serve", "worker", "broker", "train", "features")


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.kafka == "" and settings.port == 50051 and settings.lateness_ms == 3_600_000


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "streamscore.toml"
    config.write_text('kafka = "file:9092"\nport = 6000\nreplay = true\nlog_level = "debug"\n')
    env = {"STREAMSCORE_PORT": "7000", "STREAMSCORE_REPLAY": "false", "UNRELATED": "x"}
    settings = load_settings(config, flags={"port": 8000, "kafka": None}, environ=env)
    assert settings.kafka == "file:9092"  # from the file; a None flag changes nothing
    assert settings.replay is False  # environment over file
    assert settings.port == 8000  # flag over environment
    assert settings.log_level == "debug"


def test_bad_values_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        load_settings(environ={"STREAMSCORE_PORT": "eighty"})
    config = tmp_path / "bad.toml"
    config.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="no_such_setting"):
        load_settings(config, environ={})


def test_fetch_wait_is_bounded_by_what_tansu_and_staleness_allow() -> None:
    assert load_settings(environ={}).kafka_fetch_max_wait_ms == 20
    real_kafka = load_settings(environ={"STREAMSCORE_KAFKA_FETCH_MAX_WAIT_MS": "500"})
    assert real_kafka.kafka_fetch_max_wait_ms == 500
    # 0 would make tansu answer with no partitions; a wait near stale_after_s would
    # mark every Score stale between two answers of an idle broker.
    for bad in (
        {"STREAMSCORE_KAFKA_FETCH_MAX_WAIT_MS": "0"},
        {"STREAMSCORE_KAFKA_FETCH_MAX_WAIT_MS": "2500"},
        {"STREAMSCORE_KAFKA_FETCH_MAX_WAIT_MS": "500", "STREAMSCORE_STALE_AFTER_S": "1"},
    ):
        with pytest.raises(ValueError, match="kafka_fetch_max_wait_ms"):
            load_settings(environ=bad)


def test_keepalive_is_off_or_at_least_a_second() -> None:
    assert load_settings(environ={"STREAMSCORE_KEEPALIVE_S": "0"}).keepalive_s == 0
    assert load_settings(environ={"STREAMSCORE_KEEPALIVE_S": "1"}).keepalive_s == 1
    with pytest.raises(ValueError, match=r"keepalive_s \(0.001\) must be 0 \(off\) or at least 1"):
        load_settings(environ={"STREAMSCORE_KEEPALIVE_S": "0.001"})


def test_the_fold_horizon_must_exceed_the_lateness() -> None:
    # A lateness raised alone made the worker admit events every server then dropped
    # as too old to fold: neither dead-lettered nor in any feature.
    late = {"STREAMSCORE_LATENESS_MS": "10800000"}
    with pytest.raises(ValueError, match=r"fold_horizon_ms .* must exceed lateness_ms"):
        load_settings(environ=late)
    both = load_settings(environ={**late, "STREAMSCORE_FOLD_HORIZON_MS": "14400000"})
    assert (both.lateness_ms, both.fold_horizon_ms) == (10_800_000, 14_400_000)


def test_lean_fetch_is_on_unless_turned_off() -> None:
    assert load_settings(environ={}).kafka_lean_fetch is True
    off = load_settings(environ={"STREAMSCORE_KAFKA_LEAN_FETCH": "false"})
    assert off.kafka_lean_fetch is False
    with pytest.raises(ValueError, match="kafka_lean_fetch"):
        load_settings(environ={"STREAMSCORE_KAFKA_LEAN_FETCH": "sometimes"})


def test_torch_device_is_auto_cpu_or_cuda() -> None:
    assert load_settings(environ={}).torch_device == "auto"
    assert load_settings(environ={"STREAMSCORE_TORCH_DEVICE": "cpu"}).torch_device == "cpu"
    with pytest.raises(ValueError, match="torch_device: 'gpu' is not one of auto, cpu, cuda"):
        load_settings(environ={"STREAMSCORE_TORCH_DEVICE": "gpu"})


def test_gc_freeze_interval_is_a_non_negative_number_of_seconds() -> None:
    assert load_settings(environ={}).gc_freeze_interval_s == 0.25
    off = load_settings(environ={"STREAMSCORE_GC_FREEZE_INTERVAL_S": "0"})
    assert off.gc_freeze_interval_s == 0.0
    with pytest.raises(ValueError, match=r"gc_freeze_interval_s: -1.0 is not within \[0, 86400\]"):
        load_settings(environ={"STREAMSCORE_GC_FREEZE_INTERVAL_S": "-1"})


def test_choices_are_read_whatever_their_case() -> None:
    """ "FALLBACK" is "fallback": a value the check accepts is the one the server uses (it
    was accepted, then compared exactly: the error policy, text logs)."""
    settings = load_settings(
        environ={"STREAMSCORE_DEADLINE_POLICY": "FALLBACK", "STREAMSCORE_LOG_FORMAT": "JSON"}
    )
    assert (settings.deadline_policy, settings.log_format) == ("fallback", "json")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = -1", r"setting port: -1 is not within \[0, 65535\]"),
        ("port = 70000", r"setting port: 70000 is not within"),
        ("port = true", "setting port: expected an integer, got True"),
        ("port = 1.5", "setting port: expected an integer, got 1.5"),
        # A secret's value is never echoed, even a wrong one.
        ("admin_token = 123", "setting admin_token: expected a string, got a value of another"),
        ("port = [", "config file .*streamscore.toml: "),
        ("budget_ms = 0", "setting budget_ms: 0.0 is not within"),
        ("batch_max_queue = -5", r"setting batch_max_queue: -5 is not within \[1, 2147483647\]"),
        ("max_message_bytes = -1", "setting max_message_bytes: -1 is not within"),
        ("breaker_failures = 0", "setting breaker_failures: 0 is not within"),
        ("canary_percent = 500", "setting canary_percent: 500.0 is not within"),
        ("drain_timeout_s = -5", "setting drain_timeout_s: -5.0 is not within"),
        ("payments_partitions = 0", "setting payments_partitions: 0 is not within"),
        ('log_level = "verbose"', "setting log_level: 'verbose' is not one of debug, info"),
        ('log_format = "xml"', "setting log_format: 'xml' is not one of json, text"),
        ('kafka = "http://x:y"', "setting kafka: 'http://x:y' is not host:port"),
        ('kafka = "a:9092,b:x"', "setting kafka: 'a:9092,b:x' is not host:port"),
        ('kafka = "host:0"', "setting kafka: 'host:0' is not host:port"),
        ('kafka = "host:99999"', "setting kafka: 'host:99999' is not host:port"),
        ('kafka = "::1:9092"', "setting kafka: '::1:9092' is not host:port"),
        # Credentials refused, and not echoed (the line is logged), whatever the
        # password holds.
        ('kafka = "user:pw@host:9092"', "setting kafka: \\(the value is not shown: it looks"),
        ('kafka = "SASL_SSL://alice:hunter2@k:9093"', "setting kafka: \\(the value is not"),
        ('kafka = "kafka://user:S3cret/x,y@host:9092"', "setting kafka: \\(the value is not"),
        ('kafka = "host:9092?password=S3cret"', "setting kafka: \\(the value is not shown"),
        ("batching = 1", "setting batching: expected true or false, got 1"),
        # Never the value: a token no client could send, or one easily guessed.
        ('admin_token = "a-long-enough-token\\n"', "admin_token: must be printable ASCII without"),
        ('admin_token = " a-long-enough-token"', "admin_token: must be printable ASCII without"),
        ('admin_token = "a-long-enough-tokén"', "admin_token: must be printable ASCII without"),
        ('admin_token = "short"', "setting admin_token: at least 16 characters"),
        # A short key is tried in moments, and the card numbers behind the hashes then.
        ('card_hash_key = "a"', "setting card_hash_key: at least 16 characters"),
    ],
)
def test_bad_values_in_a_config_file_are_refused_naming_the_setting(
    tmp_path: Path, toml: str, message: str
) -> None:
    config = tmp_path / "streamscore.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ValueError, match=message):
        load_settings(config, environ={})


def test_typed_values_of_the_right_kind_are_taken() -> None:
    settings = load_settings(flags={"budget_ms": 20, "port": 0, "model_repository": "/tmp/m"})
    assert settings.budget_ms == 20.0 and isinstance(settings.budget_ms, float)
    assert settings.model_repository == Path("/tmp/m")
    assert load_settings(environ={"STREAMSCORE_LOG_LEVEL": "DEBUG"}).log_level == "debug"


def test_model_repository_is_a_path() -> None:
    settings = load_settings(environ={"STREAMSCORE_MODEL_REPOSITORY": "/tmp/models"})
    assert settings.model_repository == Path("/tmp/models")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    assert "usage: streamscore " + command in capsys.readouterr().out


def test_console_script_lists_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamscore", "--help"], capture_output=True, text=True, check=True
    )
    for command in SUBCOMMANDS:
        assert command in result.stdout


def test_serve_without_kafka_says_what_is_missing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamscore", "serve"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "--kafka" in result.stderr


def test_each_worker_gets_its_own_ports() -> None:
    settings = Settings(port=50051, metrics_port=9100, worker_port_base=50100)
    second = worker_environment(settings, 1)
    assert second["STREAMSCORE_PORT"] == "50051"  # shared
    assert second["STREAMSCORE_METRICS_PORT"] == "9101"
    assert second["STREAMSCORE_WORKER_PORT_BASE"] == "50101"
    # Off stays off in every worker.
    assert worker_environment(Settings(), 3)["STREAMSCORE_WORKER_PORT_BASE"] == "0"


def test_spread_target_lists_every_workers_port() -> None:
    assert spread_target("10.0.0.5", 7000, 3) == "ipv4:10.0.0.5:7000,10.0.0.5:7001,10.0.0.5:7002"
    assert spread_target("0.0.0.0", 7000, 2) == "ipv4:127.0.0.1:7000,127.0.0.1:7001"
    assert spread_target("::", 7000, 2) == "ipv6:[::1]:7000,[::1]:7001"
    with pytest.raises(ValueError):
        spread_target("scoring.internal", 7000, 2)


def test_ports_that_would_clash_are_refused_with_the_reason() -> None:
    check_ports(Settings(port=7000, metrics_port=9100, worker_port_base=7001), 4)  # apart
    check_ports(Settings(port=0), 1)  # one process may take any free port
    with pytest.raises(ValueError, match="--port and --worker-port-base overlap"):
        check_ports(Settings(port=7002, worker_port_base=7000), 4)
    with pytest.raises(ValueError, match=r"ports 9100-9103 and 9102-9105"):
        check_ports(Settings(port=7000, metrics_port=9100, worker_port_base=9102), 4)
    with pytest.raises(ValueError, match="no room for 4 ports"):
        check_ports(Settings(port=7000, worker_port_base=65534), 4)
    with pytest.raises(ValueError, match="needs a fixed --port"):
        check_ports(Settings(port=0), 2)


def test_backfill_skips_invalid_events_and_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log line the stream would dead-letter is skipped and counted by reason, and the
    run goes on: a time past int64 (it overflowed the compiled state once), bad JSON."""
    import orjson

    from streamscore.cli import main

    def event(event_id: str, time_ms: int) -> bytes:
        return orjson.dumps(
            {
                "event_id": event_id,
                "event_time_ms": time_ms,
                "card_id": "c1",
                "merchant_id": "m1",
                "device_id": "d1",
                "ip": "10.0.0.1",
                "amount_minor": 500,
                "currency": "EUR",
                "mcc": "5411",
                "country": "DE",
                "status": "approved",
            }
        )

    log = tmp_path / "events.jsonl"
    lines = [event("e1", 1_000), event("huge", 2**63), b"{not json", event("e2", 2_000)]
    log.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "features.jsonl"
    assert main(["backfill", str(log), "-o", str(out), "--no-progress"]) == 0
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [row["event_id"] for row in rows] == ["e1", "e2"]
    assert rows[1]["card_txn_count_24h"] == 1.0
    printed = capsys.readouterr().out
    assert "2 rows" in printed and "bad_json 1" in printed and "bad_value 1" in printed

    # A UTF-8 byte-order mark (some Windows tools write one) is not the first event's
    # undoing: it was skipped as bad JSON (audit AP).
    log.write_bytes(b"\xef\xbb\xbf" + b"\n".join([event("e1", 1_000), event("e2", 2_000)]))
    assert main(["backfill", str(log), "-o", str(out), "--no-progress"]) == 0
    assert [orjson.loads(line)["event_id"] for line in out.read_bytes().splitlines()] == [
        "e1",
        "e2",
    ]

    # Nothing valid (another file, another schema): exit 2, nothing written; it was
    # exit 0 and an empty output a pipeline would train on (audit AP).
    out.unlink()
    log.write_bytes(b"{not json\n" + orjson.dumps({"event_id": "e1"}) + b"\n")
    assert main(["backfill", str(log), "-o", str(out), "--no-progress"]) == 2
    assert not out.exists()
    error = capsys.readouterr().err
    assert "no valid event in" in error and "bad_json 1, missing_field 1" in error


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["backfill", "/nonexistent/events.jsonl", "-o", "/tmp/out.jsonl"], "No such file"),
        (["features", "card", "c1", "--target", "127.0.0.1:1"], "UNAVAILABLE"),
    ],
)
def test_an_operators_mistake_is_one_line_not_a_traceback(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamscore.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in fatal_message(err), err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--log-format", "json"], "serve needs --kafka"),
        # A usage error like the others (exit 2), naming the file: it was exit 1.
        (
            ["config", "--config", "/nonexistent/streamscore.toml"],
            "config file /nonexistent/streamscore.toml: No such file or directory",
        ),
        (["worker", "--log-format", "json"], "worker needs --kafka"),
        (["rollout", "show"], "rollout needs --token"),
        (
            ["serve", "--kafka", "127.0.0.1:9", "--workers", "2", "--port", "0"],
            "--workers needs a fixed --port",
        ),
    ],
)
def test_a_missing_setting_stops_with_one_json_line(
    argv: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under JSON logging, as every other stop (it was a plain-text line)."""
    from streamscore.cli import main

    for name in ("STREAMSCORE_KAFKA", "STREAMSCORE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STREAMSCORE_LOG_FORMAT", "json")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("{") and "\n" not in err, err
    assert expected in fatal_message(err), err


def fatal_message(line: str) -> str:
    """The message of the line a command stops with: JSON once JSON logging is on (a
    container's log pipeline reads only JSON), else ``streamscore: MESSAGE``."""
    if line.startswith("{"):
        entry = json.loads(line)
        assert (entry["level"], entry["logger"]) == ("critical", "streamscore"), entry
        return str(entry["msg"])
    assert line.startswith("streamscore: "), line
    return line.removeprefix("streamscore: ")


def test_a_broker_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    """Its port taken: one "streamscore:" line (tansu's own output, a Rust panic, went
    to the terminal after a traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "streamscore", "broker", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    last = fatal_message(result.stderr.strip().splitlines()[-1])
    assert last.startswith("could not start tansu broker: port in use"), last
    assert "Traceback" not in result.stderr and "panicked" not in result.stderr


@pytest.mark.parametrize(
    ("cmdline", "environ", "target"),
    [
        (["/opt/venv/bin/streamscore", "worker", "--kafka", "k:9092"], {}, None),
        (["/opt/venv/bin/streamscore", "broker"], {}, None),
        (["/opt/venv/bin/streamscore", "serve"], {}, "127.0.0.1:50051"),
        (["/opt/venv/bin/streamscore", "serve"], {"STREAMSCORE_PORT": "7000"}, "127.0.0.1:7000"),
        (["streamscore", "serve", "--port", "6000"], {"STREAMSCORE_PORT": "7"}, "127.0.0.1:6000"),
        (["streamscore", "serve", "--port=6001"], {}, "127.0.0.1:6001"),
        (["streamscore", "demo", "--duration", "60"], {}, "127.0.0.1:50051"),
        (["streamscore", "serve", "--po", "7001"], {}, "127.0.0.1:7001"),  # argparse prefix
        (["streamscore", "demo", "--port", "0"], {}, None),  # picked at start: unknowable
        (["streamscore", "serve"], {"STREAMSCORE_HOST": "10.0.0.5"}, "10.0.0.5:50051"),
        (["/bin/sh", "-c", "streamscore serve --port 7002"], {}, "127.0.0.1:7002"),
        (["/bin/sh", "-c", "exec streamscore worker"], {}, None),
    ],
)
def test_the_container_health_check_checks_what_the_container_runs(
    cmdline: list[str], environ: dict[str, str], target: str | None
) -> None:
    """The image's HEALTHCHECK marked every worker container unhealthy (a worker serves
    no gRPC), and a serve on a --port flag was checked on 50051."""
    from streamscore.cli import container_target

    assert container_target(cmdline, environ) == target


def test_a_misspelt_environment_variable_is_named_with_the_likely_setting() -> None:
    """A typo in a file's key is an error; in the environment, which containers use,
    it was ignored without a word (the Admin API stayed off)."""
    from streamscore.config import unknown_environment

    environ = {
        "STREAMSCORE_ADMIN_TOKN": "secret",
        "STREAMSCORE_BUDGET_MS": "20",
        "STREAMSCORE_TLS_CA": "/ca.pem",  # a client's, not a setting: fine
        "STREAMSCORE_ZZZ": "1",
        "PATH": "/bin",
    }
    assert unknown_environment(environ) == [
        "STREAMSCORE_ADMIN_TOKN (did you mean STREAMSCORE_ADMIN_TOKEN?)",
        "STREAMSCORE_ZZZ",
    ]


def test_config_names_a_misspelt_variable_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command that shows the effective settings is where an operator checks
    them: it said nothing of a variable it ignored (serve warned)."""
    from streamscore.cli import main

    monkeypatch.setenv("STREAMSCORE_BUDGETMS", "5")
    assert main(["config"]) == 0
    captured = capsys.readouterr()
    assert "budget_ms = 50.0" in captured.out
    assert "STREAMSCORE_BUDGETMS (did you mean STREAMSCORE_BUDGET_MS?)" in captured.err


def test_log_flags_are_read_whatever_their_case() -> None:
    from streamscore.cli import build_parser

    parser = build_parser()
    for argv in (["serve"], ["backfill", "events.jsonl", "-o", "out.jsonl"]):
        args = parser.parse_args([*argv, "--log-level", "CRITICAL", "--log-format", "Text"])
        assert (args.log_level, args.log_format) == ("critical", "text")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--log-level", "verbose"])


def test_backfill_refuses_to_write_over_its_event_log(tmp_path: Path) -> None:
    from streamscore.cli import main

    log = tmp_path / "events.jsonl"
    log.write_text("{}\n")
    assert main(["backfill", str(log), "-o", str(tmp_path / ".." / tmp_path.name / log.name)]) == 2
    (tmp_path / "linked.jsonl").hardlink_to(log)
    assert main(["backfill", str(log), "-o", str(tmp_path / "linked.jsonl")]) == 2
    assert log.read_text() == "{}\n"


def test_good_kafka_bootstraps_are_taken() -> None:
    for bootstrap in ("127.0.0.1:9092", "kafka", "a:1,b:65535", "[::1]:9092", "k-1.example:9093"):
        assert load_settings(flags={"kafka": bootstrap}, environ={}).kafka == bootstrap


def test_the_container_health_check_reads_the_config_file(tmp_path: Path) -> None:
    from streamscore.cli import container_target

    config = tmp_path / "streamscore.toml"
    config.write_text("port = 7003\n")
    assert container_target(["streamscore", "serve", "--config", str(config)], {}) == (
        "127.0.0.1:7003"
    )


def test_serve_needs_at_least_one_worker(capsys: pytest.CaptureFixture[str]) -> None:
    from streamscore.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", "0"])
    assert exited.value.code == 2
    assert "--workers: must be 1 or more, not 0" in capsys.readouterr().err


def test_train_refuses_a_version_below_one_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``train --version 0`` trained for a minute, then failed, leaving a staging
    directory behind; a negative one wrote a directory the registry never reads."""
    from streamscore.cli import main

    for version in ("0", "-3"):
        with pytest.raises(SystemExit) as exited:
            main(["train", "--model-repository", str(tmp_path), "--version", version])
        assert exited.value.code == 2
        assert f"--version: must be 1 or more, not {version}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_only_loopback_hosts_keep_an_admin_token_off_the_network() -> None:
    from streamscore.server.app import _is_loopback

    assert all(map(_is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(_is_loopback, ("0.0.0.0", "::", "10.0.0.5", "scoring.internal")))


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """``streamscore config | head -1`` ended with a critical "BrokenPipeError" line
    and exit 1. Its reader gone, it ends as a tool killed by SIGPIPE does: 141, silent."""
    command = [sys.executable, "-m", "streamscore", "config"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # before it writes: its first write meets a closed pipe
    with child.stderr:
        err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141, err
    assert err == "", err


def test_help_gives_the_defaults_a_user_is_told_to_change(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``train`` refuses a model with "train on more traffic (--duration, --rate)",
    whose help did not say what they were; ``broker`` and ``train`` listed a --kafka
    they ignore; no client command said which server it called by default."""
    from streamscore.cli import main

    def helped(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    train = helped("train")
    assert "(default: 1800)" in train and "(default: 10)" in train, train
    assert "--kafka" not in train and "--kafka" not in helped("broker")
    assert "server address (default: 127.0.0.1:50051)" in helped("health")


def test_a_bad_setting_says_where_it_came_from(tmp_path: Path) -> None:
    """``unknown setting 'portt'`` named neither its file nor the setting meant, and
    ``cannot read 'abc'`` did not say whether a variable or a file held it."""
    from streamscore.config import load_settings

    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text("portt = 1\n")
    with pytest.raises(ValueError) as caught:
        load_settings(misspelt, environ={})
    assert (
        str(caught.value)
        == f"config file {misspelt}: unknown setting 'portt' (did you mean 'port'?)"
    )
    unreadable = tmp_path / "unreadable.toml"
    unreadable.write_text('port = "abc"\n')
    with pytest.raises(ValueError, match=f"config file {unreadable}: setting port: cannot read"):
        load_settings(unreadable, environ={})
    with pytest.raises(
        ValueError, match=r"cannot read 'abc' \(from the STREAMSCORE_\* environment"
    ):
        load_settings(None, environ={"STREAMSCORE_PORT": "abc"})


def test_a_value_a_later_layer_mends_does_not_refuse_the_start(tmp_path: Path) -> None:
    """Each layer was checked alone: a placeholder card_hash_key in the file refused the
    start although the environment gave the real one, as did lateness_ms raised in
    the file with fold_horizon_ms raised in the environment. What is checked is what
    the layers make together."""
    from streamscore.config import load_settings

    config = tmp_path / "streamscore.toml"
    config.write_text('card_hash_key = "changeme"\nlateness_ms = 10800000\n')
    environ = {
        "STREAMSCORE_CARD_HASH_KEY": "a-real-key-of-32-characters-0123",
        "STREAMSCORE_FOLD_HORIZON_MS": "14400000",
    }
    settings = load_settings(config, environ=environ)
    assert settings.fold_horizon_ms == 14_400_000 and settings.lateness_ms == 10_800_000
    with pytest.raises(ValueError, match="card_hash_key: at least 16"):
        load_settings(config, environ={"STREAMSCORE_FOLD_HORIZON_MS": "14400000"})

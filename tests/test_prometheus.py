"""A real Prometheus server scrapes a running streamscore: the series arrive, with the
values the requests sent should produce, and PromQL over them works.

Needs the ``prometheus`` binary (``scripts/setup_prometheus.sh`` installs Debian's);
skipped without it.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.loopback_process import find_free_port
from streamscore.server.app import ScoringServer

JOB = "streamscore"
N_REQUESTS = 50
CONCURRENCY = 10  # requests in flight at once: batches of 1..CONCURRENCY

# (value now, value before the requests) -> ok. A value is None when the query
# returned no series. Counters are compared by their increase: the registry is
# process-wide, so earlier tests in the same session may have counted already.
Check = Callable[[float | None, float | None], bool]


def equals(expected: float) -> Check:
    return lambda now, _before: now == expected


def increased_by(n: int) -> Check:
    return lambda now, before: now is not None and now - (before or 0.0) == n


def increased_between(low: int, high: int) -> Check:
    return lambda now, before: now is not None and low <= now - (before or 0.0) <= high


def finite_in(low: float, high: float) -> Check:
    return lambda now, _before: now is not None and math.isfinite(now) and low < now <= high


# PromQL expression (must return at most one series) -> its check once Prometheus has
# scraped the N_REQUESTS answered requests. Add a metric here, one line each.
EXPECTED: dict[str, Check] = {
    f'up{{job="{JOB}"}}': equals(1),
    'sum(streamscore_rpc_seconds_count{rpc="Score", code="OK"})': increased_by(N_REQUESTS),
    'sum(streamscore_answers_total{variant="primary"})': increased_by(N_REQUESTS),
    'sum(streamscore_stage_seconds_count{stage="model"})': increased_by(N_REQUESTS),
    "sum(streamscore_batch_size_sum)": increased_by(N_REQUESTS),
    "sum(streamscore_batch_size_count)": increased_between(N_REQUESTS // CONCURRENCY, N_REQUESTS),
    "sum(streamscore_backend_seconds_count)": increased_between(
        N_REQUESTS // CONCURRENCY, N_REQUESTS
    ),
    "sum(streamscore_batch_shed_requests_total)": lambda now, before: now == before,
    'histogram_quantile(0.99, sum by (le) (streamscore_rpc_seconds_bucket{rpc="Score"}))': (
        finite_in(0.0, 1.0)
    ),
    'histogram_quantile(0.5, sum by (le) (streamscore_stage_seconds_bucket{stage="model"}))': (
        finite_in(0.0, 1.0)
    ),
    'streamscore_rpc_in_flight{rpc="Score"}': equals(0),
    "streamscore_rollout_canary_percent": equals(0),
    "sum(streamscore_backend_breaker_open)": equals(0),
    # The demo model is an MLP the dense kernel computes (kernels/dense.py).
    'sum(streamscore_model_compute_info{backend="onnxruntime", compute="dense"})': equals(1),
    # The loop-lag probe runs every 20 ms whatever the load (server/loop_lag.py).
    "streamscore_event_loop_lag_seconds_count": increased_between(5, 10_000),
    'streamscore_event_loop_thread_seconds_total{state="running"}': (
        lambda now, before: now is not None and now > (before or 0.0)
    ),
}


def find_prometheus() -> str | None:
    found = shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").is_file():
        found = "/usr/bin/prometheus"
    return found


PROMETHEUS = find_prometheus()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no prometheus binary on PATH or at /usr/bin/prometheus "
        "(install it with scripts/setup_prometheus.sh)",
    ),
]


def request(i: int) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id=f"prom-{i}",
        transaction=pb.Transaction(
            transaction_id=f"prom-t-{i}",
            card_id=f"c-{i % 13}",
            merchant_id="m-1",
            device_id="d-1",
            ip="198.51.100.7",
            amount_minor=1_000 + i,
            currency="EUR",
            mcc="5411",
            country="DE",
        ),
    )


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except OSError:
        return 0, b""


class Prometheus:
    """The real server, as a subprocess, scraping one target every second."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.binary = binary
        self.target = target
        self.workdir = workdir
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.workdir / "prometheus.yml"
        # JSON is YAML: no yaml dependency for one small file.
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {"job_name": JOB, "static_configs": [{"targets": [self.target]}]}
                    ],
                }
            )
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-20:])

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            status, _ = http_get(f"{self.url}/-/ready")
            if status == 200:
                return
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready after {timeout_s} s:\n{self.log_tail()}")

    def query(self, expression: str) -> float | None:
        """The instant value of a PromQL expression; None when no series."""
        status, body = http_get(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        )
        assert status == 200, f"{expression}: HTTP {status} {body[:300]!r}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        series = answer["data"]["result"]
        assert len(series) <= 1, f"{expression} returned {len(series)} series: {series}"
        return float(series[0]["value"][1]) if series else None

    def query_all(self) -> dict[str, float | None]:
        return {expression: self.query(expression) for expression in EXPECTED}

    def names(self) -> list[str]:
        _, body = http_get(f"{self.url}/api/v1/label/__name__/values")
        return [n for n in json.loads(body)["data"] if n.startswith("streamscore_")]


async def wait_for(
    prometheus: Prometheus,
    done: Callable[[dict[str, float | None]], bool],
    timeout_s: float,
) -> dict[str, float | None]:
    """Query every expression until ``done`` holds or the time is up; the last values."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = await asyncio.to_thread(prometheus.query_all)
        if done(values) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.25)


async def test_real_prometheus_scrapes_the_serving_metrics(
    trained_model: Path, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    metrics_port = find_free_port()
    settings = Settings(
        port=0,
        model_repository=trained_model,
        metrics_port=metrics_port,
        model_reload_interval_s=0,
    )
    server = ScoringServer(settings)
    prometheus = Prometheus(PROMETHEUS, f"127.0.0.1:{metrics_port}", tmp_path)
    await server.start()
    try:
        prometheus.start()
        await asyncio.to_thread(prometheus.wait_ready)
        up = f'up{{job="{JOB}"}}'
        before = await wait_for(prometheus, lambda v: v[up] == 1, timeout_s=10)
        assert before[up] == 1, f"target never up: {before}\n{prometheus.log_tail()}"

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            for start in range(0, N_REQUESTS, CONCURRENCY):
                replies = await asyncio.gather(
                    *(stub.Score(request(i), timeout=5) for i in range(start, start + CONCURRENCY))
                )
                assert all(0.0 <= r.score <= 1.0 for r in replies)

        def passed(values: dict[str, float | None]) -> dict[str, bool]:
            return {e: check(values[e], before[e]) for e, check in EXPECTED.items()}

        after = await wait_for(prometheus, lambda v: all(passed(v).values()), timeout_s=20)
        failed = {
            e: {"before": before[e], "after": after[e]} for e, ok in passed(after).items() if not ok
        }
        assert not failed, f"PromQL checks failed: {json.dumps(failed, indent=1)}"
        names = await asyncio.to_thread(prometheus.names)
        print(f"streamscore series in prometheus: {names}")
    finally:
        await asyncio.to_thread(prometheus.stop)
        await server.stop()


async def test_metrics_listen_on_their_own_address(trained_model: Path) -> None:
    """A container's gRPC listens on 0.0.0.0; its metrics belong on a private interface
    (they listened wherever gRPC did)."""
    port = find_free_port()
    settings = Settings(
        port=0,
        model_repository=trained_model,
        model_reload_interval_s=0,
        metrics_port=port,
        metrics_host="127.0.0.2",  # another loopback address, as a private interface
    )
    server = ScoringServer(settings)
    await server.start()
    try:
        text = await asyncio.to_thread(scrape, f"http://127.0.0.2:{port}/metrics")
        assert "streamscore_rpc_in_flight" in text
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
    finally:
        await server.stop()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


async def test_metrics_answer_while_grpc_drains(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape during the stop's grace period (calls in flight draining) is answered:
    the metrics were shut first, so it failed, unanswered, just when the drain was
    worth watching."""
    port = find_free_port()
    settings = Settings(
        port=0, model_repository=trained_model, model_reload_interval_s=0, metrics_port=port
    )
    server = ScoringServer(settings)
    await server.start()
    stop_grpc = server._stop_grpc
    during: list[str] = []

    async def scraped_while_stopping(*args: object) -> None:
        during.append(await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics"))
        await stop_grpc(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(server, "_stop_grpc", scraped_while_stopping)
    await server.stop()
    assert during and "streamscore_rpc_in_flight" in during[0]
    with pytest.raises(urllib.error.URLError):  # and shut once gRPC is stopped
        await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")

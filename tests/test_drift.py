"""Drift: PSI against the training baseline, alone and through the server's /metrics."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.loopback_process import find_free_port
from streamscore.server.app import ScoringServer
from streamscore.server.drift import BASELINE_FILE, Baseline, DriftMonitor
from streamscore.server.model import Thresholds
from streamscore.server.rollout_stats import LatencyErrorWindow, PairComparison

NAMES = ("a", "b", "constant")


def training(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.column_stack([rng.normal(size=n), rng.exponential(size=n), np.full(n, 3.0)])
    return rows.astype(np.float32), rng.uniform(size=n)


def test_same_distribution_is_stable_and_a_shift_is_seen(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rows, scores = training(rng, 20_000)
    baseline = Baseline.fit(rows, NAMES, scores)
    baseline.dump(tmp_path / BASELINE_FILE)
    loaded = Baseline.load(tmp_path / BASELINE_FILE)
    assert loaded.names == NAMES
    assert all(np.array_equal(x, y) for x, y in zip(loaded.counts, baseline.counts, strict=True))
    same, shifted = DriftMonitor(loaded, window=5000), DriftMonitor(loaded, window=5000)
    live_rows, live_scores = training(rng, 5000)
    for vector, score in zip(live_rows, live_scores, strict=True):
        same.observe(vector, float(score))
        moved = vector.copy()
        moved[0] += 1.5  # feature a shifts; b and the constant do not
        shifted.observe(moved, float(score) ** 3)  # scores pile up near 0
    stable = same.psi()
    assert max(stable.values()) < 0.1, stable
    drifted = shifted.psi()
    assert drifted["a"] > 0.25 and drifted["score"] > 0.25, drifted
    assert drifted["b"] < 0.1 and drifted["constant"] < 0.1, drifted


def test_the_window_forgets_old_traffic() -> None:
    rng = np.random.default_rng(3)
    rows, scores = training(rng, 10_000)
    monitor = DriftMonitor(Baseline.fit(rows, NAMES, scores), window=1000)
    for vector in rows[:1000] + 10:
        monitor.observe(vector, 0.5)
    assert monitor.psi()["a"] > 0.25
    for vector, score in zip(rows[1000:2000], scores[1000:2000], strict=True):
        monitor.observe(vector, float(score))
    assert len(monitor) == 1000 and monitor.psi()["a"] < 0.1


async def test_server_exports_drift_of_its_live_traffic(trained_model: Path) -> None:
    assert (trained_model / "fraud_mlp" / "1" / BASELINE_FILE).is_file()  # written by train
    port = find_free_port()
    settings = Settings(
        port=0, model_repository=trained_model, metrics_port=port, model_reload_interval_s=0
    )
    server = ScoringServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            for i in range(300):  # payments far larger than anything in training
                await stub.Score(
                    pb.ScoreRequest(
                        request_id=f"r-{i}",
                        transaction=pb.Transaction(
                            transaction_id=f"t-{i}",
                            card_id=f"c-{i}",
                            merchant_id="m-1",
                            amount_minor=50_000_000 + i,
                            currency="EUR",
                        ),
                    )
                )
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(
            None, lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        )
    finally:
        await server.stop()
    values = {
        line.split("{")[1].split("}")[0]: float(line.split()[-1])
        for line in body.decode().splitlines()
        if line.startswith("streamscore_drift_psi{")
    }
    assert values['feature="amount",version="1"'] > 0.25, values


def scrape_failures(read: Callable[[], object], write: Callable[[], None], seconds: float) -> list:
    """``read`` on a thread of its own, as a Prometheus scrape runs on the metrics
    thread, while this thread calls ``write`` as the event loop does; the GIL handed
    over as often as CPython allows, so that a read that lets a write in finds it."""
    failures: list[BaseException] = []
    stop = time.monotonic() + seconds

    def scrape() -> None:
        while time.monotonic() < stop:
            try:
                read()
            except Exception as error:
                failures.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    scraper = threading.Thread(target=scrape)
    try:
        scraper.start()
        while time.monotonic() < stop:
            write()
    finally:
        scraper.join()
        sys.setswitchinterval(interval)
    return failures


def test_a_scrape_reads_the_windows_while_the_loop_appends() -> None:
    """/metrics answered HTTP 500 for a few per cent of scrapes on a busy server: the
    drift PSI iterated the deque that each answer appends to ("deque mutated during
    iteration"), as the rollout's comparison did."""
    rng = np.random.default_rng(3)
    rows, scores = training(rng, 2000)
    names = tuple(f"f{i}" for i in range(rows.shape[1]))
    monitor = DriftMonitor(Baseline.fit(rows, names, scores), window=2000)
    comparison = PairComparison(Thresholds(0.5, 0.8), Thresholds(0.5, 0.8), window=2000)
    window = LatencyErrorWindow(2000)
    row = tuple(float(x) for x in rows[0])
    for _ in range(2000):
        monitor.observe(row, 0.3)

    def answer() -> None:
        monitor.observe(row, 0.3)
        comparison.observe(0.3, 0.4)
        window.add(0.001, True)

    def scrape() -> None:
        monitor.psi()
        comparison.summary()
        window.p99()

    assert scrape_failures(scrape, answer, seconds=2.0) == []

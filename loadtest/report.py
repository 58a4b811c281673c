"""The standard benchmark suite in one command: runs it, writes the report and plots.

    python -m loadtest.report --out BENCHMARKS.md --plots docs/bench
    python -m loadtest.report --quick --out /tmp/BENCH.md --plots /tmp/plots   # CI smoke, ~1 min

What it starts (all its own processes, stopped at the end): a freshly trained model
(``streamscore train``) unless ``--model-repository`` is given; the embedded broker
with a replica's worth of synthetic traffic (``servers.load_features``); the
bare grpc.aio echo server (``echo_server.py``, the baseline: measured on unary Score
as ``echo`` and, when ScoreStream configurations run, on ScoreStream as
``echo, ScoreStream``); the model echo (``echo_server.py --model-repository``: the
echo plus Score's one model call as ``serve`` makes it, the floor of Score's cost, as ``model
echo`` and ``model echo, ScoreStream``); null Score (``loadtest/null_score.py``: ``serve``
with an empty Score, the server around Score, as ``null Score`` and ``null Score,
ScoreStream``); one ``streamscore serve`` per configuration: each backend
(onnxruntime, torch; triton when ``backend_bench`` can start a tritonserver here)
with batching on and off (``STREAMSCORE_BATCHING``), onnxruntime with two shadow
versions (copies of the primary, ``servers.add_copy``), and ScoreStream on
onnxruntime; then the open loop of ``client_pool.py`` (client processes, latency from the
intended send time, HdrHistogram) at fixed offered rates, configurations interleaved
(order rotated each round), ``--rounds`` times; medians are quoted. Server CPU per
request comes from /proc. The "vs echo" ratios compare unary rows with ``echo`` and
ScoreStream rows with ``echo, ScoreStream`` at the same offered rate. Last,
``pipeline_bench.py`` (ingestion and freshness) runs alone.

Output: the markdown section between ``<!-- report:begin -->`` and
``<!-- report:end -->`` of ``--out`` (appended with the markers when they are
absent; the rest of the file is left byte for byte), PNG plots and ``report.json``
(every row) under ``--plots``. ``--quick``: 1 round, 2 low rates, 2 s each,
onnxruntime only (unary Score: no ScoreStream rows, so no echo ScoreStream either;
the model echo's and null Score's unary rows are kept),
no pipeline bench.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from loadtest.client_pool import STREAM_RPCS, ClientPool, Row, realistic_events, score_requests
from loadtest.procstat import cpu_seconds, format_steal
from loadtest.report_output import Summary, plot, write_section
from streamscore.argtypes import at_least_one, positive, positives

HERE = Path(__file__).resolve().parent


def pipeline_arguments(events: int, requests: int) -> list[str]:
    """pipeline_bench's arguments after the interpreter, as the report runs it (from
    the repository root) and prints it: as a module, like every tool here, since it
    imports its neighbours as ``loadtest.*`` (run as a script it cannot)."""
    return ["-m", "loadtest.pipeline_bench", "--events", str(events), "--requests", str(requests)]


ECHO = "echo"  # the echo server's key, and its unary Score configuration
ECHO_STREAM = "echo, ScoreStream"  # the echo server's ScoreStream configuration
# The model echo (echo_server.py --model-repository): the echo plus Score's one model
# call, as ``serve`` makes it. Its rows are the floor of any Score's cost, read against the echo.
MODEL_ECHO = "model echo"
MODEL_ECHO_STREAM = "model echo, ScoreStream"
# ``streamscore serve`` with an empty Score (loadtest/null_score.py): the server around
# Score (replica polling, GC policy, probe, metrics, parser) without Score's work. Score
# over it is Score's own body.
NULL_SCORE = "null Score"
NULL_SCORE_STREAM = "null Score, ScoreStream"


@dataclass
class Config:
    """One measured configuration: a server and the RPC used on it."""

    name: str
    rpc: str  # score | stream | echo | echo-stream | triton-direct
    server: str  # key of the process it talks to
    backend: str = ""
    batching: bool = True
    shadows: str = ""


@dataclass
class Server:
    key: str
    address: str = ""
    pid: int = 0


def server_key(backend: str, batching: bool, shadows: str) -> str:
    return f"{backend}-{'on' if batching else 'off'}-{shadows.replace(',', '+') or 'none'}"


def baseline(rpc: str) -> str:
    """The echo configuration a row's "vs echo" ratios compare with: ScoreStream rows
    with the echo's ScoreStream, every other row with its unary Score."""
    return ECHO_STREAM if rpc in STREAM_RPCS else ECHO


def plan(backends: Sequence[str], quick: bool, shadows: str) -> list[Config]:
    configs = [Config(ECHO, "echo", ECHO)]
    if "onnxruntime" in backends:
        configs.append(Config(MODEL_ECHO, "echo", MODEL_ECHO))
        configs.append(Config(NULL_SCORE, "score", NULL_SCORE, "onnxruntime"))
    for backend in backends:
        for batching in (True,) if backend == "triton" else (True, False):
            configs.append(
                Config(
                    f"{backend}, batching {'on' if batching else 'off'}",
                    "score",
                    server_key(backend, batching, ""),
                    backend,
                    batching,
                )
            )
    if quick:
        return configs
    if "onnxruntime" in backends:
        if shadows:
            configs.append(
                Config(
                    f"onnxruntime, batching on, shadows {shadows}",
                    "score",
                    server_key("onnxruntime", True, shadows),
                    "onnxruntime",
                    True,
                    shadows,
                )
            )
        # The ScoreStream rows' baseline: the same echo server process, on ScoreStream.
        configs.append(Config(ECHO_STREAM, "echo-stream", ECHO))
        configs.append(Config(MODEL_ECHO_STREAM, "echo-stream", MODEL_ECHO))
        configs.append(Config(NULL_SCORE_STREAM, "stream", NULL_SCORE, "onnxruntime"))
        for batching in (True, False):
            configs.append(
                Config(
                    f"onnxruntime, batching {'on' if batching else 'off'}, ScoreStream",
                    "stream",
                    server_key("onnxruntime", batching, ""),
                    "onnxruntime",
                    batching,
                )
            )
    if "triton" in backends:
        configs.append(Config("triton direct (tritonclient)", "triton-direct", "triton"))
    return configs


# -- environment -------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    versions = {"python": platform.python_version()}
    for package in ("grpcio", "onnxruntime", "torch", "protobuf", "hdrhistogram"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return {
        "cpus": str(os.cpu_count() or 0),
        "cpu_model": model,
        "memory": memory,
        "os": platform.platform(),
        "commit": commit,
        **{f"version_{k}": v for k, v in versions.items()},
    }


# -- the suite ---------------------------------------------------------------------------


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="streamscore-report-"))
        self.notes: list[str] = []
        # Parts of the suite that failed: the report is still written, with their
        # output, and the command exits 1 naming them (a report "done" with a traceback
        # in its pipeline section went unnoticed).
        self.failed: list[str] = []
        self.rows: list[tuple[Config, Row]] = []
        self.train_line = ""
        self.pipeline_output = ""
        self.servers: dict[str, Server] = {}
        self.configs: list[Config] = []
        self.bar: Any = None

    def step(self, what: str) -> None:
        self.bar.set_postfix_str(what, refresh=True)

    def done(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, line: str) -> None:
        tqdm.write(line)

    async def train(self) -> Path:
        if self.args.model_repository is not None:
            self.train_line = f"model repository given: {self.args.model_repository}"
            return Path(self.args.model_repository)
        repository = self.root / "trained"
        argv = [sys.executable, "-m", "streamscore", "train", "--model-repository", str(repository)]
        if self.args.quick:
            argv += ["--duration", "300"]  # a smaller model is as costly to serve
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        text = output.decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"streamscore train failed:\n{text[-2000:]}")
        lines = [line for line in text.splitlines() if line.startswith("rows ")]
        shown = ["streamscore", *argv[3:]]
        shown[shown.index(str(repository))] = "DIR"
        self.train_line = f"`{shlex.join(shown)}`" + (f": {lines[-1]}" if lines else "")
        return repository

    async def run(self) -> None:
        from loadtest.servers import (
            add_copy,
            echo_process,
            load_features,
            repository_for,
            serve_process,
        )
        from streamscore.client import wait_serving
        from streamscore.loopback_process import find_free_port
        from streamscore.processes import ChildProcess
        from streamscore.stream.broker import EmbeddedBroker, create_topics
        from streamscore.stream.topics import TopicLayout

        args = self.args
        backends = [b for b in args.backends.split(",") if b]
        self.configs = plan(backends, args.quick, args.shadows)
        measurements = args.rounds * len(args.rates) * len(self.configs)
        self.bar = tqdm(
            total=5 + measurements + (0 if args.quick or args.no_pipeline else 1),
            desc="report",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            self.step("training the model / loading features")
            training = asyncio.create_task(self.train())
            events = realistic_events(seconds=args.replica_seconds)
            requests = score_requests(events, prefix="report")
            pool = ClientPool(args.clients, requests).start()
            children: list[ChildProcess] = []
            triton: Any = None
            try:
                async with EmbeddedBroker() as broker:
                    await create_topics(broker.bootstrap, TopicLayout().partitions())
                    await load_features(broker.bootstrap, events)
                    self.done()
                    base = await training
                    self.done()
                    self.step("starting servers")
                    if "triton" in backends:
                        triton = await self.start_triton(base, repository_for)
                        if triton is None:
                            self.configs = [c for c in self.configs if c.backend != "triton"]
                            self.configs = [c for c in self.configs if c.rpc != "triton-direct"]
                            self.bar.total -= measurements - (
                                args.rounds * len(args.rates) * len(self.configs)
                            )
                            self.bar.refresh()
                    for config in self.configs:
                        if config.server in self.servers or config.rpc == "triton-direct":
                            continue
                        port = find_free_port()
                        if config.server == ECHO:
                            child = echo_process(port, log_path=str(self.root / "echo.log"))
                        elif config.server == MODEL_ECHO:
                            child = echo_process(
                                port,
                                log_path=str(self.root / "model-echo.log"),
                                name=MODEL_ECHO,
                                model_repository=repository_for(base, self.root, "onnxruntime"),
                                model_version="1",
                            )
                        else:
                            repository = repository_for(base, self.root, config.backend)
                            for version in (v for v in config.shadows.split(",") if v):
                                add_copy(repository, version)
                            env = {
                                "STREAMSCORE_BATCHING": str(config.batching).lower(),
                                "STREAMSCORE_SHADOW_VERSIONS": config.shadows,
                                "STREAMSCORE_MODEL_VERSION": "1",
                                # No drain pause on SIGTERM: the suite stops them at once.
                                "STREAMSCORE_DRAIN_DELAY_S": "0",
                            }
                            if triton is not None:
                                env["STREAMSCORE_TRITON_URL"] = triton.url
                            child = serve_process(
                                config.server,
                                broker.bootstrap,
                                port,
                                repository,
                                env=env,
                                log_path=str(self.root / f"{config.server}.log"),
                                cwd=str(HERE.parent),  # for `python -m loadtest...`
                                module=(
                                    "loadtest.null_score"
                                    if config.server == NULL_SCORE
                                    else "streamscore"
                                ),
                            )
                        await child.start()
                        children.append(child)
                        assert child.process is not None
                        self.servers[config.server] = Server(
                            config.server, f"127.0.0.1:{port}", child.process.pid
                        )
                    await asyncio.gather(
                        *(
                            self.wait_up(child, self.servers[child.name].address, wait_serving)
                            for child in children
                        )
                    )
                    self.done()
                    direct = None
                    if triton is not None:
                        from loadtest.backend_bench import triton_direct_target

                        direct = await triton_direct_target(triton, base, requests)  # type: ignore[arg-type]
                        self.servers["triton"] = Server("triton", triton.url, triton.pid)
                    await self.measure(pool, direct)
                    for child in children:
                        child.check_running()
            finally:
                pool.close()
                await asyncio.gather(*(child.stop() for child in children))
                if triton is not None:
                    await triton.stop()
                if not training.done():
                    training.cancel()
            self.done()
            if not (args.quick or args.no_pipeline):
                self.step("pipeline_bench")
                await self.pipeline(base)
                self.done()
            self.step("plots and report")
            self.write()
            self.done()
        finally:
            self.bar.close()
            if not args.keep_temp:
                shutil.rmtree(self.root, ignore_errors=True)

    async def wait_up(self, child: Any, address: str, wait_serving: Any) -> None:
        """SERVING on gRPC health, or the reason it died (never a long silent wait)."""
        serving = asyncio.ensure_future(wait_serving(address, timeout=180))
        exited = asyncio.ensure_future(child.exited.wait())
        await asyncio.wait({serving, exited}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            raise RuntimeError(
                f"{child.name} exited with code {child.returncode}:\n{tail(child.log_path)}"
            )
        serving.result()

    async def start_triton(self, base: Path, repository_for: Any) -> Any:
        try:
            from streamscore.triton_server import EmbeddedTriton, TritonInstall

            TritonInstall.locate()
            triton = EmbeddedTriton(repository_for(base, self.root, "triton"))
            await triton.start()
            return triton
        except Exception as error:  # no Triton here: the report says so and goes on
            self.notes.append(f"triton skipped: {type(error).__name__}: {str(error)[:200]}")
            return None

    async def measure(self, pool: ClientPool, direct: Any) -> None:
        from loadtest.openloop import open_loop

        args = self.args
        n = len(self.configs)
        for round_ in range(args.rounds):
            for i, rate in enumerate(args.rates):
                shift = (round_ + i) % n  # interleaved, and no configuration always first
                for config in self.configs[shift:] + self.configs[:shift]:
                    self.step(f"round {round_ + 1}/{args.rounds}, {rate:g}/s, {config.name}")
                    server = self.servers[config.server]
                    try:
                        if config.rpc == "triton-direct":
                            before, cpu0 = cpu_seconds(server.pid), time.process_time()
                            result = await open_loop(direct.call, rate, args.seconds)
                            client_cpu = (time.process_time() - cpu0) / result.seconds
                            cpu_us = (cpu_seconds(server.pid) - before) / max(result.ok, 1) * 1e6
                            row = Row.of(server.address, "triton", result, cpu_us, client_cpu, 1)
                        else:
                            row = await asyncio.to_thread(
                                pool.run,
                                server.address,
                                config.rpc,
                                rate,
                                args.seconds,
                                streams=args.streams,
                                timeout_s=args.timeout_s,
                                server_pids=[server.pid],
                            )
                    except (RuntimeError, TimeoutError) as error:
                        self.notes.append(f"{config.name} at {rate:g}/s failed: {error}")
                        self.log(f"{config.name} at {rate:g}/s failed: {error}")
                        self.done()
                        continue
                    row.passed = row.meets(args.budget_p99_ms)
                    self.rows.append((config, row))
                    if row.errors:
                        self.notes.append(
                            f"{config.name} at {rate:g}/s: {row.errors} errors, first: "
                            f"{row.first_error or 'unknown'}"
                        )
                    cpu = (
                        "" if row.server_cpu_us is None else f" cpu {row.server_cpu_us:.0f} us/req"
                    ) + f" steal {format_steal(row.steal_pct) or '?'}"
                    self.log(
                        f"{config.name:44s} {rate:7g}/s  achieved {row.achieved_rate:7.0f}/s  "
                        f"p50 {row.p50_ms:6.2f}  p99 {row.p99_ms:7.2f}  p99.9 {row.p999_ms:7.2f} ms"
                        f"  err {row.errors} drop {row.dropped}{cpu}"
                    )
                    self.done()

    async def pipeline(self, base: Path) -> None:
        argv = [
            sys.executable,
            *pipeline_arguments(self.args.pipeline_events, self.args.pipeline_requests),
            "--model-repository",
            str(base),
        ]
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=HERE.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        failure = ""
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=900)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
            failure = "pipeline_bench did not finish within 900 s (killed)"
        text = output.decode(errors="replace")
        if not failure and process.returncode not in (0, None):
            failure = f"pipeline_bench exited with code {process.returncode}"
        if failure:
            self.failed.append(failure)
            self.notes.append(failure)
        # Its own lines only (the children's logs go to files; drop any stray log lines).
        self.pipeline_output = "\n".join(
            line for line in text.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d ", line)
        )[-6000:]

    # -- aggregation and output ----------------------------------------------------------

    def summaries(self) -> list[Summary]:
        groups: dict[tuple[str, float], list[Row]] = defaultdict(list)
        rpc: dict[str, str] = {}
        for config, row in self.rows:
            groups[(config.name, row.offered_rate)].append(row)
            rpc[config.name] = config.rpc
        order = {c.name: i for i, c in enumerate(self.configs)}
        out = []
        for (name, rate), rows in sorted(
            groups.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])
        ):
            histogram = HdrHistogram(1, 60_000_000, 3)
            for row in rows:
                histogram.add(row.hdr())
            cpus = [r.server_cpu_us for r in rows if r.server_cpu_us is not None]
            steals = [r.steal_pct for r in rows if r.steal_pct is not None]
            out.append(
                Summary(
                    config=name,
                    rpc=rpc[name],
                    rate=rate,
                    rounds=len(rows),
                    achieved=statistics.median(r.achieved_rate for r in rows),
                    p50=statistics.median(r.p50_ms for r in rows),
                    p90=statistics.median(r.p90_ms for r in rows),
                    p99=statistics.median(r.p99_ms for r in rows),
                    p99_low=min(r.p99_ms for r in rows),
                    p99_high=max(r.p99_ms for r in rows),
                    p999=statistics.median(r.p999_ms for r in rows),
                    max=max(r.max_ms for r in rows),  # the largest seen: a max, not a median
                    errors=sum(r.errors for r in rows),
                    dropped=sum(r.dropped for r in rows),
                    cpu_us=statistics.median(cpus) if cpus else None,
                    steal_pct=statistics.median(steals) if steals else None,
                    histogram=histogram,
                )
            )
        return out

    def best_rates(self, summaries: Sequence[Summary]) -> dict[str, float | None]:
        best: dict[str, float | None] = {c.name: None for c in self.configs}
        for s in summaries:
            if s.clean and s.p99 <= self.args.budget_p99_ms:
                current = best.get(s.config)
                best[s.config] = s.rate if current is None else max(current, s.rate)
        return best

    def cdf_rate(self, summaries: Sequence[Summary]) -> float:
        if self.args.cdf_rate:
            return float(self.args.cdf_rate)
        rates = sorted({s.rate for s in summaries})
        clean = [r for r in rates if all(s.clean for s in summaries if s.rate == r)]
        return (clean or rates or [0.0])[-1]

    def write(self) -> None:
        args = self.args
        summaries = self.summaries()
        plots_dir = Path(args.plots)
        plots_dir.mkdir(parents=True, exist_ok=True)
        cdf_rate = self.cdf_rate(summaries)
        written = plot(summaries, plots_dir, args.budget_p99_ms, cdf_rate) if summaries else {}
        (plots_dir / "report.json").write_text(
            json.dumps(
                {
                    "command": args.command,
                    "machine": args.machine,
                    "configurations": [c.__dict__ for c in self.configs],
                    "rows": [{"configuration": c.name, **r.to_json()} for c, r in self.rows],
                    "max_rate_in_budget": self.best_rates(summaries),
                    "notes": self.notes,
                },
                indent=1,
            )
            + "\n"
        )
        section = self.markdown(summaries, written, cdf_rate)
        write_section(Path(args.out), section)
        self.log(f"wrote the report section into {args.out}, plots into {plots_dir}")

    def markdown(
        self, summaries: Sequence[Summary], plots: dict[str, Path], cdf_rate: float
    ) -> str:
        args, m = self.args, self.args.machine
        out_dir = Path(args.out).resolve().parent
        budget = args.budget_p99_ms
        lines = [
            f"## Standard load report ({'quick' if args.quick else 'full'}), "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            "Generated by `loadtest/report.py`; everything between the report markers is "
            "rewritten by each run. Command:",
            "",
            "```bash",
            args.command,
            "```",
            "",
            f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']} memory, {m['os']}. "
            f"Versions: Python {m['version_python']}, grpcio {m['version_grpcio']}, "
            f"onnxruntime {m['version_onnxruntime']}, torch {m['version_torch']}, "
            f"protobuf {m['version_protobuf']}; commit `{m['commit'] or 'unknown'}`.",
            "",
            f"Method: open-loop load from {args.clients} client process(es) "
            "(`loadtest/client_pool.py`; latency from each request's intended send time, "
            f"HdrHistogram), each configuration for {args.seconds:g} s at each offered rate, "
            f"configurations interleaved (order rotated each round), {args.rounds} round(s); "
            "the tables quote the median over rounds (p99 range: lowest and highest round), "
            "except max, the largest of any round; errors and dropped are totals. Server "
            "CPU: utime + stime of the server process over the step, per answered request "
            "(includes its idle replica polling). CPU steal: the share of the machine's "
            "CPU time the host gave to other guests during the step (/proc/stat), median "
            "over rounds; a step with steal is noisy. "
            "Baseline: the bare grpc.aio echo server (`loadtest/echo_server.py`, a canned "
            'answer per request); the "vs echo" ratios compare unary rows with `echo` '
            "(its Score) and ScoreStream rows with `echo, ScoreStream` (its ScoreStream, "
            "the same streaming load) at the same offered rate. `model echo`: the echo "
            "plus the one model call every Score makes (the served model as `serve` "
            "loads it, the dense kernel included, a batch of one, inline), nothing "
            "else: the floor of Score's cost, whose own "
            '"vs echo" says how much of the budget the model call alone takes. `null '
            "Score`: `streamscore serve` (onnxruntime, batching on) whose Score answers at "
            "once with the echo's canned response (`loadtest/null_score.py`): the server "
            "around Score, replica polling, GC policy, probe, metrics and parser included; "
            "Score over it is Score's own body. Every "
            "server, the broker and the load generator share this machine's cores, so compare "
            "rows within this run. Model: "
            f"{self.train_line}. Replica: {args.replica_seconds:g} s of synthetic traffic "
            "(about 50 payments/s) folded into every server before the load.",
            "",
            f"### Latency at fixed offered rates (budget p99 <= {budget:g} ms)",
            "",
            "| configuration | rpc | offered/s | achieved/s | p50 ms | p90 ms | p99 ms "
            "| p99 range ms | p99.9 ms | max ms | errors | dropped | server CPU us/req "
            "| p99 vs echo | CPU vs echo | CPU steal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        echo = {(s.config, s.rate): s for s in summaries if s.config in (ECHO, ECHO_STREAM)}
        for s in summaries:
            base = echo.get((baseline(s.rpc), s.rate))
            p99_ratio = f"{s.p99 / base.p99:.2f}" if base and base.p99 else ""
            cpu_ratio = (
                f"{s.cpu_us / base.cpu_us:.2f}"
                if base and base.cpu_us and s.cpu_us is not None
                else ""
            )
            cpu = "" if s.cpu_us is None else f"{s.cpu_us:.0f}"
            lines.append(
                f"| {s.config} | {s.rpc} | {s.rate:.0f} | {s.achieved:.0f} | {s.p50:.2f} | "
                f"{s.p90:.2f} | {s.p99:.2f} | {s.p99_low:.2f}-{s.p99_high:.2f} | {s.p999:.2f} | "
                f"{s.max:.2f} | {s.errors} | {s.dropped} | {cpu} | {p99_ratio} | {cpu_ratio} | "
                f"{format_steal(s.steal_pct)} |"
            )
        best = self.best_rates(summaries)
        rpcs = {c.name: c.rpc for c in self.configs}
        lines += [
            "",
            f"### Highest offered rate with median p99 <= {budget:g} ms and no errors "
            "(of the rates tried)",
            "",
            "| configuration | offered/s | vs echo |",
            "|---|---|---|",
        ]
        for name, rate in best.items():
            echo_best = best.get(baseline(rpcs[name]))
            ratio = f"{rate / echo_best:.0%}" if rate and echo_best else ""
            lines.append(f"| {name} | {'' if rate is None else f'{rate:.0f}'} | {ratio} |")
        lines.append("")
        lines.append(
            '(empty: none of the rates met the budget; "vs echo": unary rows against '
            "`echo`, ScoreStream rows against `echo, ScoreStream`)"
        )
        if self.pipeline_output:
            pipeline_command = shlex.join(
                ["python", *pipeline_arguments(args.pipeline_events, args.pipeline_requests)]
            )
            lines += [
                "",
                "### Pipeline: ingestion, freshness, sequential Score (pipeline_bench.py)",
                "",
                f"`{pipeline_command}` (its own broker, worker and server, after the load above):",
                "",
                "```text",
                self.pipeline_output.strip(),
                "```",
            ]
        if plots:
            lines += ["", "### Plots", ""]
            titles = {
                "latency": "p50 / p99 / p99.9 vs offered rate, per configuration",
                "cdf": f"latency distribution per configuration at {cdf_rate:.0f}/s "
                "(all rounds merged)",
                "cpu": "server CPU per request vs offered rate",
            }
            for key, path in plots.items():
                link = Path(os.path.relpath(path.resolve(), out_dir)).as_posix()
                lines += [f"{titles[key]}:", "", f"![{titles[key]}]({link})", ""]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def tail(path: str | None, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:] if path else ""
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--plots", type=Path, default=Path("docs/bench"))
    parser.add_argument("--quick", action="store_true", help="tiny CI run (about a minute)")
    parser.add_argument("--rates", type=positives, help="offered rates (default 250,500,750)")
    parser.add_argument("--seconds", type=positive, help="per step (default 4)")
    parser.add_argument("--rounds", type=at_least_one, help="interleaved rounds (default 3)")
    parser.add_argument("--clients", type=at_least_one, default=1, help="load client processes")
    parser.add_argument("--streams", type=at_least_one, default=2, help="ScoreStreams per client")
    parser.add_argument("--budget-p99-ms", type=positive, default=10.0)
    parser.add_argument("--timeout-s", type=positive, default=1.0, help="unary deadline")
    parser.add_argument(
        "--backends", help="default onnxruntime,torch,triton (triton when it can start)"
    )
    parser.add_argument("--shadows", default="2,3", help="shadow versions ('' for none)")
    parser.add_argument("--model-repository", type=Path, help="skip training, use this one")
    parser.add_argument(
        "--replica-seconds", type=positive, help="seconds of traffic in the replica (default 400)"
    )
    parser.add_argument("--no-pipeline", action="store_true", help="skip pipeline_bench")
    parser.add_argument("--pipeline-events", type=int, default=20_000)
    parser.add_argument("--pipeline-requests", type=int, default=2_000)
    parser.add_argument("--cdf-rate", type=float, help="rate of the distribution plot")
    parser.add_argument("--keep-temp", action="store_true", help="keep the logs and models")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rates = args.rates or ([100.0, 200.0] if quick else [250.0, 500.0, 750.0])
    args.seconds = args.seconds or (2.0 if quick else 4.0)
    args.rounds = args.rounds or (1 if quick else 3)
    args.backends = args.backends or ("onnxruntime" if quick else "onnxruntime,torch,triton")
    args.replica_seconds = args.replica_seconds or (60.0 if quick else 400.0)
    args.command = shlex.join(
        ["python", "-m", "loadtest.report", *(sys.argv[1:] if argv is None else argv)]
    )
    args.machine = machine()
    import uvloop

    started = time.perf_counter()
    suite = Suite(args)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(suite.run())
        except RuntimeError as error:  # a server or client failed: say why, no traceback
            print(f"report failed: {error}", file=sys.stderr)
            return 1
    if suite.failed:
        print(f"report written, but part of it failed: {'; '.join(suite.failed)}", file=sys.stderr)
        return 1
    print(f"report done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

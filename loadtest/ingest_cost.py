"""What live ingestion takes from a server: its replica's CPU at fixed event flows, and
Score's server CPU per request with and without that flow.

Every scored payment becomes an event that every server's replica folds (DESIGN.md:
each server holds all features), so in production a server under Score load also
ingests. The standard suite (``loadtest.report``, ``loadtest.ab``) measures Score with
an idle replica; this tool measures the difference. It starts tansu and one
``streamscore serve`` (features folded from backend_bench's traffic), then, every
round, for each flow (order rotated per round):

1. the flow alone for ``--seconds``: the server's CPU (share of a core), the replica's
   cost; above flow 0, per event;
2. Score unary at ``--score-rate`` (open loop, ``--clients`` processes) while the same
   flow goes on: server CPU per Score, p50 and p99; the server's event-loop lag p99 and
   that lateness per second by cause, ``busy`` (the loop's own work: a fold, a fetch)
   or ``cpu_wait`` (no CPU free for it: the machine), from its loop-lag probe
   (``server/loop_lag.py``, every 20 ms here); the host's CPU steal.

The flow is what stream workers write: every 10 ms, the events due are routed into one
entity-events record per partition (``topics.route_events``), stamped with the current
time. After each flow the server's ``streamscore_replica_entries_folded_total`` is checked
against the entries sent, so a replica that fell behind is reported, not hidden.

    python -m loadtest.ingest_cost --model-repository DIR --flows 0,200,800 \\
        --score-rate 500 --seconds 6 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiokafka import AIOKafkaProducer

from loadtest.client_pool import ClientPool, realistic_events, score_requests
from loadtest.procstat import cpu_seconds
from loadtest.scrape import Samples, histogram_quantile, scrape, total
from loadtest.servers import load_features, serve_process
from streamscore.argtypes import at_least_one, positive
from streamscore.client import wait_serving
from streamscore.loopback_process import find_free_port
from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.events import event_from_dict
from streamscore.stream.features import ENTITY_TYPES
from streamscore.stream.topics import ENTITY_EVENTS, TopicLayout, route_events
from streamscore.tasks import cancel_and_wait

TICK_S = 0.01


class EventFlow:
    """Entity-events records at a settable rate of payment events, as workers write them.

    Lifecycle: ``await start()``, set ``rate``, ``await stop()``. A producer failure
    ends the task; ``check()`` raises it at the next measurement."""

    def __init__(self, bootstrap: str, events: list[dict[str, Any]], partitions: int) -> None:
        self.bootstrap = bootstrap
        self.events = events
        self.partitions = partitions
        self.rate = 0.0
        self.sent = 0
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=0, **kafka_compat.producer_kwargs()
        )
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="event-flow")

    def check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # raises the producer's failure
            raise RuntimeError("the event flow stopped")

    async def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        loop = asyncio.get_running_loop()
        due = 0.0
        next_tick = loop.time()
        while True:
            next_tick += TICK_S
            due += self.rate * TICK_S
            count, due = int(due), due - int(due)
            if count:
                now_ms = time.time_ns() // 1_000_000
                batch = []
                for k in range(self.sent, self.sent + count):
                    template = self.events[k % len(self.events)]
                    batch.append(
                        event_from_dict(
                            {**template, "event_id": f"flow-{k}", "event_time_ms": now_ms}
                        )
                    )
                for partition, value in route_events(batch, self.partitions):
                    await producer.send(ENTITY_EVENTS, value, partition=partition)
                self.sent += count
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


@dataclass
class Step:
    """One flow in one round."""

    flow: float  # offered events/s
    achieved_flow: float
    flow_core: float  # the server's CPU, share of a core, with the flow alone
    score_cpu_us: float  # server CPU per Score with the flow
    score_rate: float  # achieved
    p50_ms: float
    p99_ms: float
    errors: int
    entries_sent: int  # in this step
    entries_folded: int  # in this step, by its end (after a short drain)
    # The serving loop during the Score phase (server/loop_lag.py): p99 of its probe's
    # lateness (a bucket bound), and that lateness per second by cause.
    loop_lag_p99_ms: float
    late_busy_ms_per_s: float
    late_cpu_wait_ms_per_s: float
    steal_pct: float  # of the machine's CPU time in the Score phase, taken by the host


def parse_flows(text: str) -> list[float]:
    try:
        flows = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        flows = []
    if not flows or any(not 0 <= f < float("inf") for f in flows):
        raise argparse.ArgumentTypeError("flows: comma-separated events/s, 0 or more")
    return flows


async def scrape_server(metrics_url: str) -> Samples:
    return await asyncio.to_thread(scrape, metrics_url)


def folded_entries(samples: Samples) -> int:
    return int(total(samples, "streamscore_replica_entries_folded_total"))


def late_ms_per_s(before: Samples, after: Samples, cause: str, seconds: float) -> float:
    name = "streamscore_event_loop_late_seconds_total"
    late = total(after, name, cause=cause) - total(before, name, cause=cause)
    return 1000 * late / seconds


async def measure_flow(
    args: argparse.Namespace,
    pool: ClientPool,
    flow: EventFlow,
    target: str,
    pid: int,
    metrics_url: str,
    rate: float,
) -> Step:
    # The previous step ended with its flow folded, so the replica starts in step.
    folded_before = folded_entries(await scrape_server(metrics_url))
    sent_before = flow.sent
    flow.rate = rate
    await asyncio.sleep(args.settle_s)
    sent, cpu, started = flow.sent, cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - started
    flow_core = (cpu_seconds(pid) - cpu) / elapsed
    achieved_flow = (flow.sent - sent) / elapsed
    before, started = await scrape_server(metrics_url), time.monotonic()
    row = await asyncio.to_thread(
        pool.run, target, "score", args.score_rate, args.seconds, server_pids=[pid]
    )
    after, elapsed = await scrape_server(metrics_url), time.monotonic() - started
    lag_p99 = histogram_quantile(before, after, "streamscore_event_loop_lag_seconds", 0.99)
    flow.check()
    flow.rate = 0.0
    await asyncio.sleep(args.settle_s)  # the last records of the flow reach the replica
    entries_sent = (flow.sent - sent_before) * len(ENTITY_TYPES)
    return Step(
        flow=rate,
        achieved_flow=achieved_flow,
        flow_core=flow_core,
        score_cpu_us=row.server_cpu_us or 0.0,
        score_rate=row.achieved_rate,
        p50_ms=row.p50_ms,
        p99_ms=row.p99_ms,
        errors=row.errors + row.dropped,
        entries_sent=entries_sent,
        entries_folded=folded_entries(await scrape_server(metrics_url)) - folded_before,
        loop_lag_p99_ms=1000 * lag_p99 if lag_p99 is not None else float("nan"),
        late_busy_ms_per_s=late_ms_per_s(before, after, "busy", elapsed),
        late_cpu_wait_ms_per_s=late_ms_per_s(before, after, "cpu_wait", elapsed),
        steal_pct=row.steal_pct if row.steal_pct is not None else float("nan"),
    )


def summarize(steps: list[Step]) -> list[dict[str, Any]]:
    """Medians over rounds per flow; the replica's cost per event against flow 0."""
    flows = sorted({s.flow for s in steps})
    by_flow = {f: [s for s in steps if s.flow == f] for f in flows}

    def med(f: float, field: str) -> float:
        return statistics.median(getattr(s, field) for s in by_flow[f])

    idle_core = med(flows[0], "flow_core") if flows[0] == 0 else None
    idle_score = med(flows[0], "score_cpu_us") if flows[0] == 0 else None
    rows = []
    for f in flows:
        core, achieved = med(f, "flow_core"), med(f, "achieved_flow")
        per_event = (
            (core - idle_core) / achieved * 1e6 if idle_core is not None and achieved else None
        )
        score_cpu = med(f, "score_cpu_us")
        rows.append(
            {
                "flow": f,
                "achieved_flow": achieved,
                "flow_core": core,
                "replica_us_per_event": per_event,
                "score_cpu_us": score_cpu,
                "score_cpu_vs_no_flow": score_cpu / idle_score if idle_score else None,
                "score_rate": med(f, "score_rate"),
                "p50_ms": med(f, "p50_ms"),
                "p99_ms": med(f, "p99_ms"),
                "loop_lag_p99_ms": med(f, "loop_lag_p99_ms"),
                "late_busy_ms_per_s": med(f, "late_busy_ms_per_s"),
                "late_cpu_wait_ms_per_s": med(f, "late_cpu_wait_ms_per_s"),
                "steal_pct": med(f, "steal_pct"),
                "errors": sum(s.errors for s in by_flow[f]),
                "rounds": len(by_flow[f]),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], score_rate: float) -> str:
    def fmt(value: float | None, spec: str, unit: str = "") -> str:
        return "" if value is None else format(value, spec) + unit

    lines = [
        f"| flow events/s (achieved) | server CPU, flow alone | replica CPU per event "
        f"| Score at {score_rate:,.0f}/s: server CPU us/req | vs no flow | p50 ms | p99 ms "
        f"| loop lag p99 ms | loop late ms/s: busy, cpu wait | CPU steal | errors+dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['flow']:,.0f} ({r['achieved_flow']:,.0f}) | {100 * r['flow_core']:.1f} % "
            f"| {fmt(r['replica_us_per_event'], ',.0f', ' us')} "
            f"| {r['score_cpu_us']:,.0f} | {fmt(r['score_cpu_vs_no_flow'], '.2f', 'x')} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['loop_lag_p99_ms']:.1f} "
            f"| {r['late_busy_ms_per_s']:.1f}, {r['late_cpu_wait_ms_per_s']:.1f} "
            f"| {r['steal_pct']:.1f} % | {r['errors']} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    flows = args.flows
    events = realistic_events(seconds=args.replica_seconds)
    pool = ClientPool(args.clients, score_requests(events, prefix="ingest")).start()
    work = Path(tempfile.mkdtemp(prefix="streamscore-ingest-cost-"))
    steps: list[Step] = []
    try:
        async with EmbeddedBroker() as broker:
            layout = TopicLayout()
            await create_topics(broker.bootstrap, layout.partitions())
            await load_features(broker.bootstrap, events)
            port, metrics_port = find_free_port(), find_free_port()
            server = serve_process(
                "server",
                broker.bootstrap,
                port,
                args.model_repository,
                env={
                    **os.environ,
                    "STREAMSCORE_MODEL_VERSION": args.model_version,
                    "STREAMSCORE_METRICS_PORT": str(metrics_port),
                    # Enough probes in a few seconds' step for a p99 of the loop's lag.
                    "STREAMSCORE_LOOP_LAG_INTERVAL_S": "0.02",
                },
                log_path=str(work / "server.log"),
            )
            flow = EventFlow(broker.bootstrap, events, layout.entity_events_partitions)
            await server.start()
            try:
                target = f"127.0.0.1:{port}"
                await wait_serving(target, timeout=120)
                assert server.process is not None
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                await flow.start()
                try:
                    for round_ in range(args.rounds):
                        shift = round_ % len(flows)
                        for rate in flows[shift:] + flows[:shift]:
                            step = await measure_flow(
                                args, pool, flow, target, server.process.pid, metrics_url, rate
                            )
                            steps.append(step)
                            print(
                                f"round {round_ + 1}/{args.rounds} flow {rate:>6,.0f}/s: "
                                f"server {100 * step.flow_core:.1f} % of a core alone; "
                                f"Score {step.score_cpu_us:,.0f} us/req, "
                                f"p99 {step.p99_ms:.2f} ms, loop lag p99 "
                                f"{step.loop_lag_p99_ms:.1f} ms (late ms/s: busy "
                                f"{step.late_busy_ms_per_s:.1f}, cpu wait "
                                f"{step.late_cpu_wait_ms_per_s:.1f}), steal "
                                f"{step.steal_pct:.1f} %; folded "
                                f"{step.entries_folded}/{step.entries_sent} entries",
                                flush=True,
                            )
                finally:
                    await flow.stop()
            finally:
                await server.stop()
    except BaseException:
        print(f"server log kept: {work / 'server.log'}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        pool.close()
    rows = summarize(steps)
    behind = [s for s in steps if s.entries_folded < s.entries_sent]
    print(f"\nmedians over {args.rounds} rounds, {args.clients} client processes:")
    print(table(rows, args.score_rate))
    if behind:
        print(f"\nthe replica fell behind in {len(behind)} step(s): folded < sent")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "steps": [asdict(s) for s in steps]}, indent=2)
        )
    return 1 if behind else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model-version", default="1")
    p.add_argument(
        "--flows", type=parse_flows, default="0,200,800", help="payment events/s, e.g. 0,200,800"
    )
    p.add_argument("--score-rate", type=positive, default=500.0, help="Score calls/s")
    p.add_argument("--seconds", type=positive, default=6.0, help="per phase")
    p.add_argument("--settle-s", type=float, default=1.0, help="before each phase")
    p.add_argument("--rounds", type=at_least_one, default=3)
    p.add_argument("--clients", type=at_least_one, default=2, help="load processes")
    p.add_argument("--replica-seconds", type=positive, default=400.0)
    p.add_argument("--json", type=Path, help="also write the rows and steps here")
    return p


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(parser().parse_args())))

"""The Faust stream worker: validate payment events and route them by entity.

Events are taken in micro-batches (``Stream.take_events``: up to ``BATCH_MAX`` events,
waiting at most ``BATCH_WITHIN_S`` for more). Per event: parse and validate (schema,
then event-time rules), then either send it to the dead-letter topic with a reason,
or add its fold entries to the batch; the batch goes out as one entity-events record
per partition (``topics.route_events``). The worker keeps no feature state of its own:
the entity-events log is the state's source of truth, folded by every serving
process (see ``replica.py``). Its one piece of state, the lateness watermark per
partition, is checkpointed and recovered when it reads a partition out of turn
(``watermarks.py``). Running several workers just splits the ``payments``
partitions between them (Faust's consumer group).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from typing import Any

import faust
import mode

from streamscore.config import Settings
from streamscore.processes import exit_now, exit_on_second_signal
from streamscore.stream import kafka_compat, kafka_security
from streamscore.stream.gate import EventTimeGate
from streamscore.stream.routing import BatchRouter
from streamscore.stream.state import DEFAULT_LATENESS_MS, DEFAULT_SKEW_MS
from streamscore.stream.topics import (
    DEAD_LETTER,
    ENTITY_EVENTS,
    PAYMENTS,
    WATERMARKS,
)
from streamscore.stream.watermarks import WatermarkCheckpoints

log = logging.getLogger("streamscore.worker")

# Micro-batching: per-message costs in Faust's stream, the producer and every replica
# dominate a per-event pipeline. 10 ms bounds the freshness cost of waiting for more.
BATCH_MAX = 500
BATCH_WITHIN_S = 0.01


def create_app(
    bootstrap: str,
    *,
    app_id: str = "streamscore-worker",
    payments_partitions: int = 4,
    entity_events_partitions: int = 4,
    gate: EventTimeGate | None = None,
    fetch_max_wait_ms: int = kafka_compat.FETCH_MAX_WAIT_MS,
    datadir: str | None = None,
    exit_on_error: bool = False,
) -> faust.App:
    """Build the Faust app; the caller runs it (``faust.Worker``) or starts it in tests.

    ``datadir``: where Faust keeps its table files. The worker holds no tables, but
    Faust creates the directory anyway, by default in the working directory."""
    kafka_compat.install_faust_fixes(fetch_max_wait_ms)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,  # None: Faust's default
        # FAUST_BROKER_SETTINGS sets processing_guarantee="at_least_once": tansu has
        # no idempotent/transactional producer; the state de-duplicates by event id.
        topic_partitions=payments_partitions,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        broker_commit_interval=1.0,
        producer_linger_ms=2,
        broker_credentials=kafka_security.faust_credentials(),
        **kafka_compat.FAUST_BROKER_SETTINGS,
    )
    event_gate = gate or EventTimeGate()
    payments = app.topic(
        PAYMENTS,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
        partitions=payments_partitions,
    )
    dead_letters = app.topic(
        DEAD_LETTER, key_serializer="raw", value_serializer="raw", partitions=1
    )
    entity_events = app.topic(
        ENTITY_EVENTS,
        key_serializer="raw",
        value_serializer="raw",
        partitions=entity_events_partitions,
    )
    watermarks = app.topic(
        WATERMARKS, key_serializer="raw", value_serializer="raw", partitions=payments_partitions
    )
    positions = WatermarkCheckpoints(bootstrap, event_gate)

    router = BatchRouter(
        positions,
        dead_letters=dead_letters,
        entity_events=entity_events,
        watermarks=watermarks,
        entity_events_partitions=entity_events_partitions,
    )

    # An error here ends the worker (exit status 1), instead of Faust's default of
    # logging it and leaving the worker alive with its partitions, routing nothing (and
    # deaf to SIGTERM), and without acknowledging the failed batch: Faust acks a
    # batch's events when the agent leaves it, even by an error, and commits them at
    # its stop, so they would be lost. Exiting at once, they are redelivered to
    # whichever worker next holds the partition. (In process, for tests: raised.)
    @app.agent(payments, supervisor_strategy=mode.CrashingSupervisor)
    async def route(stream: faust.StreamT[bytes]) -> None:
        # take_events is on faust.Stream, missing from the StreamT protocol.
        batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
        async for events in batches:
            try:
                await router.route(events)
            except Exception:
                if not exit_on_error:
                    raise
                log.critical(
                    "routing failed: the worker exits, its batch unacknowledged", exc_info=True
                )
                logging.shutdown()
                os._exit(1)

    return app


class _Worker(faust.Worker):
    """Faust's worker, with a stop that ends. Faust's own stop waits on the broker
    (the consumer's commit, the producer's flush) for as long as it takes: a worker
    told to stop during a broker outage stayed for minutes, until the orchestrator
    killed it. After ``stop_timeout_s`` it now exits 1, naming the cause, and at a
    second signal at once. Nothing is lost: what it had not committed is redelivered
    to the next worker, and the state de-duplicates by event id."""

    def __init__(self, app: faust.App, *, stop_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.stop_timeout_s = stop_timeout_s
        # A thread, not a loop timer: it fires whatever the loop is doing.
        self.stop_overrun: threading.Timer | None = None

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        if self._signal_stop_time:
            exit_on_second_signal(sig)
        log.info("worker stopping", extra={"signal": sig.name})
        self.stop_overrun = threading.Timer(
            self.stop_timeout_s,
            exit_now,
            (
                "the worker's stop took more than worker_stop_timeout_s "
                f"({self.stop_timeout_s:g} s; a broker that does not answer?): exiting "
                "now; the payments it had not committed are redelivered to the next worker",
            ),
        )
        self.stop_overrun.daemon = True
        self.stop_overrun.start()
        super()._schedule_shutdown(sig)


def run_worker(
    bootstrap: str,
    *,
    loglevel: str = "info",
    payments_partitions: int = 4,
    entity_events_partitions: int = 4,
    lateness_ms: int = DEFAULT_LATENESS_MS,
    skew_ms: int = DEFAULT_SKEW_MS,
    fetch_max_wait_ms: int = kafka_compat.FETCH_MAX_WAIT_MS,
    gate: EventTimeGate | None = None,
    stop_timeout_s: float = Settings.worker_stop_timeout_s,
) -> None:
    """Run one worker in the foreground until SIGTERM/SIGINT (Faust handles signals).
    ``gate``: the event-time rules (by default from ``lateness_ms`` and ``skew_ms``).
    ``stop_timeout_s``: how long its stop may take before it exits 1 (``_Worker``).

    Exits with status 1 when routing fails with an error (its Faust agent crashed):
    a worker alive but routing nothing would hold its partitions, unnoticed."""
    # A throwaway data directory, so that running a worker leaves no empty
    # "streamscore-worker-data" behind in the user's working directory.
    with tempfile.TemporaryDirectory(prefix="streamscore-worker-") as datadir:
        app = create_app(
            bootstrap,
            payments_partitions=payments_partitions,
            entity_events_partitions=entity_events_partitions,
            gate=gate or EventTimeGate(lateness_ms=lateness_ms, skew_ms=skew_ms),
            fetch_max_wait_ms=fetch_max_wait_ms,
            datadir=datadir,
            exit_on_error=True,
        )
        # Our logging (structured JSON, set up by the CLI) stays in charge.
        worker = _Worker(
            app,
            stop_timeout_s=stop_timeout_s,
            loglevel=loglevel,
            quiet=True,
            override_logging=False,
            redirect_stdouts=False,
        )
        # Its progress spinner writes terminal escapes to stdout even when stdout is no
        # terminal: with stdout and stderr merged (a container) they corrupt a JSON line.
        worker.spinner = None
        try:
            worker.execute_from_commandline()
        finally:
            if worker.stop_overrun is not None:
                worker.stop_overrun.cancel()

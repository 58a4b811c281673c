"""The broker goes away under load: Score keeps answering (features marked stale),
ingestion resumes when it is back, nothing is lost or counted twice.

The embedded tansu keeps its log in memory, so a restarted tansu is a new, empty
broker; the outage here is a hung broker (SIGSTOP, then SIGCONT), which for the
server and the worker looks like a broker restart on a persistent engine or a network
partition: connections stall, requests time out, clients reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
from aiokafka import AIOKafkaProducer
from test_fault_tolerance import entity_log_entries
from test_rollout import request

from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings
from streamscore.server.app import ScoringServer
from streamscore.stream import kafka_compat
from streamscore.stream.broker import EmbeddedBroker, create_topics
from streamscore.stream.events import event_from_dict
from streamscore.stream.topics import ENTITY_EVENTS, TopicLayout, route_events

import reference
from system import System, assert_features_match, make_event, print_logs, publish, wait_folded

OUTAGE_S = 6.0
STALE_AFTER_S = 2.0


def read_server_log(logdir: Path) -> str:
    (server_log,) = [p.read_text() for p in logdir.glob("*.log") if "server" in p.name]
    return server_log


async def test_a_hung_broker_degrades_scores_and_loses_nothing(
    trained_model: Path, tmp_path: Path
) -> None:
    t0 = int(time.time() * 1000) - 60_000
    before = [make_event("card-A", "m-1", "d-1", "ip-1", t0 + i * 10, 100 + i) for i in range(100)]
    during = [
        make_event("card-A", "m-1", "d-1", "ip-1", t0 + 5_000 + i * 10, 300 + i) for i in range(100)
    ]
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        os.environ["STREAMSCORE_STALE_AFTER_S"] = str(STALE_AFTER_S)
        system = System(broker.bootstrap, tmp_path, trained_model)
        try:
            await system.add_worker()
            _, target = await system.add_server()
        finally:
            del os.environ["STREAMSCORE_STALE_AFTER_S"]
        try:
            await publish(broker.bootstrap, before)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.ScoringStub(channel)
                reply = await wait_folded(stub, "card", "card-A", len(before))
                assert reply.events_folded == len(before)
                outcomes: list[tuple[float, str, bool]] = []
                stop_load = asyncio.Event()
                fresh_again = asyncio.Event()  # a fresh answer sent after the outage
                resumed = float("inf")

                async def load() -> None:
                    i = 0
                    while not stop_load.is_set():
                        i += 1
                        sent = time.monotonic()
                        try:
                            answer = await stub.Score(request(i, f"card-{i % 20}"), timeout=2)
                            outcomes.append((sent, "OK", bool(answer.degraded)))
                            if sent > resumed and not answer.degraded:
                                fresh_again.set()
                        except grpc.aio.AioRpcError as error:
                            outcomes.append((sent, error.code().name, False))
                        await asyncio.sleep(0.02)

                loader = asyncio.create_task(load())
                await asyncio.sleep(1.0)
                assert broker.pid is not None
                os.kill(broker.pid, signal.SIGSTOP)
                paused = time.monotonic()
                # Events produced during the outage wait in the producer and arrive.
                producing = asyncio.create_task(publish(broker.bootstrap, during))
                await asyncio.sleep(OUTAGE_S)
                os.kill(broker.pid, signal.SIGCONT)
                resumed = time.monotonic()
                await asyncio.wait_for(producing, 60)
                reply = await wait_folded(stub, "card", "card-A", len(before) + len(during), 90)
                # Fresh again once every partition's fetch is answered (the consumers
                # may still be reconnecting); from then on, it stays fresh.
                await asyncio.wait_for(fresh_again.wait(), 30)
                fresh_since = time.monotonic()
                await asyncio.sleep(1.0)
                stop_load.set()
                await loader
                # Nothing lost, nothing twice: the features equal the reference of the
                # whole log.
                assert reply.events_folded == len(before) + len(during)
                assert_features_match(
                    dict(reply.features),
                    reference.features(before + during, "card", "card-A", reply.as_of_ms),
                )
            for child in system.children:
                child.check_running()
        finally:
            await system.stop()
            print_logs(tmp_path)
    codes = {code for _, code, _ in outcomes}
    assert codes == {"OK"}, codes  # every Score was answered
    # Sent in the outage, and not in its last 100 ms: a call sent just before SIGCONT
    # may be judged by the server after the woken broker has answered the replica's
    # pending fetch (CI saw one such answer, rightly fresh, out of 131).
    stale_during = [
        d for sent, _, d in outcomes if paused + STALE_AFTER_S + 1 < sent < resumed - 0.1
    ]
    fresh_after = [d for sent, _, d in outcomes if sent > fresh_since]
    print(
        f"{len(outcomes)} scores; during the outage {sum(stale_during)}/{len(stale_during)} "
        f"marked stale; fresh again {fresh_since - resumed:.1f} s after; "
        f"then {sum(fresh_after)}/{len(fresh_after)} stale"
    )
    fresh_in_outage = [
        round(sent - resumed, 3)
        for sent, _, d in outcomes
        if paused + STALE_AFTER_S + 1 < sent < resumed - 0.1 and not d
    ]
    assert stale_during and not fresh_in_outage, (
        f"answers during the outage not marked stale, sent at {fresh_in_outage} s from resume"
    )
    assert fresh_after and not any(fresh_after), "still stale after the broker came back"
    # The log says so too, beside the answers and the metric: stale, with its cause,
    # then fresh again.
    server_log = read_server_log(tmp_path)
    stale_at = server_log.find("features are stale: answers are marked FEATURES_STALE")
    assert stale_at >= 0, server_log
    assert "no fetch from the broker for" in server_log[stale_at:], server_log
    assert "features are fresh again" in server_log[stale_at:], server_log


async def test_a_broker_that_comes_back_empty_is_folded_from_its_start(
    trained_model: Path, tmp_path: Path
) -> None:
    """The embedded broker restarted on the same port with an empty log: tansu answers
    a fetch past its log end with nothing (Kafka says OFFSET_OUT_OF_RANGE), so the
    replica waited for the new log to pass its old position, skipping every record
    before it. It folds the new log from its start, and counts the reset."""
    t0 = int(time.time() * 1000) - 60_000
    first = [make_event("card-R", "m-1", "d-1", "ip-1", t0 + i, 100) for i in range(40)]
    again = [make_event("card-R", "m-1", "d-1", "ip-1", t0 + 100 + i, 100) for i in range(5)]
    broker = EmbeddedBroker()
    await broker.start()
    port = broker.port
    server = ScoringServer(
        Settings(port=0, kafka=broker.bootstrap, model_repository=trained_model, replay=True)
    )
    try:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            for event in first:  # a record each: the old log is longer than the new one
                await publish_folds(broker.bootstrap, [event])
            assert (await wait_folded(stub, "card", "card-R", 40)).events_folded == 40
            await broker.stop()
            broker = EmbeddedBroker(port=port)
            await broker.start()
            await create_topics(broker.bootstrap, TopicLayout().partitions())
            await publish_folds(broker.bootstrap, again)
            reply = await wait_folded(stub, "card", "card-R", 45, timeout=60)
            assert reply.events_folded == 45
            assert server.replica is not None and server.replica.log_resets >= 1
    finally:
        await server.stop()
        await broker.stop()


async def publish_folds(bootstrap: str, events: list[dict]) -> None:
    """Events routed as a worker routes them, straight to the entity-events topic."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_compat.producer_kwargs())
    await producer.start()
    try:
        for partition, value in route_events([event_from_dict(e) for e in events], 4):
            await producer.send(ENTITY_EVENTS, value, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def test_a_worker_stopped_in_an_outage_exits_within_its_stop_timeout(
    tmp_path: Path,
) -> None:
    """A worker told to stop while the broker hangs, with payments in flight: Faust's
    stop waited on the broker (the commit, the producer's flush) for as long as the
    outage lasted, past any orchestrator's grace period. It exits 1 after
    ``worker_stop_timeout_s``, saying why; what it had not committed is redelivered."""
    t0 = int(time.time() * 1000) - 60_000
    events = [
        make_event(f"card-{i % 7}", "m-1", "d-1", "ip-1", t0 + i * 10, 100) for i in range(400)
    ]
    async with EmbeddedBroker() as broker:
        await create_topics(broker.bootstrap, TopicLayout().partitions())
        system = System(broker.bootstrap, tmp_path, tmp_path)  # a worker, no server
        worker = await system.add_worker(env={"STREAMSCORE_WORKER_STOP_TIMEOUT_S": "3"})
        try:
            await publish(broker.bootstrap, events)
            deadline = time.monotonic() + 60
            while await entity_log_entries(broker.bootstrap) < len(events):  # a quarter
                worker.check_running()
                assert time.monotonic() < deadline, "the worker routes nothing"
                await asyncio.sleep(0.1)
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                code = await asyncio.wait_for(worker.process.wait(), 30)
                took = time.monotonic() - signalled
            finally:
                os.kill(broker.pid, signal.SIGCONT)
        finally:
            await system.stop()
            print_logs(tmp_path)
    log = (tmp_path / "worker-0.log").read_text()
    assert code == 1 and 3 <= took < 10, (code, took)
    assert "the worker's stop took more than worker_stop_timeout_s (3 s" in log

"""Background tasks of long-lived parts (streamscore/tasks.py): a failure is logged,
a stop cancels and waits whatever the task did."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from streamscore.tasks import cancel_and_wait, in_daemon_thread, start_background

log = logging.getLogger("streamscore.test_tasks")


async def test_a_failing_background_task_logs_its_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    kept: list[BaseException] = []
    with caplog.at_level(logging.ERROR, logger=log.name):
        task = start_background(
            broken(), name="broken", log=log, failure="the part stopped", on_failure=kept.append
        )
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next loop turn
    (record,) = [r for r in caplog.records if r.name == log.name]
    assert record.getMessage() == "the part stopped"
    assert record.exc_info is not None and str(record.exc_info[1]) == "boom"
    assert [str(e) for e in kept] == ["boom"]
    await cancel_and_wait(task)  # a failed task stops quietly


async def test_a_tracked_task_is_in_its_set_until_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A part's tasks of one kind (retiring versions, rollbacks being stored), which
    its stop waits for: each leaves the set as it ends, a failed one logged."""
    release = asyncio.Event()

    async def waits() -> None:
        await release.wait()

    async def fails() -> None:
        raise RuntimeError("boom")

    tracked: set[asyncio.Task[None]] = set()
    with caplog.at_level(logging.ERROR, logger=log.name):
        waiting = start_background(waits(), name="w", log=log, failure="x", tracked=tracked)
        failing = start_background(fails(), name="f", log=log, failure="y", tracked=tracked)
        assert tracked == {waiting, failing}
        await asyncio.gather(failing, return_exceptions=True)
        await asyncio.sleep(0)
        assert tracked == {waiting}
        release.set()
        await asyncio.gather(*tracked)
        await asyncio.sleep(0)
    assert not tracked
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["y"]


async def test_a_part_whose_task_failed_still_stops_without_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rollout manager's shadow worker dies: the failure is kept, and ``stop`` (which
    the server calls before stopping the model registry) returns instead of raising."""
    from streamscore.server.comparisons import Comparisons
    from streamscore.server.rollout import RolloutManager

    async def dies(self: Comparisons) -> None:
        raise RuntimeError("shadow backend exploded")

    monkeypatch.setattr(Comparisons, "_work", dies)
    manager = RolloutManager(registry=SimpleNamespace())  # type: ignore[arg-type]  # unused
    await manager.start()
    for _ in range(3):
        await asyncio.sleep(0)
    assert str(manager.failure) == "shadow backend exploded"
    await manager.stop()  # raised RuntimeError before it stopped via cancel_and_wait


async def test_cancel_and_wait_stops_a_running_task_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    with caplog.at_level(logging.ERROR, logger=log.name):
        task = start_background(forever(), name="forever", log=log, failure="stopped")
        await started.wait()
        await cancel_and_wait(task)
        await asyncio.sleep(0)
    assert task.cancelled()
    assert not [r for r in caplog.records if r.name == log.name]
    await cancel_and_wait(None)


async def test_a_server_whose_replica_never_catches_up_says_so_and_still_stops(
    trained_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's ready task (wait for the replica, then SERVING) fails: the failure
    is logged, health stays NOT_SERVING, and stop() still stops everything."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from streamscore.config import Settings
    from streamscore.server.app import ScoringServer
    from streamscore.stream.broker import EmbeddedBroker
    from streamscore.stream.replica import FeatureReplica, ReplicaFailed

    async def fails(self: FeatureReplica, timeout: float) -> None:
        raise ReplicaFailed("replica failed while catching up")

    monkeypatch.setattr(FeatureReplica, "wait_caught_up", fails)

    def never_ready() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "server never became ready"]

    async with EmbeddedBroker() as broker:
        settings = Settings(
            port=0,
            kafka=broker.bootstrap,
            model_repository=trained_model,
            model_reload_interval_s=0,
        )
        server = ScoringServer(settings)
        with caplog.at_level(logging.ERROR, logger="streamscore.server"):
            await server.start()
            try:
                for _ in range(500):
                    if never_ready():
                        break
                    await asyncio.sleep(0.01)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
            finally:
                await server.stop()  # returns: the failed task is awaited quietly
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    (record,) = never_ready()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ReplicaFailed)


async def test_in_daemon_thread_returns_and_raises_as_the_function_does() -> None:
    assert await in_daemon_thread(lambda: 6 * 7, name="answer") == 42
    with pytest.raises(ZeroDivisionError):
        await in_daemon_thread(lambda: 1 / 0, name="broken")


SLOW_LOAD_STOPPED = """
import asyncio, time
from streamscore.tasks import in_daemon_thread

async def main():
    loading = asyncio.ensure_future(in_daemon_thread(lambda: time.sleep(60), name="load"))
    await asyncio.sleep(0.2)
    loading.cancel()  # a stop during the load
    await asyncio.gather(loading, return_exceptions=True)
    print("stopped", flush=True)

asyncio.run(main())
"""


async def test_a_load_cancelled_in_its_thread_does_not_hold_the_exit() -> None:
    """``asyncio.to_thread``'s thread is joined at exit: a server stopped during a
    slow model load (a warm-up, an engine build) waited for the load to finish."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLOW_LOAD_STOPPED, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0 and out == b"stopped\n"

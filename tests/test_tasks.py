"""Background tasks of long-lived parts (streamscore/tasks.py): a failure is logged,
a stop cancels and waits whatever the task did."""

from __future__ import annotations

import asyncio
import logging

import pytest

from streamscore.tasks import cancel_and_wait, start_background

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


async def test_a_part_whose_task_failed_still_stops_without_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rollout manager's shadow worker dies: the failure is kept, and ``stop`` (which
    the server calls before stopping the model registry) returns instead of raising."""
    from streamscore.server.rollout import RolloutManager

    async def dies(self: RolloutManager) -> None:
        raise RuntimeError("shadow backend exploded")

    monkeypatch.setattr(RolloutManager, "_shadow_worker", dies)
    manager = RolloutManager(registry=None)  # type: ignore[arg-type]  # not used here
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

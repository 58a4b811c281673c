"""Locust load test of the streamscore gRPC API: unary ``Score`` and bidi ``ScoreStream``.

Run it headless against a running server (``streamscore serve`` or ``streamscore demo``),
with CSV and HTML reports::

    .venv/bin/locust -f loadtest/locustfile.py --headless --host 127.0.0.1:50051 \\
        -u 20 -r 10 -t 30s --csv /tmp/ss --html /tmp/ss.html ScoreUser

``ScoreUser`` calls ``Score``; ``ScoreStreamUser`` keeps one long-lived ``ScoreStream``
per user and reports every answer's latency from its request's send time; name both
(or neither) to mix them. ``--csv /tmp/ss`` writes ``/tmp/ss_stats.csv`` (one row per
RPC name: ``Score``, ``ScoreStream``), ``_stats_history.csv``, ``_failures.csv`` and
``_exceptions.csv``. Without ``--headless`` Locust serves its web UI on :8089.

Load shapes: ``STREAMSCORE_SHAPE=steady|ramp|spike`` replaces ``-u/-r/-t`` with a
scripted profile (Locust then ignores those options); lengths scale with
``STREAMSCORE_SHAPE_SECONDS`` (total run, default 60) and ``STREAMSCORE_SHAPE_USERS``
(default 20):

* ``steady``: ``USERS`` users for the whole run;
* ``ramp``: linear from 1 to ``USERS`` users over the run;
* ``spike``: ``USERS`` users, then ``STREAMSCORE_SPIKE_FACTOR`` (default 5) times as
  many for the middle 20 % of the run, then ``USERS`` again.

For example::

    STREAMSCORE_SHAPE=spike STREAMSCORE_SHAPE_SECONDS=60 .venv/bin/locust \\
        -f loadtest/locustfile.py --headless --host 127.0.0.1:50051 \\
        --csv /tmp/ss-spike --html /tmp/ss-spike.html ScoreStreamUser

Traffic comes from ``streamscore.traffic`` (the generator the demo and the model's
training data use): a skewed population (card activity log-normal, a few heavy cards
and a long tail; merchant popularity Zipf-like, s = 1.1; each card's own one or two
devices and IPs), log-normal amounts around each card's spend level and merchant's
ticket, and fraud episodes mixed in: card-testing bursts (dozens of small amounts on
a few stolen cards from one device), device farms (8-20 cards behind one device or
IP) and sprees. Each request carries the wall clock as ``event_time_ms``. Environment:
``STREAMSCORE_CARDS`` (5000), ``STREAMSCORE_MERCHANTS`` (500),
``STREAMSCORE_FRAUD_FRACTION`` (0.02), ``STREAMSCORE_SEED`` (7; plus the worker index
with ``--processes``), ``STREAMSCORE_WAIT_S`` (think time between a user's requests,
default 0), ``STREAMSCORE_TIMEOUT_S`` (per-request deadline, default 5). A TLS
server: ``STREAMSCORE_TLS_CA`` (TLS on), ``STREAMSCORE_TLS_CLIENT_CERT`` and
``STREAMSCORE_TLS_CLIENT_KEY`` (mutual TLS), ``STREAMSCORE_TLS_SERVER_NAME``, as for
the CLI's clients.

What these numbers mean, and what they do not:

* Locust rounds response times to whole milliseconds in its percentiles (the
  ``50%`` ... ``100%`` columns of ``*_stats.csv`` and the report), so a server that
  answers in 0.3 ms shows as 0 or 1 ms. Averages are kept in full precision.
* Locust is closed-loop: each user waits for its answer before sending the next
  request. When the server slows down, the users slow down with it and send less, so
  the requests that would have queued behind a stall are never sent and never
  measured (coordinated omission). Locust under-reports tail latency under overload.
  Use it for throughput, errors and behaviour under a load profile; take p99 claims
  from the open-loop generator (``loadtest/openloop.py``), which measures every
  request from its intended send time.
* One Locust process is one CPU core of gevent; on a small machine it saturates before
  the server does. Use ``--processes N`` (or ``-1`` for one per core) for more load.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent.lock import BoundedSemaphore
from gevent.queue import Queue
from locust import LoadTestShape, User, constant, events, task
from locust.env import Environment
from locust.exception import LocustError
from locust.stats import CSV_STATS_INTERVAL_SEC

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.client import transaction_from_event
from streamscore.tls import ClientTls
from streamscore.traffic import TrafficConfig, TrafficGenerator

# gRPC's own threads must cooperate with gevent's monkey patching (done by importing
# locust); this has to happen before the first channel is created.
grpc_gevent.init_gevent()


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


TIMEOUT_S = _env_float("STREAMSCORE_TIMEOUT_S", 5.0)
WAIT_S = _env_float("STREAMSCORE_WAIT_S", 0.0)
CLIENT_TLS = ClientTls.from_environment()


@events.quit.add_listener
def _write_final_csv(**_: Any) -> None:
    """Locust's CSV writer runs once a second and is not run again at exit
    (locustio/locust#1806, #2299): ``*_stats.csv`` missed the last second of the run,
    17-30 % of a short run's requests and its slowest answers, while the printed
    summary and the HTML report had them. The users have stopped when ``quit`` fires
    and the writer is still running: one more of its turns writes the final counts."""
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


class RpcFailure(Exception):
    """A failed call as Locust's failure tables should group it: status code and details
    (gRPC's own exception text carries a debug string that differs per call)."""


def _failure(error: grpc.RpcError) -> RpcFailure:
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):  # the errors of calls: all of ours
        status = code()
        return RpcFailure(f"{getattr(status, 'name', status)}: {details()}")
    return RpcFailure(repr(error))


# -- synthetic transactions ------------------------------------------------------------


class _Traffic:
    """One endless, seeded stream of payments per Locust process, shared by its users.

    gevent switches greenlets only on I/O, so ``next()`` on the shared generator never
    interleaves with another user's."""

    _events: Iterator[Any] | None = None
    _ids = itertools.count()

    @classmethod
    def next_request(cls, environment: Environment) -> pb.ScoreRequest:
        if cls._events is None:
            worker = getattr(environment.runner, "worker_index", 0) or 0
            config = TrafficConfig(
                n_cards=_env_int("STREAMSCORE_CARDS", 5000),
                n_merchants=_env_int("STREAMSCORE_MERCHANTS", 500),
                fraud_fraction=_env_float("STREAMSCORE_FRAUD_FRACTION", 0.02),
                seed=_env_int("STREAMSCORE_SEED", 7) + worker,
            )
            cls._events = TrafficGenerator(config).stream()
        event = dict(next(cls._events).event)
        # Unique across Locust processes and runs; the event time is now (live serving).
        event["event_id"] = f"lt-{os.getpid()}-{next(cls._ids)}"
        event["event_time_ms"] = time.time_ns() // 1_000_000
        return pb.ScoreRequest(
            request_id=event["event_id"], transaction=transaction_from_event(event)
        )


# -- users -----------------------------------------------------------------------------


class _GrpcUser(User):
    """One plain (sync, gevent-cooperative) gRPC channel per user, to ``--host``."""

    abstract = True
    wait_time = constant(WAIT_S)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("set the server address with --host HOST:PORT")
        host = self.host.removeprefix("grpc://").removeprefix("http://")
        self.channel = CLIENT_TLS.channel(host)
        self.stub = pb_grpc.ScoringStub(self.channel)

    def _report(
        self,
        name: str,
        started: float,
        response: pb.ScoreResponse | None,
        exception: BaseException | None,
    ) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=response.ByteSize() if response is not None else 0,
            response=response,
            context={},
            exception=exception,
        )

    def on_stop(self) -> None:
        self.channel.close()


class ScoreUser(_GrpcUser):
    """Unary ``Score`` calls, one at a time per user."""

    @task
    def score(self) -> None:
        request = _Traffic.next_request(self.environment)
        started = time.perf_counter()
        try:
            response = self.stub.Score(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            self._report("Score", started, None, _failure(error))
        else:
            self._report("Score", started, response, None)


_CLOSE = object()  # ends a stream's request iterator (half-close)


class _Stream:
    """One open ``ScoreStream`` call: requests go in through a queue, a reader greenlet
    matches answers to their send times by request id and reports them."""

    def __init__(self, user: ScoreStreamUser) -> None:
        self.user = user
        self.requests: Queue = Queue()
        self.sent: dict[str, float] = {}
        self.slots = BoundedSemaphore(user.depth)
        self.broken = False
        self.closing = False
        self.call = user.stub.ScoreStream(iter(self.requests.get, _CLOSE))
        self.reader = gevent.spawn(self._read)

    def send(self, request: pb.ScoreRequest) -> bool:
        """Queue a request once fewer than ``depth`` are unanswered; False if the stream
        broke, or a message sent on it went unanswered past the timeout (the stream is
        then cancelled, its unanswered messages reported failed). Each message has its
        own deadline: with several in flight, one the server never answered was
        reported only once every slot was held by such messages (never, while one
        slot still turned), holding its slot for the rest of the run."""
        if not self.slots.acquire(timeout=self._time_left()):
            self._time_out()
            return False
        if self.broken:
            return False
        if self._time_left() <= 0:  # a slot turned, but an older message is overdue
            self.slots.release()
            self._time_out()
            return False
        self.sent[request.request_id] = time.perf_counter()
        self.requests.put(request)
        return True

    def _time_left(self) -> float:
        """Seconds until the oldest unanswered message's deadline (``TIMEOUT_S``)."""
        oldest = next(iter(self.sent.values()), None)  # (the dict keeps send order)
        if oldest is None:
            return TIMEOUT_S
        return max(0.0, oldest + TIMEOUT_S - time.perf_counter())

    def _time_out(self) -> None:
        self._fail_pending(TimeoutError(f"no ScoreStream answer within {TIMEOUT_S} s"))
        self.close()

    def _read(self) -> None:
        try:
            for response in self.call:
                started = self.sent.pop(response.request_id, None)
                if started is None:
                    continue  # already reported as timed out
                self.user._report("ScoreStream", started, response, None)
                self.slots.release()
        except grpc.RpcError as error:
            if not self.closing:
                self._fail_pending(_failure(error))
        else:
            if not self.closing:
                self._fail_pending(RuntimeError("server ended the ScoreStream"))
        finally:
            self.broken = True
            # Wake a sender waiting for a slot so that it opens a new stream.
            for _ in range(self.user.depth):
                if self.slots.counter < self.user.depth:
                    self.slots.release()

    def _fail_pending(self, error: BaseException) -> None:
        for started in self.sent.values():
            self.user._report("ScoreStream", started, None, error)
        self.sent.clear()

    def close(self, wait_s: float = 0.0) -> None:
        """End the stream: half-closed, its answers awaited for up to ``wait_s``, then
        cancelled. What is still unanswered is reported failed: a message dropped from
        the stats would read as one the server never had to answer."""
        self.closing = True
        self.broken = True
        self.requests.put(_CLOSE)
        if wait_s > 0 and self.sent:
            self.reader.join(timeout=min(wait_s, self._time_left()))
        self.call.cancel()
        self.reader.join(timeout=1)
        self.reader.kill(block=False)
        self._fail_pending(RuntimeError("no ScoreStream answer before the stream closed"))


class ScoreStreamUser(_GrpcUser):
    """One long-lived bidi ``ScoreStream`` per user; each answer's latency runs from its
    request's send time. ``STREAMSCORE_STREAM_DEPTH`` (default 1) requests may be
    unanswered at a time; with 1 this is as closed-loop as ``ScoreUser``."""

    depth = max(1, _env_int("STREAMSCORE_STREAM_DEPTH", 1))

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.stream: _Stream | None = None

    @task
    def score_stream(self) -> None:
        if self.stream is None or self.stream.broken:
            if self.stream is not None:
                self.stream.close()
            self.stream = _Stream(self)
        self.stream.send(_Traffic.next_request(self.environment))

    def on_stop(self) -> None:
        if self.stream is not None:
            # The run's last messages: answered within their deadline, or failed.
            self.stream.close(wait_s=TIMEOUT_S)
            self.stream = None
        super().on_stop()
        super().on_stop()


# -- load shapes (STREAMSCORE_SHAPE) -----------------------------------------------------

SHAPE = os.environ.get("STREAMSCORE_SHAPE", "").strip().lower()
_SHAPES = ("steady", "ramp", "spike")
if SHAPE and SHAPE not in _SHAPES:
    raise LocustError(f"STREAMSCORE_SHAPE must be one of {', '.join(_SHAPES)}, not {SHAPE!r}")


class _Shape(LoadTestShape):
    """Locust runs the one non-abstract shape class of a locustfile, instead of
    -u/-r/-t; only the one that STREAMSCORE_SHAPE names is non-abstract."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.seconds = _env_float("STREAMSCORE_SHAPE_SECONDS", 60.0)
        self.users = max(1, _env_int("STREAMSCORE_SHAPE_USERS", 20))


class SteadyShape(_Shape):
    abstract = SHAPE != "steady"

    def tick(self) -> tuple[int, float] | None:
        if self.get_run_time() >= self.seconds:
            return None
        return self.users, float(self.users)  # all users within a second


class RampShape(_Shape):
    abstract = SHAPE != "ramp"

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        if elapsed >= self.seconds:
            return None
        users = max(1, math.ceil(self.users * elapsed / self.seconds))
        return users, max(1.0, self.users / self.seconds)


class SpikeShape(_Shape):
    abstract = SHAPE != "spike"

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        if elapsed >= self.seconds:
            return None
        peak = self.users * max(1, _env_int("STREAMSCORE_SPIKE_FACTOR", 5))
        in_spike = 0.4 * self.seconds <= elapsed < 0.6 * self.seconds
        return (peak if in_spike else self.users), float(peak)  # the spike arrives at once

"""One error taxonomy for the server, mapped to gRPC status codes in one place."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """An error a caller can cause or see; ``code`` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServingError):
    """Bad input; the message names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class OutOfRange(InvalidRequest):
    """A valid-looking value outside what the server can answer exactly."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class StreamDrained(Unavailable):
    """The server is draining: a stream ends after answering every message it read."""

    def __init__(self) -> None:
        super().__init__(
            "the server is draining: every message before this status was answered, "
            "none after; send the rest again on a new stream"
        )


class RolloutConflict(ServingError):
    """The rollout is not in the state the change needs (FAILED_PRECONDITION): it
    changed since the caller read it (another generation, or an automatic rollback
    meanwhile), or there is no canary to promote or roll back."""

    code = grpc.StatusCode.FAILED_PRECONDITION


# -- the batcher's (server/batcher.py) ------------------------------------------------


class BatcherError(ServingError):
    """A request the batcher answered without a score."""


class Overloaded(BatcherError):
    """Over capacity: the work already queued would make this request miss its
    deadline, though it alone would make it. Shed at once, never answered by the
    fallback (which would add work exactly when there is too much)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFull(Overloaded):
    """The bounded queue is full: overload, shed at once."""


class DeadlineUnreachable(BatcherError):
    """The request cannot be scored by its deadline; ``stage`` is where that was seen:
    ``submit``, ``queue``, ``dispatch`` or ``in_flight``. Policy decides between a
    fallback score marked degraded and DEADLINE_EXCEEDED."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, stage: str, message: str, *, overdue: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        # In flight for more than the batcher's OVERDUE_FACTOR times the backend's
        # predicted time: the backend is failing (hung, or far slower than measured).
        # A miss within that is the caller's tight deadline (or a busy CPU), and says
        # nothing against the backend: it must not open the breaker for every other
        # caller.
        self.overdue = overdue


class BatcherStopped(BatcherError):
    """The batcher is not running (not started yet, stopping, or stopped)."""

    code = grpc.StatusCode.UNAVAILABLE


class BackendFailed(BatcherError):
    """The backend call of this request's batch failed; ``__cause__`` is why."""

    code = grpc.StatusCode.UNAVAILABLE

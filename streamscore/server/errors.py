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

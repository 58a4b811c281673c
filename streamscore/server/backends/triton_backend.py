"""Triton Inference Server over gRPC (tritonclient's aio client).

One ``infer`` call is one ModelInfer request carrying the whole batch; Triton's own
dynamic batcher may merge concurrent requests further (the model's config sets
``max_queue_delay_microseconds``). The model follows the ``triton_repo`` contract:
input ``features`` FP32 [batch, k], output ``score`` FP32 [batch, 1].

Per-call cost: tritonclient's ``infer`` builds the request through ``InferInput``
objects, a generic request builder and an ``InferResult`` wrapper. We build the
``ModelInferRequest`` protobuf directly (model name, version, input and output
descriptors fixed at start; only shape and raw bytes change per call), send it on the
client's own gRPC stub, and read the raw output bytes back with ``np.frombuffer``.

Errors: the server unreachable, the model not ready/loaded, or no answer within
``timeout_s`` -> ``BackendUnavailable`` (callers fall back). A batch of the wrong
shape -> ``ValueError`` (checked here, and Triton's INVALID_ARGUMENT maps to it too).
Anything else the server reports (the model failing, a wrong result count) ->
``TritonInferenceError``.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import aio as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from streamscore.server.backends.base import BackendUnavailable
from streamscore.server.backends.triton_repo import INPUT_NAME, OUTPUT_NAME

__all__ = ["TritonBackend", "TritonInferenceError"]

# Reconnect quickly when Triton comes back: gRPC's default backoff grows to 120 s, so
# a restarted server would sit unused (the breaker's probes failing at once) for
# minutes. Keepalive as tritonclient's defaults; messages of any size Triton sends.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
]

# gRPC codes that mean "the server (or the model) is not there right now".
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class TritonInferenceError(RuntimeError):
    """Triton answered, but with an error that is neither bad input nor unavailability."""


class TritonBackend:
    kind = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: int | str,
        n_inputs: int,
        max_batch_size: int = 64,
        *,
        timeout_s: float = 1.0,
        start_timeout_s: float = 5.0,
    ) -> None:
        """Args:
        url: Triton's gRPC address, ``"host:port"``.
        model_name, model_version: the model in Triton's repository.
        n_inputs: features per row (the model's input dims).
        max_batch_size: largest batch one ``infer`` accepts; must not exceed the
            model's ``max_batch_size`` in Triton (checked at start).
        timeout_s: deadline of one ``infer`` call; past it -> BackendUnavailable.
        start_timeout_s: deadline of each readiness/metadata call in ``start``.
        """
        if n_inputs < 1:
            raise ValueError("n_inputs must be >= 1")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.url = url
        self.model_name = model_name
        self.model_version = str(model_version)
        self.n_inputs = n_inputs
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._client: Any = None
        self._stub: Any = None
        self._template: Any = None

    @property
    def client(self) -> Any:
        """The ``tritonclient.grpc.aio.InferenceServerClient`` (statistics, admin)."""
        if self._client is None:
            raise BackendUnavailable("Triton backend is not started")
        return self._client

    async def start(self) -> None:
        if self._client is not None:
            return
        where = f"Triton at {self.url}, model {self.model_name!r} version {self.model_version}"
        client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_OPTIONS)
        try:
            t = self.start_timeout_s
            try:
                if not await client.is_server_ready(client_timeout=t):
                    raise BackendUnavailable(f"{where}: server not ready")
                if not await client.is_model_ready(
                    self.model_name, self.model_version, client_timeout=t
                ):
                    raise BackendUnavailable(f"{where}: model not ready (not loaded?)")
                config = (
                    await client.get_model_config(
                        self.model_name, self.model_version, client_timeout=t
                    )
                ).config
            except InferenceServerException as exc:
                raise BackendUnavailable(f"{where}: {_describe(exc)}") from exc
            self._check_config(config, where)
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._stub = client._client_stub
        template = service_pb2.ModelInferRequest(
            model_name=self.model_name, model_version=self.model_version
        )
        tensor = template.inputs.add()
        tensor.name = INPUT_NAME
        tensor.datatype = "FP32"
        template.outputs.add().name = OUTPUT_NAME
        self._template = template

    def _check_config(self, config: Any, where: str) -> None:
        inputs = {t.name: t for t in config.input}
        outputs = {t.name: t for t in config.output}
        problems = []
        spec = inputs.get(INPUT_NAME)
        if spec is None or len(inputs) != 1:
            problems.append(f"inputs {sorted(inputs)}, expected only {INPUT_NAME!r}")
        elif list(spec.dims) != [self.n_inputs] or spec.data_type != _TYPE_FP32:
            problems.append(
                f"input {INPUT_NAME!r} is {_dtype_name(spec.data_type)} {list(spec.dims)}, "
                f"expected FP32 [{self.n_inputs}]"
            )
        if OUTPUT_NAME not in outputs:
            problems.append(f"no output {OUTPUT_NAME!r} (has {sorted(outputs)})")
        if config.max_batch_size < self.max_batch_size:
            problems.append(
                f"its max_batch_size {config.max_batch_size} < ours {self.max_batch_size}"
            )
        if problems:
            raise BackendUnavailable(f"{where} does not fit: " + "; ".join(problems))

    async def stop(self) -> None:
        client, self._client = self._client, None
        self._stub = None
        if client is not None:
            await client.close()

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        stub = self._stub
        if stub is None:
            raise BackendUnavailable("Triton backend is not started")
        if batch.ndim != 2 or batch.shape[1] != self.n_inputs:
            raise ValueError(
                f"batch shape {batch.shape}, expected (n, {self.n_inputs}) for model "
                f"{self.model_name!r} version {self.model_version}"
            )
        n = batch.shape[0]
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch of {n} rows, expected 1..{self.max_batch_size}")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        request = service_pb2.ModelInferRequest()
        request.CopyFrom(self._template)
        request.inputs[0].shape.extend(batch.shape)
        request.raw_input_contents.append(batch.tobytes())
        try:
            response = await stub.ModelInfer(request=request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc, self.model_name, self.model_version) from exc
        if len(response.raw_output_contents) != 1:
            raise TritonInferenceError(
                f"Triton answered {len(response.raw_output_contents)} raw outputs, expected 1"
            )
        scores = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).copy()
        if scores.shape[0] != n:
            raise TritonInferenceError(f"Triton returned {scores.shape[0]} scores for {n} rows")
        return scores


_TYPE_FP32 = 11  # inference.DataType.TYPE_FP32 in model_config.proto


def _dtype_name(value: int) -> str:
    try:
        from tritonclient.grpc import model_config_pb2

        return str(model_config_pb2.DataType.Name(value)).removeprefix("TYPE_")
    except (ImportError, ValueError):
        return str(value)


def _describe(exc: InferenceServerException) -> str:
    status = exc.status()
    return f"{status}: {exc.message()}" if status else str(exc.message())


def _map_rpc_error(exc: grpc.RpcError, model: str, version: str) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    where = f"Triton model {model!r} version {version}"
    if code in _UNAVAILABLE:
        return BackendUnavailable(f"{where} unavailable ({code}): {details}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return ValueError(f"{where} refused the input: {details}")
    return TritonInferenceError(f"{where} failed ({code}): {details}")

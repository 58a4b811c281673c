"""A bare grpc.aio echo server with streamscore's API: the baseline for ratios.

It answers Score, and each message of a ScoreStream, with a canned ScoreResponse of
the same shape streamscore sends (no features, no model), on uvloop, with the same
server options: everything streamscore adds on top of it is our cost. ScoreStream
is a plain ``async for ... yield`` handler (answers in request order, like
streamscore's async generator, without its read-ahead), so ScoreStream rows have a
streaming baseline rather than the unary one.

    python -m loadtest.echo_server --port 50099

``--reuseport`` lets several echo processes share one port (the baseline for
``serve --workers N``; see ``loadtest/scaling.py``).

``--model-repository DIR`` makes it the *model echo*: each answer also costs the one
call of the served model that no Score can avoid (the primary version, loaded and
called the way ``serve`` loads and calls it inline, batch 1, on a fixed vector, with
the same ``onnx_kernel`` setting and, like Score, with no numpy array where the
backend scores a row as it is; its score is in the answer). The model echo over
the echo is the model's own cost on the serving loop; Score over the model echo is
everything else Score does (features, batcher, rollout, response, metrics): the most
a faster Score body could save.

    python -m loadtest.echo_server --port 50099 --model-repository DIR
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import uvloop
from grpc_health.v1 import health, health_pb2_grpc

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.config import Settings, load_settings
from streamscore.server.app import pending_call_options
from streamscore.server.backends.base import Backend
from streamscore.server.repository import ModelRegistry


def canned(request_id: str, score: float = 0.01) -> pb.ScoreResponse:
    """The echo's answer: streamscore's response shape, nothing computed."""
    return pb.ScoreResponse(
        request_id=request_id,
        score=score,
        decision=pb.APPROVE,
        model=pb.ModelRef(name="echo", version="1", variant=pb.PRIMARY),
        timings=pb.Timings(queue_us=0, features_us=1, model_us=1, total_us=2),
    )


class Echo(pb_grpc.ScoringServicer):
    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return canned(request.request_id)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        async for request in request_iterator:
            yield canned(request.request_id)


class ModelEcho(pb_grpc.ScoringServicer):
    """The echo whose every answer also makes ``score()``, the model call
    (``model_call``). A class of its own, so that the plain echo stays as bare as
    before."""

    def __init__(self, score: Callable[[], float]) -> None:
        self.score = score

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return canned(request.request_id, self.score())

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        async for request in request_iterator:
            yield canned(request.request_id, self.score())


def model_call(backend: Backend, n_inputs: int) -> Callable[[], float]:
    """One inline call of ``backend`` on a fixed row, as an idle batcher makes it for
    Score: the row as it is (a tuple of floats) where the backend scores rows so
    (``score_row_inline``), else a batch of one: its score."""
    infer_inline = getattr(backend, "infer_inline", None)
    if infer_inline is None:
        raise SystemExit(f"the model echo needs an in-process backend, not {backend.kind}")
    score_row_inline = getattr(backend, "score_row_inline", None)
    row = (0.5,) * n_inputs

    def score() -> float:
        if score_row_inline is not None:
            score = score_row_inline(row)
            if score is not None:
                return float(score)
        scores = infer_inline(np.array(row, np.float32, ndmin=2))
        if scores is None:
            raise RuntimeError("the model is too slow to call on the event loop")
        return float(scores[0])

    return score


def model_registry(repository: Path, model: str, version: str) -> ModelRegistry:
    """The model echo's models, as ``serve`` loads them: with the same onnx_kernel
    setting (STREAMSCORE_ONNX_KERNEL), no hot reload."""
    onnx_kernel = load_settings().onnx_kernel
    return ModelRegistry(
        repository, model, version=version, reload_interval_s=0, onnx_kernel=onnx_kernel
    )


async def start(
    port: int = 0, reuseport: bool = False, score: Callable[[], float] | None = None
) -> tuple[grpc.aio.Server, int]:
    """The echo server, started on 127.0.0.1 (``port`` 0: a free one); it and its port.
    Without ``reuseport`` a port already taken is an error, not a silent share.
    ``score``: the model echo's model call (``model_call``)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", int(reuseport)),
            *pending_call_options(Settings().max_pending_calls),
        ]
    )
    pb_grpc.add_ScoringServicer_to_server(Echo() if score is None else ModelEcho(score), server)
    # SERVING from the start (the overall status), for ``client.wait_serving``.
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def serve(
    port: int, reuseport: bool, repository: Path | None, model: str, version: str
) -> None:
    if repository is None:
        server, port = await start(port, reuseport)
        print(f"echo server on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()
        return
    models = model_registry(repository, model, version)
    await models.start()
    try:
        served = models.primary
        score = model_call(served.backend, len(served.metadata.inputs))
        server, port = await start(port, reuseport, score)
        print(f"model echo server ({model}) on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()
    finally:
        await models.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--reuseport", action="store_true", help="share the port with other echo processes"
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        help="the model echo: also call this repository's primary model per answer",
    )
    parser.add_argument("--model", default="fraud_mlp", help="the model echo's model name")
    parser.add_argument("--model-version", default="", help="its version (default: newest)")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            serve(args.port, args.reuseport, args.model_repository, args.model, args.model_version)
        )

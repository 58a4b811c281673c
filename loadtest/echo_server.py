"""A bare grpc.aio echo server with streamscore's API: the baseline for ratios.

It answers Score, and each message of a ScoreStream, with a canned ScoreResponse of
the same shape streamscore sends (no features, no model), on uvloop, with the same
server options: everything streamscore adds on top of it is our cost. ScoreStream
is a plain ``async for ... yield`` handler (answers in request order, like
streamscore's async generator, without its read-ahead), so ScoreStream rows have a
streaming baseline rather than the unary one.

    python loadtest/echo_server.py --port 50099

``--reuseport`` lets several echo processes share one port (the baseline for
``serve --workers N``; see ``loadtest/scaling.py``).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc
import uvloop

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc


def canned(request_id: str) -> pb.ScoreResponse:
    """The echo's answer: streamscore's response shape, nothing computed."""
    return pb.ScoreResponse(
        request_id=request_id,
        score=0.01,
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


async def start(port: int = 0, reuseport: bool = False) -> tuple[grpc.aio.Server, int]:
    """The echo server, started on 127.0.0.1 (``port`` 0: a free one); it and its port.
    Without ``reuseport`` a port already taken is an error, not a silent share."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuseport))])
    pb_grpc.add_ScoringServicer_to_server(Echo(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def serve(port: int, reuseport: bool) -> None:
    server, port = await start(port, reuseport)
    print(f"echo server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--reuseport", action="store_true", help="share the port with other echo processes"
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.reuseport))

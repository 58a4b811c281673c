"""A bare grpc.aio echo server with streamscore's API: the baseline for ratios.

It answers Score with a canned ScoreResponse of the same shape streamscore sends
(no features, no model), on uvloop, with the same server options: everything
streamscore adds on top of it is our cost.

    python loadtest/echo_server.py --port 50099
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import uvloop

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc


class Echo(pb_grpc.ScoringServicer):
    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return pb.ScoreResponse(
            request_id=request.request_id,
            score=0.01,
            decision=pb.APPROVE,
            model=pb.ModelRef(name="echo", version="1", variant=pb.PRIMARY),
            timings=pb.Timings(queue_us=0, features_us=1, model_us=1, total_us=2),
        )


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ScoringServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(parser.parse_args().port))

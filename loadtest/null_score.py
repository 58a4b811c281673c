"""``streamscore serve`` with an empty Score: the server's own cost beyond the echo's.

It runs ``streamscore`` with its command-line arguments, with one change: Score
answers at once with the echo's canned response, doing none of its work (no
validation, features, model, batcher, rollout, metrics of the call), and ScoreStream
answers each message so, like the echo's. Everything else runs as in ``serve``: the
feature replica polling the broker, the GC policy, the loop-lag probe, health,
reflection, the metrics endpoint, Score's own request parser (server/wire.py). So,
measured beside the echo and the model echo (``loadtest.ab --null-score``), Score's
extra CPU per request splits into the server around it (null Score over the echo)
and Score's body (Score over null Score), the part a faster body can reduce:

    python -m loadtest.null_score serve --kafka HOST:PORT --port 50051 ...
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc

from loadtest.echo_server import canned
from streamscore import cli
from streamscore.server.scoring import ScoreInput, ScoringService


async def empty_score(
    self: ScoringService, request: ScoreInput, context: grpc.aio.ServicerContext
) -> bytes:
    """The echo's answer, from inside streamscore's server (encoded here: Score's
    answers come encoded, with no serializer, where the echo's gRPC serializes)."""
    return canned(request.request_id).SerializeToString()


async def empty_score_stream(
    self: ScoringService,
    request_iterator: AsyncIterator[ScoreInput],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[bytes]:
    """The echo's ScoreStream, from inside streamscore's server."""
    async for request in request_iterator:
        yield canned(request.request_id).SerializeToString()


def main() -> int:
    ScoringService.Score = empty_score  # type: ignore[method-assign]
    ScoringService.ScoreStream = empty_score_stream  # type: ignore[method-assign, assignment]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())

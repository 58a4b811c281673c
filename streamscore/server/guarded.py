"""Register a service's generated handlers so that undecodable bytes are refused with
INVALID_ARGUMENT, never gRPC's UNKNOWN.

gRPC parses a request before any handler runs; the generated ``add_*_to_server``
functions (ours for Admin, grpc's for health and reflection) use protobuf's
``FromString``, which raises on bytes that are not the message, and gRPC answers that
UNKNOWN with a traceback in the log, to callers that need no token to send them.
``add_guarded`` takes the handlers such a function would register, gives each a
parser that never raises (a ``MalformedRequest`` instead) and a behaviour that
refuses one before the servicer sees it. Score, ScoreStream and GetFeatures parse
their own requests (``scoring.add_scoring_service``) to the same effect.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from streamscore.server.drain import DrainCut
from streamscore.server.malformed import MalformedRequest
from streamscore.server.validation import lenient_parser


class _Captured:
    """Stands in for the server in a generated ``add_*_to_server`` call, keeping what it
    would register."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, by method, below

    def add_registered_method_handlers(
        self, name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.name, self.handlers = name, handlers


def add_guarded(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    *,
    service_name: str = "",
    open_streams: DrainCut | None = None,
    on_malformed: OnMalformed | None = None,
) -> None:
    """``add_to_server(servicer, server)``, with requests that do not parse refused;
    ``service_name``: serve it under that name instead (a service whose messages
    are the same on the wire under another version's name); ``open_streams``: gets
    the task of each call that answers with a stream while it is open (health's
    Watch, reflection), for a drain to end them: only their callers would;
    ``on_malformed``: answers a unary call whose request did not parse, in place of
    the plain refusal (a service that authenticates its callers first: Admin)."""
    captured = _Captured()
    add_to_server(servicer, captured)
    if not captured.handlers:
        raise ValueError(f"{add_to_server.__name__} registered no method handlers")
    name = service_name or captured.name
    handlers = {
        method: _lenient_handler(
            handler, open_streams, functools.partial(on_malformed, method) if on_malformed else None
        )
        for method, handler in captured.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


# (method, the request that did not parse, context) -> the call's answer.
OnMalformed = Callable[[str, MalformedRequest, grpc.aio.ServicerContext], Awaitable[Any]]


def _refuse(context: grpc.aio.ServicerContext, request: MalformedRequest) -> None:
    # Set, not context.abort(): abort keeps a reference cycle per call (scoring._guard).
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details(f"{request.field}: {request.reason}")


def _cut_off(streams: DrainCut, context: grpc.aio.ServicerContext) -> bool:
    """In a streaming call's ``except CancelledError``: True, its status set to
    UNAVAILABLE, when a drain cut it off; False for any other cancel."""
    if not streams.was_cut(asyncio.current_task()):
        return False
    context.set_code(grpc.StatusCode.UNAVAILABLE)
    context.set_details("the server is draining")
    return True


_UNDRAINED = DrainCut()  # for the calls of a service no drain cuts off (never cut)


def _lenient_handler(
    handler: Any,
    open_streams: DrainCut | None = None,
    on_malformed: Callable[[MalformedRequest, grpc.aio.ServicerContext], Awaitable[Any]]
    | None = None,
) -> Any:
    """The handler with a parser that never raises and a behaviour that refuses what
    it could not parse (a unary request at once; a streamed one where it comes); one
    that answers with a stream is in ``open_streams`` while it runs."""
    parse = handler.request_deserializer
    if parse is None:
        return handler
    streams = open_streams or _UNDRAINED
    lenient = lenient_parser(parse.__self__)  # FromString, bound to its message class

    if handler.unary_unary is not None:
        call = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                if on_malformed is not None:
                    return await on_malformed(request, context)
                return _refuse(context, request)
            return await call(request, context)

        return handler._replace(request_deserializer=lenient, unary_unary=unary_unary)
    if handler.unary_stream is not None:
        call = handler.unary_stream
        if inspect.isasyncgenfunction(call):

            async def answers(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, MalformedRequest):
                    _refuse(context, request)
                    return
                try:
                    with streams.waiting():
                        async for answer in call(request, context):
                            yield answer
                except asyncio.CancelledError:
                    if not _cut_off(streams, context):
                        raise

            return handler._replace(request_deserializer=lenient, unary_stream=answers)

        async def writes(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, MalformedRequest):
                return _refuse(context, request)
            try:
                with streams.waiting():
                    await call(request, context)
            except asyncio.CancelledError:
                if not _cut_off(streams, context):
                    raise

        return handler._replace(request_deserializer=lenient, unary_stream=writes)
    # Streamed requests: the servicer reads them through a filter that ends the
    # stream, its status set, at the first that does not parse.
    kind = "stream_unary" if handler.stream_unary is not None else "stream_stream"
    call = getattr(handler, kind)

    async def filtered(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, MalformedRequest):
                _refuse(context, request)
                return
            yield request

    if inspect.isasyncgenfunction(call):

        async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                with streams.waiting():
                    async for answer in call(filtered(requests, context), context):
                        yield answer
            except asyncio.CancelledError:
                if not _cut_off(streams, context):
                    raise

    else:

        async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            return await call(filtered(requests, context), context)

    return handler._replace(request_deserializer=lenient, **{kind: streamed})

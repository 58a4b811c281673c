"""Client-side helpers over the public gRPC API (demo, tests, load tools)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamscore._proto.v1 import scoring_pb2 as pb


def transaction_from_event(event: dict[str, Any]) -> pb.Transaction:
    """The Transaction a payment service would send for this payment event."""
    return pb.Transaction(
        transaction_id=event["event_id"],
        card_id=event["card_id"],
        merchant_id=event["merchant_id"],
        device_id=event["device_id"],
        ip=event["ip"],
        amount_minor=event["amount_minor"],
        currency=event["currency"],
        mcc=str(event["mcc"]),
        country=event["country"],
        event_time_ms=event["event_time_ms"],
    )


async def wait_serving(target: str, timeout: float = 60.0, service: str = "") -> None:
    """Wait until the server's health check answers SERVING."""
    deadline = time.monotonic() + timeout
    last: object = None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                last = error.code()
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout} s (last: {last})")

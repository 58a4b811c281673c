"""gRPC server reflection, as v1alpha and as v1.

grpcio-reflection ships only v1alpha; newer grpcurl, grpcui and Postman ask for v1
first. The two are the same file under another package, so v1 is served by the same
servicer, its descriptors added to protobuf's default pool from v1alpha's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from streamscore.server.drain import DrainCut
from streamscore.server.guarded import add_guarded

V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def add_reflection(
    server: grpc.aio.Server,
    services: Iterable[str],
    open_streams: DrainCut | None = None,
) -> None:
    """Serve reflection of ``services`` (and of itself) under both versions; its open
    streams in ``open_streams`` (see ``add_guarded``)."""
    _add_v1_descriptors()
    names = (reflection.SERVICE_NAME, V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(
        (*services, *names), pool=_MethodsToo(descriptor_pool.Default())
    )
    for name in names:
        add_guarded(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            servicer,
            server,
            service_name=name,
            open_streams=open_streams,
        )


def _add_v1_descriptors() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_SERVICE)
        return  # added by an earlier server in this process
    except KeyError:
        pass
    v1 = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1)
    old, new = v1.package, V1_SERVICE.rsplit(".", 1)[0]
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = new
    # Every reference to a type of the file, by its full name, moves with it.
    for message in v1.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # (set, even empty, it means a message)
                field.type_name = _renamed(field.type_name, old, new)
    for method in v1.service[0].method:
        method.input_type = _renamed(method.input_type, old, new)
        method.output_type = _renamed(method.output_type, old, new)
    pool.Add(v1)


def _renamed(type_name: str, old: str, new: str) -> str:
    prefix = f".{old}."
    return f".{new}.{type_name[len(prefix) :]}" if type_name.startswith(prefix) else type_name


class _MethodsToo:
    """A descriptor pool whose ``FindFileContainingSymbol`` finds a service's methods
    too (``grpcurl describe streamscore.v1.Scoring.Score``): protobuf's own finds
    services, messages, fields and enums, not methods (grpc/grpc#34743)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service_name, _, method = name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file

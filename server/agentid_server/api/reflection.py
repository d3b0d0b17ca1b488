"""Server reflection, v1alpha (grpcio-reflection) and v1.

grpcio-reflection ships only v1alpha. The v1 service has the same messages and field numbers under
another package name, so v1 is served by the same servicer with the v1alpha message classes.

With the upb protobuf runtime, the descriptor pool cannot find a *method* symbol such as
`agentid.v1.AgentIdentityService.Check` (it knows the service), which is what `grpcurl describe`
and ghz ask for; the servicer here answers those with the service's file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_Base: Any = reflection.aio.ReflectionServicer  # type: ignore[attr-defined]


class _ReflectionServicer(_Base):  # type: ignore[misc]
    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        service, _, method = fully_qualified_name.rpartition(".")
        if service and method:
            try:
                found = descriptor_pool.Default().FindServiceByName(service)  # type: ignore[no-untyped-call]
            except KeyError:
                found = None
            if found is not None and method in found.methods_by_name:
                fully_qualified_name = service
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE)
    servicer = _ReflectionServicer(names)

    async def info(
        requests: AsyncIterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in servicer.ServerReflectionInfo(requests, context):
            yield response

    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (reflection.SERVICE_NAME, V1_SERVICE):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )

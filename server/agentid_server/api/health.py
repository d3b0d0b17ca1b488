"""grpc.health.v1.Health, with its Watch streams bounded: anyone may open one, no credential
needed, so their number is capped for the whole server (each holds memory until it ends)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from agentid_server.api.errors import status_for


class BoundedHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """The standard health servicer; beyond ``max_watches`` Watch streams at once, one more is
    RESOURCE_EXHAUSTED / TOO_MANY_HEALTH_WATCHES."""

    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self._max_watches = max_watches
        self.watching = 0

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.watching >= self._max_watches:
            await _abort(
                context,
                status_for(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "too many health watches are open on this server; use Check, or retry later",
                    "TOO_MANY_HEALTH_WATCHES",
                    {"limit": str(self._max_watches)},
                ),
            )
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)

"""Serving the door: aiohttp's AppRunner in the event loop grpc.aio runs in, on an asyncio server
whose connections are capped (`http.max_connections`): aiohttp itself accepts any number."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from agentid_server.config import HttpSettings, is_loopback

log = logging.getLogger(__name__)
BACKLOG = 128  # connections the kernel queues before we accept them


@dataclass
class HttpListener:
    """A started HTTP listener and the port it is bound to (port 0 picks a free one)."""

    runner: web.AppRunner
    server: asyncio.Server
    port: int

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish within the shutdown grace it was
        started with, then closes every connection."""
        self.server.close()
        await self.runner.cleanup()


async def start_http(app: web.Application, http: HttpSettings, grace: float) -> HttpListener:
    """Binds `http.listen` (with TLS when `http.tls_cert` is set) and serves ``app``; OSError
    (or ssl.SSLError) when the address cannot be bound or the TLS files read."""
    host, _, port = http.listen.rpartition(":")
    context = _tls(http)
    if context is None and not is_loopback(http.listen):
        log.warning("serving HTTP on %s without TLS: set http.tls_cert, http.tls_key", http.listen)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=grace,
        keepalive_timeout=http.keepalive_timeout,
    )
    await runner.setup()
    try:
        assert runner.server is not None  # set up
        server = await asyncio.get_running_loop().create_server(
            _capped(runner.server, http.max_connections),
            host.strip("[]"),
            int(port),
            ssl=context,
            backlog=BACKLOG,
            reuse_address=True,
        )
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(server.sockets[0].getsockname()[1])
    log.info("serving HTTP on %s (port %d)", http.listen, bound)
    return HttpListener(runner, server, bound)


class _Refused(asyncio.Protocol):
    """A connection beyond the limit: closed at once, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a TCP connection
        transport.abort()


def _capped(server: web.Server, limit: int) -> Callable[[], asyncio.BaseProtocol]:
    """aiohttp's protocol factory, refusing connections while ``limit`` are open. Those
    accepted in one turn of the event loop register only once it ends, so a burst may pass the
    limit by at most one accept batch (the backlog)."""

    def protocol() -> asyncio.BaseProtocol:
        if len(server.connections) >= limit:
            return _Refused()
        return server()

    return protocol


def _tls(http: HttpSettings) -> ssl.SSLContext | None:
    if not http.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(http.tls_cert, http.tls_key)
    return context

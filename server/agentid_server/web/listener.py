"""Serving the door: aiohttp's AppRunner and TCPSite in the event loop grpc.aio runs in."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from agentid_server.config import HttpSettings, is_loopback

log = logging.getLogger(__name__)


@dataclass
class HttpListener:
    """A started HTTP listener and the port it is bound to (port 0 picks a free one)."""

    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish within the shutdown grace it was
        started with, then closes every connection."""
        await self.runner.cleanup()


async def start_http(app: web.Application, http: HttpSettings, grace: float) -> HttpListener:
    """Binds `http.listen` (with TLS when `http.tls_cert` is set) and serves ``app``; OSError
    (or ssl.SSLError) when the address cannot be bound or the TLS files read."""
    host, _, port = http.listen.rpartition(":")
    context = _tls(http)
    if context is None and not is_loopback(http.listen):
        log.warning("serving HTTP on %s without TLS: set http.tls_cert, http.tls_key", http.listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=grace)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    log.info("serving HTTP on %s (port %d)", http.listen, bound)
    return HttpListener(runner, bound)


def _tls(http: HttpSettings) -> ssl.SSLContext | None:
    if not http.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(http.tls_cert, http.tls_key)
    return context

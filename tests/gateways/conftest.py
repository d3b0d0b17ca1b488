"""Fixtures for the real gateways: agentid with `[[routes]]` and a risk rule, a small upstream
recording every request that reaches it, and nginx or Caddy (tests/gateways/gateways.py, running
docs/gateways.md's configurations) in front of it.

Without nginx or Caddy installed, the tests needing it skip, saying what to install; with
AGENTID_REQUIRE_GATEWAYS=1 (.ci/run sets it) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import CHECK_KEY, FakeClock, Harness, IdpFixture, running_harness
from tests.gateways.gateways import (
    REQUIRE_GATEWAYS,
    Gateway,
    GatewayMissing,
    caddy_binary,
    nginx_binary,
    start_caddy,
    start_nginx,
)

# The routes and rule of docs/gateways.md's example.
ROUTES = [
    {"service": "payments-api", "method": "GET", "path": "/tickets/{id}", "action": "tickets.read", "resource": "ticket/{id}"},
    {"service": "payments-api", "method": "POST", "path": "/accounts/{account}/transfers", "action": "payments.transfer", "resource": "account/{account}"},
]  # fmt: skip
RULES = [
    {
        "name": "large-transfer",
        "action": "payments.transfer",
        "when": "double(context.amount) > 1000.0",
    }
]
GATEWAYS = ("nginx", "caddy")


def _gateway_config(config: dict[str, Any]) -> None:
    config["routes"] = ROUTES
    config["risk"] = RULES


@pytest.fixture
async def h(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path, idp, clock, mutate=_gateway_config) as harness:
        yield harness


@dataclass
class Seen:
    method: str
    target: str  # the request target as it reached the upstream
    headers: CIMultiDict[str]


@dataclass
class Upstream:
    """The protected service: answers 200 "upstream" to anything, recording what reached it."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    recorded = Upstream()

    async def handle(request: web.BaseRequest) -> web.Response:
        recorded.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers)))
        await request.read()
        return web.Response(text="upstream")

    server = web.Server(handle)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recorded.port = runner.addresses[0][1]
    try:
        yield recorded
    finally:
        await runner.cleanup()


def _missing(kind: str) -> str | None:
    try:
        nginx_binary() if kind == "nginx" else caddy_binary()
    except GatewayMissing as missing:
        return str(missing)
    return None


def require(kind: str) -> None:
    """Skip when ``kind`` is not installed, or fail under AGENTID_REQUIRE_GATEWAYS=1."""
    missing = _missing(kind)
    if missing is None:
        return
    if os.environ.get(REQUIRE_GATEWAYS) == "1":
        pytest.fail(f"{REQUIRE_GATEWAYS}=1 but the {kind} tests cannot run: {missing}")
    pytest.skip(f"a real {kind} in front of agentid: {missing}")


@pytest.fixture(params=GATEWAYS)
def gateway_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    require(kind)  # first of all, before agentid and the upstream start
    return kind


@pytest.fixture
def nginx_kind() -> str:
    require("nginx")
    return "nginx"


def _started(kind: str, tmp_path: Path, h: Harness, upstream: Upstream) -> Gateway:
    start = start_nginx if kind == "nginx" else start_caddy
    return start(
        tmp_path / kind,
        agentid=f"127.0.0.1:{h.running.http_port}",
        service=upstream.address,
        key=CHECK_KEY,
    )


@pytest.fixture
async def gateway(
    gateway_kind: str, tmp_path: Path, h: Harness, upstream: Upstream
) -> AsyncIterator[Gateway]:
    """nginx or Caddy (each test runs with both) in front of ``upstream``, asking ``h``."""
    started = await asyncio.to_thread(_started, gateway_kind, tmp_path, h, upstream)
    try:
        yield started
    finally:
        await asyncio.to_thread(started.stop)


@pytest.fixture
async def nginx(
    nginx_kind: str, tmp_path: Path, h: Harness, upstream: Upstream
) -> AsyncIterator[Gateway]:
    """nginx alone (what it passes on is nginx's own)."""
    started = await asyncio.to_thread(_started, nginx_kind, tmp_path, h, upstream)
    try:
        yield started
    finally:
        await asyncio.to_thread(started.stop)

"""Stopping drains first: health turns NOT_SERVING while every call, those already sent and new
ones, is still answered for `server.drain`; only then are calls refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import CHECK_KEY, FakeClock, IdpFixture, bearer, make_settings, start_harness

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def long_drain(config: dict[str, Any]) -> None:
    config["server"]["drain"] = "10m"  # ended by hurry() once the test has seen what it needs


async def test_a_stop_drains_before_refusing_calls(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    h = await start_harness(tmp_path, idp, clock, make_settings(tmp_path, idp, long_drain))
    health = health_pb2_grpc.HealthStub(h.channel)
    token = (await h.delegate()).token
    request = pb.CheckRequest(token=token, action="tickets.read", resource="ticket/1")

    async def check() -> pb.CheckResponse:
        return await h.stub.Check(request, metadata=bearer(CHECK_KEY), timeout=30)

    sent = [asyncio.ensure_future(check()) for _ in range(80)]
    await asyncio.sleep(0)  # sent, not yet answered
    stopping = asyncio.ensure_future(h.running.stop(grace=5))
    try:
        answers = await asyncio.gather(*sent, return_exceptions=True)
        assert [getattr(a, "decision", a) for a in answers] == [pb.DECISION_ALLOW] * 80
        for service in ("", "agentid.v1.AgentIdentityService"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert status.status == NOT_SERVING
        late = await check()  # still served during the drain
        assert late.decision == pb.DECISION_ALLOW
        assert not stopping.done()
    finally:
        h.running.hurry()
        await stopping
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # after the drain
        await check()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    await h.channel.close()


async def test_the_http_door_drains_and_stops_with_grpc(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """HTTP is served through the drain like gRPC (a gateway's health check is on gRPC; its
    requests keep coming until it moves away), then refused once the server has stopped."""
    h = await start_harness(tmp_path, idp, clock, make_settings(tmp_path, idp, long_drain))
    url = h.http_url + "/.well-known/jwks.json"
    stopping = asyncio.ensure_future(h.running.stop(grace=5))
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200  # during the drain
        assert not stopping.done()
    finally:
        h.running.hurry()
        await stopping
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            await response.read()
    await h.channel.close()

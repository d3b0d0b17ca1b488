"""A failing store is found quickly and without stalling the event loop: health turns NOT_SERVING
within `database.unhealthy_after` of a write that does not commit (not after the store's own
busy timeout), writes are then refused at once, and the inline SQLite writer does not block the
loop batch after batch while the store keeps failing. The store is failed for real: another
connection holds SQLite's write lock (BEGIN EXCLUSIVE)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import (
    ADMIN_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    error_info,
    make_settings,
    running_harness,
    start_harness,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextmanager
def locked(h: Harness) -> Iterator[None]:
    locker = sqlite3.connect(h.tmp_path / "agentid.db", timeout=1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


async def health_becomes(h: Harness, expected: int, within: float) -> None:
    stub = health_pb2_grpc.HealthStub(h.channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=within)
        if answer.status == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"health did not become {expected} within {within} s")


async def refused(call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call, 20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "AUDIT_UNAVAILABLE"


def patient_thread_writer(config: dict[str, Any]) -> None:
    config["database"].update(sqlite_writer="thread", busy_timeout="30s", unhealthy_after="500ms")


async def test_a_stuck_store_is_unhealthy_long_before_its_busy_timeout(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """The writer thread waits up to the 30 s busy timeout for the lock; health and the callers
    need not (the bound below is well under it, and no statement about how fast)."""
    async with running_harness(tmp_path, idp, clock, mutate=patient_thread_writer) as h:
        token = (await h.delegate()).token
        with locked(h):
            waiting = asyncio.ensure_future(h.check(token, "tickets.read"))
            await health_becomes(h, NOT_SERVING, within=12)
            await refused(waiting)
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # while stuck: not queued
                await asyncio.wait_for(h.check(token, "tickets.read"), 20)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            info = error_info(caught.value)
            assert (info.reason, info.metadata["unhealthy_after"]) == ("AUDIT_UNAVAILABLE", "0.5")
        await health_becomes(h, SERVING, within=20)  # the stuck batch commits once unlocked
        assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_a_failing_store_does_not_stall_the_event_loop_batch_after_batch(
    harness: Harness,
) -> None:
    """The inline writer writes on the event loop, and a locked SQLite file makes each attempt
    wait for its busy timeout (0.2 s). Once the store has failed, attempts run off the loop: a
    heartbeat on the loop sees no such stall per failing Check (a generous bound for noise)."""
    token = (await harness.delegate()).token
    loop = asyncio.get_running_loop()
    stalls, beating = 0, True

    async def heartbeat() -> None:
        nonlocal stalls
        while beating:
            before = loop.time()
            await asyncio.sleep(0.005)
            if loop.time() - before > 0.15:
                stalls += 1

    with locked(harness):
        await refused(harness.check(token, "tickets.read"))  # the first failure: found inline
        beat = asyncio.ensure_future(heartbeat())
        for _ in range(10):
            await refused(harness.check(token, "tickets.read"))
        beating = False
        await beat
    assert stalls <= 4, f"the loop stalled {stalls} times while the store failed"
    await health_becomes(harness, SERVING, within=20)
    assert (await harness.check(token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_a_stop_while_the_store_is_stuck_ends_cleanly(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """SIGTERM while a write is stuck: the stop queues no last batch into a store it knows is
    failing (that raised UNAVAILABLE from stop, leaving the writer, its lock and the engines
    behind), and the next start takes the writer lock and signs the head."""

    def quick(config: dict[str, Any]) -> None:
        patient_thread_writer(config)
        config["database"]["busy_timeout"] = "3s"  # the stuck writer thread gives up sooner

    h = await start_harness(tmp_path, idp, clock, make_settings(tmp_path, idp, quick))
    try:
        token = (await h.delegate()).token
        with locked(h):
            waiting = asyncio.ensure_future(h.check(token, "tickets.read"))
            await health_becomes(h, NOT_SERVING, within=12)
            await refused(waiting)
            await h.channel.close()
            await h.running.stop(grace=0.5)  # raised Unavailable before
    finally:
        await h.channel.close()
    async with running_harness(tmp_path, idp, clock, mutate=quick) as again:
        assert (await again.check(token, "tickets.read")).decision == pb.DECISION_ALLOW
        verified = await again.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
        assert verified.ok

"""What callers may hold open, and for how long: audit followers reached only by the records they
can match, streams capped per principal, Health/Watch capped for the whole server, connections
and streams per connection bounded, and every stream ended once its credential is no longer
good (issue 12, points 1, 2 and 5)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_client import RevocationWatcher
from agentid_server.domain.audit import AuditQuery, AuditRecord
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    error_info,
    running_harness,
    with_config,
)

LOCAL = (("grpc.use_local_subchannel_pool", 1),)  # a channel of its own: its own connection


async def first(stream: Any, within: float = 5) -> Any:
    item = await asyncio.wait_for(stream.read(), within)
    assert item is not grpc.aio.EOF
    return item


async def refusal(stream: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first(stream)
    return caught.value


def follow(h: Harness, credential: str, **fields: Any) -> Any:
    return h.stub.Audit(pb.AuditRequest(follow=True, **fields), metadata=bearer(credential))


# -- point 1: followers are reached only by what they can match ---------------------------------


async def test_a_record_asks_only_the_followers_that_can_match_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    bob = h.idp.token(sub="bob")
    await h.delegate(bob)  # a record for bob's followers' backlog: read, they are subscribed
    bobs = [follow(h, bob) for _ in range(10)]
    for stream in bobs:
        await first(stream)
    session = await h.delegate()
    alices = follow(h, h.idp.token())
    assert (await first(alices)).record.session_id == session.session_id
    asked: list[AuditRecord] = []
    matches = AuditQuery.matches

    def counted(self: AuditQuery, record: AuditRecord, sessions: set[str] | None = None) -> bool:
        asked.append(record)
        return matches(self, record, sessions)

    monkeypatch.setattr(AuditQuery, "matches", counted)
    decided = [int((await h.check(session.token, "tickets.read")).decision_id) for _ in range(3)]
    assert [(await first(alices)).record.id for _ in range(3)] == decided
    # One follower asked per record: alice's. Bob's ten are not (before: all eleven, each time).
    assert [r.id for r in asked] == decided
    for stream in [*bobs, alices]:
        stream.cancel()


# -- point 2: limits on what one caller holds open ----------------------------------------------


async def test_streams_are_capped_per_principal(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    limits = with_config(server={"max_streams_per_user": 2, "max_streams_per_service": 1})
    async with running_harness(tmp_path, idp, clock, mutate=limits) as h:
        await h.delegate()
        alice = h.idp.token()
        held = [follow(h, alice), follow(h, alice)]
        for stream in held:
            await first(stream)
        refused = await refusal(follow(h, alice))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused)
        assert (info.reason, dict(info.metadata)) == ("TOO_MANY_STREAMS", {"limit": "2"})
        # Another user's streams are their own.
        bob = h.idp.token(sub="bob")
        await h.delegate(bob)
        other = follow(h, bob)
        await first(other)
        # A service's too.
        watching = h.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(WATCH_KEY))
        await first(watching)
        second = h.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(WATCH_KEY))
        assert error_info(await refusal(second)).reason == "TOO_MANY_STREAMS"
        # A stream that ends gives its place back.
        held[0].cancel()
        for _ in range(100):
            retry = follow(h, alice)
            try:
                await first(retry)
                break
            except grpc.aio.AioRpcError as error:
                reasons = {error_info(error).reason}
                await asyncio.sleep(0.02)
        else:
            pytest.fail(f"the ended stream's place was never given back: {reasons}")
        for stream in [held[1], retry, other, watching]:
            stream.cancel()


async def test_a_users_agents_share_the_users_stream_budget(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Delegating more sessions buys no more streams: an agent's streams count as its user's
    (before, each agent session had a budget of its own)."""

    async def watch_own_step_ups(token: str) -> Any:
        request = pb.StepUpRequest(action="tickets.read", resource="ticket/1")
        await h.stub.StepUp(request, metadata=bearer(token))  # something to send at once
        return h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(token))

    limits = with_config(server={"max_streams_per_user": 2})
    async with running_harness(tmp_path, idp, clock, mutate=limits) as h:
        agents = [(await h.delegate()).token for _ in range(2)]
        own = follow(h, h.idp.token())
        await first(own)
        watching = await watch_own_step_ups(agents[0])
        await first(watching)
        refused = await refusal(await watch_own_step_ups(agents[1]))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused).reason == "TOO_MANY_STREAMS"
        for stream in (own, watching):
            stream.cancel()


async def test_health_watches_are_capped_for_the_whole_server(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(
        tmp_path, idp, clock, mutate=with_config(server={"max_health_watches": 2})
    ) as h:
        health = health_pb2_grpc.HealthStub(h.channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
        for watch in watches:
            assert (await first(watch)).status == health_pb2.HealthCheckResponse.SERVING
        refused = await refusal(health.Watch(health_pb2.HealthCheckRequest()))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused)
        assert (info.reason, dict(info.metadata)) == ("TOO_MANY_HEALTH_WATCHES", {"limit": "2"})
        check = await health.Check(health_pb2.HealthCheckRequest())  # Check is not a watch
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        for watch in watches:
            watch.cancel()


async def test_connections_and_streams_per_connection_are_bounded(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    limits = with_config(server={"max_connections": 2, "max_streams_per_connection": 2})
    async with running_harness(tmp_path, idp, clock, mutate=limits) as h:
        await h.stub.GetJwks(pb.GetJwksRequest())  # the harness's connection: one
        target = f"127.0.0.1:{h.running.port}"
        async with (
            grpc.aio.insecure_channel(target, options=LOCAL) as second,
            grpc.aio.insecure_channel(target, options=LOCAL) as third,
        ):
            health = health_pb2_grpc.HealthStub(second)
            await health.Check(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(third).Check(health_pb2.HealthCheckRequest())
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # closed at once
            # Two streams at a time on a connection: a third waits (gRPC clients queue it).
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
            for watch in watches:
                await first(watch)
            waiting = health.Watch(health_pb2.HealthCheckRequest(), timeout=0.5)
            assert (await refusal(waiting)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for watch in watches:
                watch.cancel()


async def test_a_revocation_watcher_resumes_after_its_connection_reached_its_age(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ageing = with_config(
        server={"max_connection_age": "500ms", "max_connection_age_grace": "100ms"}
    )
    async with running_harness(tmp_path, idp, clock, mutate=ageing) as h:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{h.running.port}", options=LOCAL)
        watcher = RevocationWatcher(channel, CHECK_KEY, retry_delay=0.05, max_retry_delay=0.2)
        caplog.set_level(logging.INFO, logger="agentid_client")
        watcher.start()
        try:
            await asyncio.wait_for(watcher.wait_for(0), 5)
            for _ in range(200):  # the server closes the stream when the connection is old
                if "revocation watch ended (UNAVAILABLE)" in caplog.text:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the connection was never closed for its age")
            for attempt in range(3):  # the harness's own connection ages too: a call may meet
                try:  # its GOAWAY (UNAVAILABLE); a new session each time, so nothing is doubled
                    session = await h.delegate()
                    done = await h.stub.Revoke(
                        pb.RevokeRequest(session_id=session.session_id),
                        metadata=bearer(ADMIN_KEY),
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                        raise
            await asyncio.wait_for(watcher.wait_for(done.revocation_sequence), 5)
            assert watcher.is_revoked(session.serial)
        finally:
            await watcher.stop()
            await channel.close()


# -- point 5: a stream ends with its credential -------------------------------------------------


async def test_a_users_streams_end_when_their_token_expires(harness: Harness) -> None:
    h = harness
    await h.delegate()
    token = h.idp.token()
    exp = int(jwt.decode(token, options={"verify_signature": False})["exp"])
    h.clock.value = exp + 30 - 1  # a second before exp + the IdP's leeway (30 s)
    audit = follow(h, token)
    await first(audit)
    inbox = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(token))
    for stream in (audit, inbox):
        ended = await refusal(stream)
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(ended).reason == "TOKEN_EXPIRED"


async def test_an_agents_stream_ends_when_its_token_expires(harness: Harness) -> None:
    h = harness
    session = await h.delegate()
    asked = await h.stub.StepUp(
        pb.StepUpRequest(action="tickets.read", resource="t/1"), metadata=bearer(session.token)
    )
    h.clock.value = session.expires_at.seconds - 1
    own = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
    assert (await first(own)).step_up.id == asked.step_up.id
    ended = await refusal(own)
    assert (ended.code(), error_info(ended).reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_EXPIRED",
    )


async def test_an_agents_stream_ends_when_its_session_is_revoked(harness: Harness) -> None:
    h = harness
    session = await h.delegate()
    other = await h.delegate()
    asked = await h.stub.StepUp(
        pb.StepUpRequest(action="tickets.read", resource="t/1"), metadata=bearer(session.token)
    )
    own = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
    assert (await first(own)).step_up.id == asked.step_up.id
    theirs = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(other.token))
    await h.stub.Revoke(pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY))
    ended = await refusal(own)
    assert (ended.code(), error_info(ended).reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_REVOKED",
    )
    again = await h.stub.StepUp(
        pb.StepUpRequest(action="tickets.read", resource="t/2"), metadata=bearer(other.token)
    )
    assert (await first(theirs)).step_up.id == again.step_up.id  # another session's goes on
    theirs.cancel()

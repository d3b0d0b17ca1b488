"""The Python client against a real server: calls, errors, and a revocation watcher in sync."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from agentid_client import (
    AgentIdClient,
    AgentIdError,
    ContextError,
    Decision,
    Reason,
    RevocationWatcher,
    SessionState,
    WatcherNotReady,
    WatcherStopped,
)

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    Mutator,
    make_settings,
    start_harness,
)


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.running.port}"


async def test_delegate_check_revoke(harness: Harness) -> None:
    async with AgentIdClient(target(harness), harness.idp.token()) as user:
        session = await user.delegate(
            "support-bot", ["tickets.read"], ttl=timedelta(minutes=20), task="t"
        )
        with pytest.raises(AgentIdError) as caught:
            await user.delegate("support-bot", ["billing.refund"])
        assert caught.value.reason == "SCOPE_ESCALATION"
        assert caught.value.metadata == {"scopes": "billing.refund"}
    async with AgentIdClient(target(harness), CHECK_KEY) as service:
        allowed = await service.check(session.token, "tickets.read", "ticket/1", context={"n": 1})
        assert (allowed.decision, allowed.reason) == (
            Decision.Value("DECISION_ALLOW"),
            Reason.Value("REASON_GRANTED"),
        )
        assert '"keys"' in await service.jwks()
    async with AgentIdClient(target(harness), session.token) as agent:
        done = await agent.revoke(session_id=session.session_id, reason="task_complete")
    assert list(done.session_ids) == [session.session_id]


async def test_list_sessions_follows_the_pages(harness: Harness) -> None:
    async with AgentIdClient(target(harness), harness.idp.token()) as user:
        made = [await user.delegate("support-bot", ["tickets.read"]) for _ in range(5)]
        listed = [s async for s in user.list_sessions(page_size=2)]
        assert [s.session_id for s in listed] == [m.session_id for m in reversed(made)]
        assert {s.state for s in listed} == {SessionState.Value("SESSION_STATE_ACTIVE")}
        with pytest.raises(AgentIdError) as caught:
            [s async for s in user.list_sessions(user_id="bob")]
        assert caught.value.reason == "NOT_YOUR_SESSIONS"
    async with AgentIdClient(target(harness), ADMIN_KEY) as admin:
        everyone = [s async for s in admin.list_sessions(agent_id="support-bot", page_size=3)]
    assert len(everyone) == 5


def on_port(port: int) -> Mutator:
    """The test config, serving on ``port`` again: the same server restarted, or another one."""

    def mutate(config: dict[str, object]) -> None:
        config["server"] = {"listen": f"127.0.0.1:{port}", "shutdown_grace": "1s", "drain": "0s"}

    return mutate


def restarting_watcher(port: int) -> tuple[grpc.aio.Channel, RevocationWatcher]:
    """A started watcher of the server on ``port``, with short retries: the server goes down for
    a restart, it is not failing (the default backoff would outlast it)."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    watcher = RevocationWatcher(channel, CHECK_KEY, retry_delay=0.05, max_retry_delay=0.2)
    watcher.start()
    return channel, watcher


async def test_watcher_stays_in_sync_across_a_restart(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path, idp)
    h = await start_harness(tmp_path, idp, clock, settings)
    port = h.running.port

    channel, watcher = restarting_watcher(port)
    try:
        sessions = [await h.delegate() for _ in range(4)]
        async with AgentIdClient(target(h), ADMIN_KEY) as admin:
            first = await admin.revoke(session_id=sessions[0].session_id)
            await asyncio.wait_for(watcher.wait_for(first.revocation_sequence), 5)
            assert watcher.is_revoked(sessions[0].serial)
            assert not watcher.is_revoked(sessions[1].serial)
        await h.channel.close()
        await h.running.stop(grace=1)  # the stream ends; the watcher reconnects and resumes
        h = await start_harness(tmp_path, idp, clock, make_settings(tmp_path, idp, on_port(port)))
        # A subchannel of its own: gRPC shares one per address between channels, and the
        # watcher's is in connect backoff from the restart, which would fail this call at once.
        async with grpc.aio.insecure_channel(
            target(h), options=[("grpc.use_local_subchannel_pool", 1)]
        ) as fresh:
            admin = AgentIdClient(target(h), ADMIN_KEY, channel=fresh)
            second = await admin.revoke(session_id=sessions[1].session_id)
        await asyncio.wait_for(watcher.wait_for(second.revocation_sequence), 10)
        assert watcher.is_revoked(sessions[1].serial)
        assert watcher.sequence == 2
        assert not watcher.is_revoked(sessions[2].serial)
    finally:
        await watcher.stop()
        await channel.close()
        await h.channel.close()
        await h.running.stop(grace=1)


async def test_watcher_starts_over_when_the_service_history_ends_before_its_sequence(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A server whose database was restored from an older backup answers OUT_OF_RANGE to the
    watcher's sequence: the watcher takes that server's snapshot instead of retrying forever."""
    h = await start_harness(tmp_path, idp, clock, make_settings(tmp_path, idp))
    port = h.running.port

    channel, watcher = restarting_watcher(port)
    try:
        old = [await h.delegate() for _ in range(2)]
        async with AgentIdClient(target(h), ADMIN_KEY) as admin:
            for session in old:
                done = await admin.revoke(session_id=session.session_id)
        await asyncio.wait_for(watcher.wait_for(done.revocation_sequence), 5)
        assert watcher.sequence == 2
        await h.channel.close()
        await h.running.stop(grace=1)
        older = tmp_path / "restored"  # another database, one revocation long
        older.mkdir()
        h = await start_harness(older, idp, clock, make_settings(older, idp, on_port(port)))
        async with grpc.aio.insecure_channel(
            target(h), options=[("grpc.use_local_subchannel_pool", 1)]
        ) as fresh:
            user = AgentIdClient(target(h), idp.token(), channel=fresh)
            new = await user.delegate("support-bot", ["tickets.read"])
            admin = AgentIdClient(target(h), ADMIN_KEY, channel=fresh)
            assert (await admin.revoke(session_id=new.session_id)).revocation_sequence == 1

        async def resynchronised() -> None:  # polled: its sequence goes down, not up
            while not (watcher.sequence == 1 and set(watcher.revoked) == {new.serial}):  # noqa: ASYNC110
                await asyncio.sleep(0.02)

        await asyncio.wait_for(resynchronised(), 10)
    finally:
        await watcher.stop()
        await channel.close()
        await h.channel.close()
        await h.running.stop(grace=1)


@pytest.mark.parametrize("curve", ["P-256", "Ed25519"])
async def test_a_key_bound_agent_calls_with_its_proof_key(harness: Harness, curve: str) -> None:
    from agentid_server.tokens.jwk import public_jwk, thumbprint
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = (
        ec.generate_private_key(ec.SECP256R1())
        if curve == "P-256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    async with AgentIdClient(target(harness), harness.idp.token()) as user:
        session = await user.delegate(
            "support-bot", ["tickets.read"], jkt=thumbprint(public_jwk(key.public_key()))
        )
    async with AgentIdClient(target(harness), session.token) as thief:
        with pytest.raises(AgentIdError) as caught:
            await thief.step_up("tickets.read", "ticket/1")
        assert caught.value.reason == "PROOF_OF_POSSESSION_FAILED"
    # A gRPC target with a resolver scheme, as deployments write them.
    resolved = f"dns:///{target(harness)}"
    async with AgentIdClient(resolved, session.token, proof_key=key) as agent:
        assert (await agent.step_up("tickets.read", "ticket/1")).id
        mine = [s async for s in agent.watch_step_ups(current_only=True)]
        assert len(mine) == 1
        done = await agent.revoke(session_id=session.session_id, reason="task_complete")
    assert list(done.session_ids) == [session.session_id]


async def test_a_watcher_whose_credential_is_refused_stops_and_answers_no_more(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(target(harness)) as channel:
        watcher = RevocationWatcher(channel, "aid_sk_not-a-key", retry_delay=0.05)
        watcher.start()
        with pytest.raises(WatcherStopped):
            await asyncio.wait_for(watcher.wait_for(1), 5)
        with pytest.raises(WatcherStopped):
            watcher.is_revoked(1)  # never an answer from a set nobody keeps
        await watcher.stop()
    assert "revocation watcher stopped" in caplog.text
    assert "aid_sk_not-a-key" not in caplog.text


async def test_a_watcher_forgets_revocations_whose_tokens_have_expired(
    harness: Harness, clock: FakeClock
) -> None:
    clock.advance(-7200)  # a session the server made two hours ago: its token has expired
    old = await harness.delegate()
    clock.advance(7200)
    live = await harness.delegate()
    async with grpc.aio.insecure_channel(target(harness)) as channel:
        watcher = RevocationWatcher(channel, CHECK_KEY)
        watcher.start()
        try:
            await asyncio.wait_for(watcher.wait_for(0), 5)
            async with AgentIdClient(target(harness), ADMIN_KEY) as admin:
                clock.advance(-7200)  # revoked while it was still live, as the server sees it
                first = await admin.revoke(session_id=old.session_id)
                clock.advance(7200)
                second = await admin.revoke(session_id=live.session_id)
            await asyncio.wait_for(watcher.wait_for(second.revocation_sequence), 5)
            assert first.revocation_sequence < second.revocation_sequence
            assert watcher.is_revoked(live.serial)
            assert not watcher.is_revoked(old.serial)  # its event said it expired long ago
        finally:
            await watcher.stop()


async def test_a_watcher_answers_only_while_it_keeps_the_set(harness: Harness) -> None:
    """No answer before the first snapshot (WatcherNotReady), none after it stopped
    (WatcherStopped): a caller is never told 'not revoked' by a set nobody keeps."""
    session = await harness.delegate()
    async with grpc.aio.insecure_channel(target(harness)) as channel:
        watcher = RevocationWatcher(channel, CHECK_KEY)
        with pytest.raises(WatcherNotReady):
            watcher.is_revoked(session.serial)
        watcher.start()
        await asyncio.wait_for(watcher.wait_for(0), 5)  # the first snapshot
        assert not watcher.is_revoked(session.serial)
        await watcher.stop()
        with pytest.raises(WatcherStopped):
            watcher.is_revoked(session.serial)


async def test_a_watcher_takes_a_snapshot_mid_stream_in_place_of_a_burst(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A mass revocation larger than the server's buffer for one watcher arrives as a fresh
    snapshot mid-stream: the watcher replaces its set and stays on the same stream."""
    settings = make_settings(
        tmp_path, idp, lambda config: config.update(revocation={"watch_buffer": 2})
    )
    h = await start_harness(tmp_path, idp, clock, settings)
    caplog.set_level(logging.INFO, logger="agentid_client")
    try:
        sessions = [await h.delegate() for _ in range(6)]
        async with grpc.aio.insecure_channel(target(h)) as channel:
            watcher = RevocationWatcher(channel, CHECK_KEY)
            watcher.start()
            try:
                await asyncio.wait_for(watcher.wait_for(0), 5)
                async with AgentIdClient(target(h), ADMIN_KEY) as admin:
                    done = await admin.revoke(user_id="alice")
                await asyncio.wait_for(watcher.wait_for(done.revocation_sequence), 5)
                assert all(watcher.is_revoked(s.serial) for s in sessions)
                assert "revocation watch ended" not in caplog.text  # no reconnect was needed
            finally:
                await watcher.stop()
    finally:
        await h.channel.close()
        await h.running.stop(grace=1)


async def test_a_context_a_struct_cannot_carry_is_refused_before_sending(harness: Harness) -> None:
    session = await harness.delegate()
    async with AgentIdClient(target(harness), CHECK_KEY) as service:
        cases: list[tuple[dict[str, object], str]] = [
            ({"amount": float("nan")}, "context.amount: nan"),
            ({"amount": float("inf")}, "context.amount: inf"),
            ({"amount": 2**64}, "context.amount: 18446744073709551616"),
            ({"when": datetime.now(UTC)}, "context.when: a datetime"),
            ({"nested": {"ids": [1, b"x"]}}, "context.nested.ids[1]: a bytes"),
            ({"nested": {1: "x"}}, "context.nested: the key 1"),
        ]
        for context, message in cases:
            with pytest.raises(ContextError, match=re.escape(message)):
                await service.check(session.token, "tickets.read", "ticket/1", context=context)
        fine = {"amount": 2500, "ratio": 0.5, "tags": ["a", None, True], "n": {"m": 2**53}}
        answer = await service.check(session.token, "tickets.read", "ticket/1", context=fine)
    assert answer.decision == Decision.Value("DECISION_ALLOW")

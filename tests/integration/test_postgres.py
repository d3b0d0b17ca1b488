"""The same service on PostgreSQL (asyncpg), two replicas sharing one database: the core loop,
the audit trail with one hash chain per replica (a chain never shared), an approval consumed
exactly once across replicas, revocations reaching the other replica (NOTIFY, polls, on demand
by sequence, in one gap-free order for watchers, after a dropped connection), audit readers
that never page past a record another writer is still committing, followers that see every
replica's records, and a shutdown that a hanging store cannot hold. Runs when AGENTID_TEST_POSTGRES_URL names a database the tests may wipe (`.ci/run`
starts one); skipped otherwise, saying so."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid.v1 import agentid_pb2_grpc
from agentid_server.app import CannotListen
from agentid_server.config import Settings
from agentid_server.domain.audit import AuditQuery
from agentid_server.domain.fanout import Doorbell
from agentid_server.domain.model import ActorKind, AuditEvent, Decision, EventType
from agentid_server.storage import tables
from agentid_server.storage.audit import AuditRepository
from agentid_server.storage.audit_chain import GENESIS, canonical_bytes, link
from agentid_server.storage.database import create_engines
from agentid_server.storage.notify import PeerListener, notify_step_ups
from agentid_server.storage.rows import SEALED_COLUMNS, audit_row
from agentid_server.storage.visibility import _KEY as WINDOW_KEY
from agentid_server.storage.visibility import open_id_window
from agentid_server.storage.writer_lock import WriterInUse
from agentid_server.tokens.jwk import public_jwk, thumbprint
from cryptography.hazmat.primitives.asymmetric import ec
from pyroaring import BitMap
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    error_info,
    free_port,
    make_settings,
    running_harness,
    start_harness,
    struct,
)
from tests.integration.test_key_rotation import kid_of
from tests.integration.test_step_up import (
    RULES,
    agent,
    fresh_user,
    resolve,
    step_up,
    transfer,
)
from tests.security.test_proof_of_possession import proof

URL = os.environ.get("AGENTID_TEST_POSTGRES_URL", "")
POP_URI = "https://tickets.example/read"

pytestmark = pytest.mark.skipif(
    not URL, reason="set AGENTID_TEST_POSTGRES_URL to a database the tests may wipe"
)


async def wipe(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.execute(text("DROP SCHEMA public CASCADE"))
        await connection.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


def replica(tmp_path: Path, idp: IdpFixture, chain: str) -> Settings:
    def mutate(config: dict[str, Any]) -> None:
        config["database"] = {"url": URL}
        config["audit"] = {"chain_id": chain}
        config["risk"] = RULES
        config["agents"][0]["max_scopes"].append("identity.*")

    return make_settings(tmp_path, idp, mutate)


def polling_hourly(tmp_path: Path, idp: IdpFixture, chain: str) -> Settings:
    """A replica that reads the others' changes only when told (polls an hour apart)."""
    settings = replica(tmp_path, idp, chain)
    revocation = dataclasses.replace(settings.revocation, poll_interval=3600.0)
    return dataclasses.replace(settings, revocation=revocation)


@pytest.fixture
async def replicas(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> AsyncIterator[tuple[Harness, Harness]]:
    await wipe(URL)
    async with (
        running_harness(tmp_path, idp, clock, replica(tmp_path, idp, "replica-a")) as a,
        running_harness(tmp_path, idp, clock, replica(tmp_path, idp, "replica-b")) as b,
    ):
        yield a, b


async def audit(h: Harness, **fields: Any) -> list[pb.AuditRecord]:
    stream = h.stub.Audit(pb.AuditRequest(**fields), metadata=bearer(ADMIN_KEY))
    return [response.record async for response in stream]


async def test_the_core_loop_and_the_audit_trail(replicas: tuple[Harness, Harness]) -> None:
    a, b = replicas
    session = await a.delegate(scopes=["tickets.read"])
    assert (await b.check(session.token, "tickets.read", "t/1")).decision == pb.DECISION_ALLOW
    assert (await a.check(session.token, "tickets.delete")).decision == pb.DECISION_DENY
    revoked = await a.stub.Revoke(
        pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
    )
    assert list(revoked.session_ids) == [session.session_id]
    denied = await a.check(session.token, "tickets.read")
    assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)

    records = await audit(b, session_id=session.session_id)
    kinds = [(r.event_type, r.decision) for r in records]
    assert kinds == [
        (pb.EVENT_TYPE_DELEGATE, pb.DECISION_UNSPECIFIED),
        (pb.EVENT_TYPE_CHECK, pb.DECISION_ALLOW),
        (pb.EVENT_TYPE_CHECK, pb.DECISION_DENY),
        (pb.EVENT_TYPE_REVOKE, pb.DECISION_UNSPECIFIED),
        (pb.EVENT_TYPE_CHECK, pb.DECISION_DENY),
    ]
    assert {r.chain_id for r in records} == {"replica-a", "replica-b"}
    assert [r.id for r in records] == sorted(r.id for r in records)
    assert list(records[1].scopes) == ["tickets.read"]
    verified = await a.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
    assert verified.ok
    assert verified.verified == len(await audit(a))


async def test_check_records_keep_every_character_and_their_chain_verifies(
    replicas: tuple[Harness, Harness],
) -> None:
    """Check batches reach PostgreSQL as one JSON parameter (the journal's raw path): what the
    JSON text escapes or spells in several bytes comes back as sent, and the chain verifies."""
    from google.protobuf import struct_pb2

    a, _ = replicas
    session = await a.delegate(scopes=["tickets.read"])
    resources = [
        'r/"quoted"',
        "r/back\\slash\\u0041",
        "r/ünïcödé/日本/😀",
        "r/" + "/".join(["x" * 100] * 4),
    ]
    context = struct_pb2.Struct()
    context.update(
        {"note": 'a "b" \\ c\td\ne \u2028 😀', "amount": 12.5, "n": [1, {"k": "\u00e9"}]}
    )
    first = await a.check(session.token, "tickets.read", "r/first")  # the chain's head known
    assert first.decision == pb.DECISION_ALLOW
    answers = await asyncio.gather(
        *(a.check(session.token, "tickets.read", r, context=context) for r in resources)
    )
    assert {answer.decision for answer in answers} == {pb.DECISION_ALLOW}
    records = await audit(a, session_id=session.session_id)
    by_resource = {r.resource: r for r in records if r.event_type == pb.EVENT_TYPE_CHECK}
    assert set(resources) <= set(by_resource)
    for resource in resources:
        assert by_resource[resource].context == context
    verified = await a.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
    assert verified.ok, verified
    assert verified.verified == len(await audit(a))


async def over_tls(url: str) -> bool:
    """Whether a connection of the server's engine for ``url`` speaks TLS."""
    engines = create_engines(url)
    try:
        async with engines.main.connect() as connection:
            mine = text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            return bool((await connection.execute(mine)).scalar_one())
    finally:
        await engines.dispose()


def skip_unless_on_loopback() -> None:
    """Skips a test unless AGENTID_TEST_POSTGRES_URL is a plain URL of a server on loopback."""
    url = make_url(URL)
    if url.query or url.host not in {"127.0.0.1", "localhost", "::1"}:
        pytest.skip("AGENTID_TEST_POSTGRES_URL is not a plain loopback URL")


async def test_a_replica_talks_plaintext_to_a_postgresql_on_loopback_unless_told_otherwise(
    replicas: tuple[Harness, Harness],
) -> None:
    """asyncpg negotiates TLS with any server that offers it; to one on loopback TLS protects
    nothing and costs the event loop every statement's encryption, so there the replicas'
    connections are plaintext (database.postgres_connect_args). A URL's own ssl= decides."""
    skip_unless_on_loopback()
    a, b = replicas
    session = await a.delegate(scopes=["tickets.read"])
    for replica_ in (a, b):  # the journal's connection, the readers' and the listener's
        answer = await replica_.check(session.token, "tickets.read", "r/1")
        assert answer.decision == pb.DECISION_ALLOW
    probe = create_engines(URL)
    try:
        async with probe.main.connect() as connection:
            offered = (await connection.execute(text("SHOW ssl"))).scalar_one() == "on"
            rows = (
                await connection.execute(
                    text(
                        "SELECT s.ssl FROM pg_stat_activity AS a JOIN pg_stat_ssl AS s"
                        " USING (pid) WHERE a.datname = current_database()"
                        " AND a.backend_type = 'client backend'"
                    )
                )
            ).all()
        assert len(rows) >= 3, rows  # the probe's, and at least the two journals'
        assert not any(row.ssl for row in rows)
    finally:
        await probe.dispose()
    if not offered:
        pytest.skip("this PostgreSQL offers no TLS: the URL's ssl=require cannot be shown")
    assert await over_tls(URL + "?ssl=require")


async def test_on_loopback_the_connection_still_comes_up_where_the_server_insists_on_tls() -> None:
    """Plaintext first on loopback, then TLS if the server refuses plaintext (sslmode "allow"):
    `.ci/postgres` has a role that this server takes over TLS only."""
    skip_unless_on_loopback()
    engines = create_engines(URL)
    try:
        async with engines.main.connect() as connection:
            role = text("SELECT 1 FROM pg_roles WHERE rolname = 'agentid_ci_tls'")
            if (await connection.execute(role)).first() is None:
                pytest.skip("no role agentid_ci_tls here: .ci/postgres creates it")
    finally:
        await engines.dispose()
    tls_only = make_url(URL).set(username="agentid_ci_tls", password="agentid_ci_tls")
    assert await over_tls(tls_only.render_as_string(hide_password=False))


async def test_an_approval_is_consumed_once_across_replicas(
    replicas: tuple[Harness, Harness],
) -> None:
    a, b = replicas
    session = await agent(a)
    pending = await step_up(a, session.token)
    await resolve(b, pending.id)
    responses = await asyncio.gather(
        *(transfer(h, session.token) for _ in range(15) for h in (a, b))
    )
    allowed = [r for r in responses if r.decision == pb.DECISION_ALLOW]
    assert len(allowed) == 1
    assert allowed[0].step_up_id == pending.id
    assert all(r.decision == pb.DECISION_STEP_UP_REQUIRED for r in responses if r is not allowed[0])


async def test_checkpoints_find_a_truncated_chain_and_ids_are_never_reused(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Each replica signs its own chain's head; deleting the tail of one chain is found by the
    stored checkpoint and by one a verifier kept, and the deleted ids are not handed out again
    after a restart (the sequence)."""
    await wipe(URL)
    async with (
        running_harness(tmp_path, idp, clock, replica(tmp_path, idp, "replica-a")) as a,
        running_harness(tmp_path, idp, clock, replica(tmp_path, idp, "replica-b")) as b,
    ):
        session = await a.delegate(scopes=["tickets.read"])
        for h in (a, b, a, b, a):
            await h.check(session.token, "tickets.read")
        await verify_chains(a, checkpoint_now=True)  # a's head signed
        kept = await verify_chains(b, checkpoint_now=True)  # b's too; both come back
        assert [json.loads(c)["chain_id"] for c in kept.checkpoints] == ["replica-a", "replica-b"]
        engine = create_async_engine(URL)
        async with engine.begin() as connection:
            gone = (
                await connection.execute(
                    text(
                        "DELETE FROM audit_records WHERE id IN (SELECT id FROM audit_records"
                        " WHERE chain_id = 'replica-a' ORDER BY id DESC LIMIT 3) RETURNING id"
                    )
                )
            ).scalars()
            top = max(gone)
        result = await verify_chains(b)
        assert (result.ok, result.problem, result.first_bad_id) == (
            False,
            pb.AUDIT_PROBLEM_CHECKPOINT_RECORD_MISSING,
            top,
        )
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM audit_checkpoints"))
        assert (await verify_chains(b)).ok  # the database alone cannot tell any more
        result = await verify_chains(b, *kept.checkpoints)
        assert (result.ok, result.problem) == (False, pb.AUDIT_PROBLEM_CHECKPOINT_RECORD_MISSING)
        await engine.dispose()
    async with running_harness(tmp_path, idp, clock, replica(tmp_path, idp, "replica-a")) as a:
        later = await a.delegate()
        assert (await audit(a, session_id=later.session_id))[0].id > top


async def verify_chains(
    h: Harness, *kept: str, checkpoint_now: bool = False
) -> pb.VerifyAuditResponse:
    request = pb.VerifyAuditRequest(checkpoints=kept, checkpoint_now=checkpoint_now)
    return await h.stub.VerifyAudit(request, metadata=bearer(ADMIN_KEY))


async def test_a_replica_may_not_share_another_ones_chain(
    replicas: tuple[Harness, Harness], idp: IdpFixture, clock: FakeClock
) -> None:
    """Two writers of one chain would fork it: the chain id is locked while its writer lives."""
    a, _ = replicas
    with pytest.raises(WriterInUse, match="replica-a"):
        await start_harness(a.tmp_path, idp, clock, replica(a.tmp_path, idp, "replica-a"))
    session = await a.delegate(scopes=["tickets.read"])
    assert (await a.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    verified = await a.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
    assert verified.ok


async def test_a_hanging_store_does_not_hang_the_shutdown(
    replicas: tuple[Harness, Harness],
) -> None:
    """A PostgreSQL statement waiting on another session's lock never ends by itself: the Check
    is answered UNAVAILABLE (never an unaudited ALLOW) and stop() still returns."""
    a, b = replicas
    session = await a.delegate(scopes=["tickets.read"])
    engine = create_async_engine(URL)
    try:
        async with engine.connect() as dba:  # say, a migration holding the table
            await dba.execute(text("LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE"))
            check = asyncio.ensure_future(a.check(session.token, "tickets.read"))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await a.running.stop(grace=0.5)
            assert time.monotonic() - started < 10  # the append timeout (5 s), then it gives up
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await check
            assert caught.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,  # the grace period ended the call first
            )
            await dba.rollback()
    finally:
        await engine.dispose()
    assert (await b.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def listening(h: Harness) -> None:
    """Until the replica's LISTEN is in place."""
    assert h.running.listener is not None
    await asyncio.wait_for(h.running.listener.listening.wait(), 10)


async def test_a_revocation_on_one_replica_reaches_the_other(
    replicas: tuple[Harness, Harness],
) -> None:
    """Told by NOTIFY: the other replica denies within moments, without any hint."""
    a, b = replicas
    await listening(b)
    session = await a.delegate(scopes=["tickets.read"])
    assert (await b.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    await a.stub.Revoke(pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY))
    for _ in range(100):
        answer = await b.check(session.token, "tickets.read")
        if answer.decision == pb.DECISION_DENY:
            break
        await asyncio.sleep(0.02)
    assert (answer.decision, answer.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)


async def test_min_revocation_sequence_reads_the_other_replicas_revocation_at_once(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """With notifications and polls out of the way (a listener that never hears, a poll once an
    hour), a Check carrying the sequence from RevokeResponse still never allows."""
    await wipe(URL)
    async with (
        running_harness(tmp_path, idp, clock, polling_hourly(tmp_path, idp, "replica-a")) as a,
        running_harness(tmp_path, idp, clock, polling_hourly(tmp_path, idp, "replica-b")) as b,
    ):
        assert b.running.listener is not None
        await b.running.listener.stop()  # hears nothing from now on
        session = await a.delegate(scopes=["tickets.read"])
        revoked = await a.stub.Revoke(
            pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
        )
        answer = await b.check(
            session.token, "tickets.read", min_revocation_sequence=revoked.revocation_sequence
        )
        assert (answer.decision, answer.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)


async def test_watchers_on_every_replica_see_one_gap_free_order(
    replicas: tuple[Harness, Harness],
) -> None:
    """Revocations committed on both replicas reach a watcher of either in sequence order."""
    a, b = replicas
    for h in (a, b):
        await listening(h)
    sessions = [await a.delegate(scopes=["tickets.read"]) for _ in range(6)]
    streams = [
        h.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(ADMIN_KEY))
        for h in (a, b)
    ]
    firsts = [await stream.read() for stream in streams]  # the snapshots
    assert [f.snapshot.count for f in firsts] == [0, 0]

    async def revoke(h: Harness, session: pb.DelegateResponse) -> None:
        await h.stub.Revoke(
            pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
        )

    await asyncio.gather(*(revoke((a, b)[n % 2], s) for n, s in enumerate(sessions)))
    for stream in streams:
        events = [(await asyncio.wait_for(stream.read(), 10)).event for _ in sessions]
        assert [e.sequence for e in events] == [1, 2, 3, 4, 5, 6]
        assert {e.session_id for e in events} == {s.session_id for s in sessions}
        stream.cancel()


async def test_a_replica_whose_listening_connection_drops_listens_again(
    replicas: tuple[Harness, Harness],
) -> None:
    a, b = replicas
    await listening(b)
    engine = create_async_engine(URL)
    listeners = text(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        " AND datname = current_database()"  # not another database's servers on this cluster
    )
    try:
        async with engine.connect() as dba:
            before = {row[0] for row in await dba.execute(listeners)}
            assert len(before) == 2  # one listener per replica
            for pid in before:
                await dba.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            session = await a.delegate(scopes=["tickets.read"])
            await a.stub.Revoke(
                pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
            )
            for _ in range(250):  # the next poll (1 s) reads it
                answer = await b.check(session.token, "tickets.read")
                if answer.decision == pb.DECISION_DENY:
                    break
                await asyncio.sleep(0.02)
            assert (answer.decision, answer.reason) == (
                pb.DECISION_DENY,
                pb.REASON_SESSION_REVOKED,
            )
            for _ in range(250):  # and both listen again, on new connections
                after = {row[0] for row in await dba.execute(listeners)}
                await dba.rollback()
                if len(after) == 2 and not after & before:
                    break
                await asyncio.sleep(0.02)
            assert len(after) == 2
            assert not after & before
    finally:
        await engine.dispose()


async def test_step_up_changes_reach_watchers_on_the_other_replica(
    replicas: tuple[Harness, Harness],
) -> None:
    """The agent waits on one replica, its user answers through another: both streams hear of
    every change, each exactly once."""
    a, b = replicas
    for h in (a, b):
        await listening(h)
    session = await agent(a)
    agent_stream = b.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
    inbox = a.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(fresh_user(a)))
    pending = await step_up(b, session.token)  # requested on b: a's inbox hears of it

    async def next_state(stream: Any) -> tuple[str, int]:
        item = await asyncio.wait_for(stream.read(), 10)
        return item.step_up.id, item.step_up.state

    assert await next_state(inbox) == (pending.id, pb.STEP_UP_STATE_PENDING)
    assert await next_state(agent_stream) == (pending.id, pb.STEP_UP_STATE_PENDING)
    await resolve(a, pending.id)  # approved on a: the agent's stream on b hears of it
    assert await next_state(agent_stream) == (pending.id, pb.STEP_UP_STATE_APPROVED)
    assert (await transfer(a, session.token)).decision == pb.DECISION_ALLOW  # consumed on a
    assert await next_state(agent_stream) == (pending.id, pb.STEP_UP_STATE_CONSUMED)
    with pytest.raises(TimeoutError):  # and nothing twice
        await asyncio.wait_for(agent_stream.read(), 0.5)
    agent_stream.cancel()
    inbox.cancel()


async def test_a_refused_revoke_writes_nothing_and_takes_no_sequence(
    replicas: tuple[Harness, Harness],
) -> None:
    """Refused in its transaction (a job alone in its batch: rolled back whole, no savepoint):
    nothing written, the store healthy, and the next Revoke takes the next sequence."""
    a, _ = replicas
    session = await a.delegate(scopes=["tickets.read"])
    for credential, target, reason in (
        (ADMIN_KEY, "ses_" + "0" * 26, "SESSION_NOT_FOUND"),
        (a.idp.token(sub="bob"), session.session_id, "NOT_YOUR_SESSION"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await a.stub.Revoke(pb.RevokeRequest(session_id=target), metadata=bearer(credential))
        assert error_info(caught.value).reason == reason
    assert a.running.journal.healthy
    revoked = await a.stub.Revoke(
        pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
    )
    assert revoked.revocation_sequence == 1
    assert [r.event_type for r in await audit(a, session_id=session.session_id)] == [
        pb.EVENT_TYPE_DELEGATE,
        pb.EVENT_TYPE_REVOKE,
    ]


async def test_a_revoke_expires_the_sessions_step_ups_and_every_replica_hears_of_it(
    replicas: tuple[Harness, Harness],
) -> None:
    """The revoke job's one statement (revoke_job.py) expires the session's pending and
    approved step-ups with the revocation; the user's inbox on the other replica hears of both."""
    a, b = replicas
    for h in (a, b):
        await listening(h)
    session = await agent(a)
    inbox = a.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(fresh_user(a)))

    async def next_state() -> tuple[str, int]:
        item = await asyncio.wait_for(inbox.read(), 10)
        return item.step_up.id, item.step_up.state

    pending = await step_up(a, session.token)
    approved = await step_up(a, session.token, resource="account/9")
    await resolve(a, approved.id)
    assert [await next_state() for _ in range(3)] == [
        (pending.id, pb.STEP_UP_STATE_PENDING),
        (approved.id, pb.STEP_UP_STATE_PENDING),
        (approved.id, pb.STEP_UP_STATE_APPROVED),
    ]
    revoked = await b.stub.Revoke(
        pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
    )
    assert list(revoked.session_ids) == [session.session_id]
    assert {await next_state() for _ in range(2)} == {
        (pending.id, pb.STEP_UP_STATE_EXPIRED),
        (approved.id, pb.STEP_UP_STATE_EXPIRED),
    }
    inbox.cancel()
    engine = create_async_engine(URL)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT id, state FROM step_ups"))
            assert dict(rows.all()) == {
                pending.id: pb.STEP_UP_STATE_EXPIRED,
                approved.id: pb.STEP_UP_STATE_EXPIRED,
            }
            sequences = await connection.execute(text("SELECT sequence FROM revocations"))
            assert list(sequences.scalars()) == [revoked.revocation_sequence]
    finally:
        await engine.dispose()


async def test_a_cursor_never_steps_past_a_record_another_writer_is_still_committing(
    replicas: tuple[Harness, Harness],
) -> None:
    """A writer takes its record's id, then another replica commits higher ids first. A reader
    waits for the lower id's commit instead of paging past it, and the chains verify meanwhile."""
    a, b = replicas
    engine = create_async_engine(URL)
    try:
        async with engine.connect() as writer:  # a third writer, in the middle of its commit
            await writer.run_sync(open_id_window)
            slow_id = (
                await writer.execute(text("SELECT nextval('audit_records_id_seq')"))
            ).scalar()
            event = AuditEvent(
                time=time.time(),
                event_type=EventType.CHECK,
                actor_kind=ActorKind.SERVICE,
                actor_id="payments-api",
                session_id="ses_slow",
                user_id="alice",
                scopes=("tickets.read",),
                agent_id="support-bot",
                action="tickets.read",
                decision=Decision.ALLOW,
            )
            row = audit_row(event)
            digest = link(GENESIS, canonical_bytes(slow_id, "slow-writer", row))
            sealed = (slow_id, *row, "slow-writer", GENESIS, digest)
            await writer.execute(
                tables.audit_records.insert(), dict(zip(SEALED_COLUMNS, sealed, strict=True))
            )
            session = await b.delegate(scopes=["tickets.read"])  # committed after slow_id
            await b.check(session.token, "tickets.read")
            reading = asyncio.ensure_future(audit(a))
            verifying = asyncio.ensure_future(
                a.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
            )
            await asyncio.sleep(0.3)
            assert not reading.done()  # waiting for slow_id
            assert not verifying.done()
            await writer.commit()
        records = await reading
        ids = [r.id for r in records]
        assert slow_id in ids
        assert ids == sorted(ids)
        assert ids.index(slow_id) < ids.index(max(ids))
        verified = await verifying
        assert verified.ok
        assert verified.verified == len(ids)
    finally:
        await engine.dispose()


async def test_a_check_takes_its_record_id_only_inside_the_id_window(
    replicas: tuple[Harness, Harness],
) -> None:
    """The Check path's batches (straight through asyncpg once the chain's head is known) take
    their ids under the window's shared lock: while a reader holds it exclusively, reading the
    horizon, no id is taken and the Check waits; it is answered once the reader lets go."""
    a, _ = replicas
    session = await a.delegate(scopes=["tickets.read"])
    await a.check(session.token, "tickets.read")  # the head is loaded: Checks take the fast path
    engine = create_async_engine(URL)
    try:
        async with engine.connect() as reader:
            await reader.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WINDOW_KEY})
            last = text("SELECT last_value FROM audit_records_id_seq")
            horizon = (await reader.execute(last)).scalar()
            checking = asyncio.ensure_future(a.check(session.token, "tickets.read"))
            await asyncio.sleep(0.3)
            assert not checking.done()
            assert (await reader.execute(last)).scalar() == horizon  # no id taken meanwhile
            await reader.rollback()
        answer = await checking
        assert answer.decision == pb.DECISION_ALLOW
        async with engine.connect() as after:
            assert (await after.execute(last)).scalar() > horizon  # taken once let in
        verified = await a.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
        assert verified.ok
    finally:
        await engine.dispose()


async def test_a_check_batch_holds_the_id_window_until_its_records_are_committed(
    replicas: tuple[Harness, Harness],
) -> None:
    """The Check path holds the window's lock at session level from its ids to after its
    commit: a reader asking for the window meanwhile gets it only then, with a horizon that
    covers the Check's record, which it can read; and an idle writer holds nothing."""
    a, _ = replicas
    session = await a.delegate(scopes=["tickets.read"])
    await a.check(session.token, "tickets.read")  # the head is loaded: Checks take the fast path
    engine = create_async_engine(URL)
    try:
        for _ in range(20):
            checking = asyncio.ensure_future(a.check(session.token, "tickets.read", "t/w"))
            async with engine.connect() as reader:
                await reader.execute(text("SET lock_timeout = '5s'"))  # idle: never held long
                await reader.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": WINDOW_KEY}
                )
                horizon = (
                    await reader.execute(text("SELECT last_value FROM audit_records_id_seq"))
                ).scalar()
                taken = (
                    await reader.execute(
                        text("SELECT count(*) FROM audit_records WHERE id <= :h"), {"h": horizon}
                    )
                ).scalar()
                await reader.rollback()
            answer = await checking
            assert answer.decision == pb.DECISION_ALLOW
            async with engine.connect() as after:
                written = (
                    await after.execute(
                        text("SELECT count(*) FROM audit_records WHERE id <= :h"), {"h": horizon}
                    )
                ).scalar()
                assert taken == written  # nothing under the horizon arrived after it was read
        verified = await a.stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=bearer(ADMIN_KEY))
        assert verified.ok
    finally:
        await engine.dispose()


async def test_a_follower_on_one_replica_sees_what_the_other_commits(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Told by NOTIFY (the polls are an hour apart): a follow stream on replica a gets the
    records replica b commits, its sub-agents' too, in id order."""
    await wipe(URL)
    async with (
        running_harness(tmp_path, idp, clock, polling_hourly(tmp_path, idp, "replica-a")) as a,
        running_harness(tmp_path, idp, clock, polling_hourly(tmp_path, idp, "replica-b")) as b,
    ):
        await listening(a)
        root = await a.delegate(scopes=["tickets.read", "agentid.delegate"])
        stream = a.stub.Audit(
            pb.AuditRequest(session_id=root.session_id, include_descendants=True, follow=True),
            metadata=bearer(ADMIN_KEY),
        )

        async def next_record() -> pb.AuditRecord:
            response = await asyncio.wait_for(stream.read(), 10)
            return response.record

        backlog = await next_record()
        assert (backlog.event_type, backlog.chain_id) == (pb.EVENT_TYPE_DELEGATE, "replica-a")
        await b.check(root.token, "tickets.read", "t/1")
        child = await b.sub_delegate(root.token)
        await b.check(child.token, "tickets.read", "t/2")
        live = [await next_record() for _ in range(3)]
        assert [(r.event_type, r.session_id, r.chain_id) for r in live] == [
            (pb.EVENT_TYPE_CHECK, root.session_id, "replica-b"),
            (pb.EVENT_TYPE_DELEGATE, child.session_id, "replica-b"),
            (pb.EVENT_TYPE_CHECK, child.session_id, "replica-b"),
        ]
        assert [r.id for r in live] == sorted(r.id for r in live)
        await a.check(root.token, "tickets.read", "t/3")  # and its own, as before
        own = await next_record()
        assert (own.resource, own.chain_id) == ("t/3", "replica-a")
        stream.cancel()


async def test_a_read_stuck_behind_a_hanging_writer_is_unavailable(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A writer that took ids and never commits holds readers only for database.busy_timeout:
    then UNAVAILABLE, never an answer with a hole in it. Its rollback frees them."""
    await wipe(URL)
    settings = replica(tmp_path, idp, "replica-a")
    settings = dataclasses.replace(
        settings, database=dataclasses.replace(settings.database, busy_timeout=0.3)
    )
    engine = create_async_engine(URL)
    try:
        async with running_harness(tmp_path, idp, clock, settings) as a:
            await a.delegate(scopes=["tickets.read"])
            async with engine.connect() as writer:
                await writer.run_sync(open_id_window)
                await writer.execute(text("SELECT nextval('audit_records_id_seq')"))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await audit(a)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_info(caught.value).reason == "AUDIT_UNAVAILABLE"
                await writer.rollback()
            records = await audit(a)  # the config's agents (at the start), then the Delegate
            assert [r.event_type for r in records if r.session_id] == [pb.EVENT_TYPE_DELEGATE]
    finally:
        await engine.dispose()


async def test_step_up_news_survives_a_failed_read() -> None:
    """Another replica's step-up ids are kept until they were read and handed on: a read that
    fails (the database gone for a moment) is tried again on the next connection."""
    await wipe(URL)
    engine = create_async_engine(URL)
    handed: list[list[str]] = []
    failures = 1

    async def on_step_ups(ids: list[str]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("the database went away")
        handed.append(ids)

    async def nothing() -> None:
        return None

    listener = PeerListener(
        engine,
        on_revocations=nothing,
        on_step_ups=on_step_ups,
        own_pid=lambda: None,
        poll_interval=3600.0,
    )
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        async with engine.connect() as other:
            await other.run_sync(lambda c: notify_step_ups(c, ["stp_a", "stp_b"]))
            await other.commit()
        for _ in range(250):  # the reconnect waits RECONNECT_DELAY (1 s)
            if handed:
                break
            await asyncio.sleep(0.02)
        assert handed == [["stp_a", "stp_b"]]
    finally:
        await listener.stop()
        await engine.dispose()


async def test_a_replica_listens_for_audit_records_only_while_it_has_followers() -> None:
    """Every audit batch of every replica notifies: a replica hears them only while its audit
    bell has listeners, and rings it once the LISTEN is in place (a record committed before was
    not heard of). Followers coming and going cost no catch-up read."""
    await wipe(URL)
    engine = create_async_engine(URL)
    catch_ups = 0

    async def catch_up() -> None:
        nonlocal catch_ups
        catch_ups += 1

    async def nothing(_ids: list[str]) -> None:
        return None

    async def until(condition: Any) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not in time")

    async def notify_audit() -> None:
        async with engine.connect() as other:
            await other.execute(text("SELECT pg_notify('agentid_audit', '')"))
            await other.commit()

    bell = Doorbell()
    listener = PeerListener(
        engine,
        on_revocations=catch_up,
        on_step_ups=nothing,
        own_pid=lambda: None,
        poll_interval=3600.0,
        audit_bell=bell,
    )
    listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        await until(lambda: catch_ups == 1)
        assert not listener.hearing_audit
        for _ in range(2):
            with bell.listening() as rung:
                await until(lambda: listener.hearing_audit)
                await asyncio.wait_for(rung.wait(), 5)  # rung once listening
                rung.clear()
                await notify_audit()
                await asyncio.wait_for(rung.wait(), 5)
            await until(lambda: not listener.hearing_audit)
        await notify_audit()  # heard by nobody; the revocations' catch-up did not run again
        await asyncio.sleep(0.1)
        assert catch_ups == 1
    finally:
        await listener.stop()
        await engine.dispose()


async def test_a_callers_proof_is_spent_in_the_store_only_by_a_call_it_may_make(
    replicas: tuple[Harness, Harness],
) -> None:
    """A key-bound agent calling what the method policy refuses (Check) leaves no spent proof,
    in memory or in the store: the same proof is refused the same way on either replica, never
    as a replay. A call it may make (StepUp) spends its proof for every replica."""
    a, b = replicas
    key = ec.generate_private_key(ec.SECP256R1())
    session = await a.delegate(
        scopes=["tickets.read"], jkt=thumbprint(public_jwk(key.public_key()))
    )

    async def spent() -> int:
        engine = create_async_engine(URL)
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT count(*) FROM spent_proofs"))).scalar()
        await engine.dispose()
        return int(rows or 0)

    pop = proof(key, session.token, htu="/agentid.v1.AgentIdentityService/Check")
    metadata = (*bearer(session.token), ("dpop", pop))
    for h in (a, b, a):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.stub.Check(
                pb.CheckRequest(token=session.token, action="tickets.read"), metadata=metadata
            )
        assert error_info(caught.value).reason == "CALLER_NOT_ALLOWED"
    assert await spent() == 0
    step_up = pb.StepUpRequest(action="tickets.read", resource="ticket/1")
    metadata = (
        *bearer(session.token),
        ("dpop", proof(key, session.token, htu="/agentid.v1.AgentIdentityService/StepUp")),
    )
    assert (await a.stub.StepUp(step_up, metadata=metadata)).step_up.id
    assert await spent() == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await b.stub.StepUp(step_up, metadata=metadata)
    assert error_info(caught.value).reason == "PROOF_OF_POSSESSION_FAILED"


async def test_a_proof_one_replica_accepted_is_refused_by_the_other(
    replicas: tuple[Harness, Harness],
) -> None:
    """A DPoP proof replayed to another replica (each remembers in memory only what it saw) is
    refused there: spent in the store with the first decision, in the same commit."""
    a, b = replicas
    key = ec.generate_private_key(ec.SECP256R1())
    session = await a.delegate(
        scopes=["tickets.read"], jkt=thumbprint(public_jwk(key.public_key()))
    )

    async def check(h: Harness, pop: str) -> pb.CheckResponse:
        return await h.check(
            session.token, "tickets.read", pop_proof=pop, pop_method="POST", pop_uri=POP_URI
        )

    captured = proof(key, session.token, htu=POP_URI)
    assert (await check(a, captured)).decision == pb.DECISION_ALLOW
    replayed = await check(b, captured)
    assert (replayed.decision, replayed.reason) == (
        pb.DECISION_DENY,
        pb.REASON_PROOF_OF_POSSESSION_FAILED,
    )
    assert replayed.matched_scope == ""
    assert (await check(b, proof(key, session.token, htu=POP_URI))).decision == pb.DECISION_ALLOW
    decisions = [
        (r.decision, r.reason)
        for r in await audit(a, session_id=session.session_id)
        if r.event_type == pb.EVENT_TYPE_CHECK
    ]
    assert decisions == [
        (pb.DECISION_ALLOW, pb.REASON_GRANTED),
        (pb.DECISION_DENY, pb.REASON_PROOF_OF_POSSESSION_FAILED),
        (pb.DECISION_ALLOW, pb.REASON_GRANTED),
    ]

    # A risky action (its step-up settled in a transaction of its own) spends the proof first.
    risky = await a.delegate(
        scopes=["payments.transfer"], jkt=thumbprint(public_jwk(key.public_key()))
    )
    big = proof(key, risky.token, htu=POP_URI)

    async def transfer(h: Harness) -> pb.CheckResponse:
        return await h.check(
            risky.token, "payments.transfer", "account/42", pop_proof=big, pop_method="POST",
            pop_uri=POP_URI, context=struct({"amount": 5000}),
        )  # fmt: skip

    assert (await transfer(a)).decision == pb.DECISION_STEP_UP_REQUIRED
    again = await transfer(b)
    assert (again.decision, again.reason, again.risk_rule) == (
        pb.DECISION_DENY,
        pb.REASON_PROOF_OF_POSSESSION_FAILED,
        "",
    )

    # The same for the agent's own calls: a proof for WatchStepUps, replayed to the other replica.
    def listing(pop: str) -> Any:
        return (*bearer(session.token), ("dpop", pop))

    method = "https://agentid.example/agentid.v1.AgentIdentityService/WatchStepUps"
    used = proof(key, session.token, htu=method)
    request = pb.WatchStepUpsRequest(current_only=True)
    assert [r async for r in a.stub.WatchStepUps(request, metadata=listing(used))] == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [r async for r in b.stub.WatchStepUps(request, metadata=listing(used))]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "PROOF_OF_POSSESSION_FAILED"


async def test_processes_of_one_host_share_an_address_with_reuse_port(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """SO_REUSEPORT: two processes' servers (each its own chain) on one address, the kernel
    spreading connections over them; without it, the second stops at start."""
    await wipe(URL)
    address = f"127.0.0.1:{free_port()}"

    def on_the_address(chain: str, reuse_port: bool) -> Settings:
        settings = replica(tmp_path, idp, chain)
        server = dataclasses.replace(settings.server, listen=address, reuse_port=reuse_port)
        return dataclasses.replace(settings, server=server)

    async with (
        running_harness(tmp_path, idp, clock, on_the_address("host-1", True)) as a,
        running_harness(tmp_path, idp, clock, on_the_address("host-2", True)) as b,
    ):
        assert a.running.port == b.running.port
        session = await a.delegate(scopes=["tickets.read"])
        for _ in range(24):  # new connections, spread by the kernel (all on one: p = 2^-23)
            async with grpc.aio.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)
                answer = await stub.Check(
                    pb.CheckRequest(token=session.token, action="tickets.read"),
                    metadata=bearer(CHECK_KEY),
                )
                assert answer.decision == pb.DECISION_ALLOW
        checks = [
            r
            for r in await audit(a, session_id=session.session_id)
            if r.event_type == pb.EVENT_TYPE_CHECK
        ]
        assert len(checks) == 24
        assert {r.chain_id for r in checks} == {"host-1", "host-2"}  # both served
        with pytest.raises(CannotListen):
            await start_harness(tmp_path, idp, clock, on_the_address("host-3", False))


async def test_reads_while_the_database_is_unreachable_are_unavailable(
    replicas: tuple[Harness, Harness],
) -> None:
    """Not INTERNAL: a read that cannot reach the database is UNAVAILABLE / STORE_UNAVAILABLE,
    and reads work again once it is back."""
    a, _ = replicas
    user = fresh_user(a)
    database = URL.rsplit("/", 1)[1]
    admin = create_async_engine(URL.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    closed = text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
    others = text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = :db AND pid <> pg_backend_pid()"
    )
    request = pb.WatchStepUpsRequest(current_only=True)
    try:
        async with admin.connect() as dba:
            await dba.execute(closed)
            await dba.execute(others, {"db": database})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [r async for r in a.stub.WatchStepUps(request, metadata=bearer(user))]
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "STORE_UNAVAILABLE"
    finally:
        async with admin.connect() as dba:
            await dba.execute(text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true'))
        await admin.dispose()
    assert [r async for r in a.stub.WatchStepUps(request, metadata=bearer(user))] == []


async def test_the_session_question_uses_its_indexes_even_in_a_generic_plan(
    replicas: tuple[Harness, Harness],
) -> None:
    """The question "what did session S do" goes through its two indexes, also in the generic
    plan PostgreSQL uses for a prepared statement it has run a few times: the delegation index
    is partial (DELEGATE records only), which a generic plan may use only because the query
    names event_type 1 as a literal (as a bind parameter, the plan walks every id above the
    cursor)."""
    statement = AuditRepository.statement(AuditQuery(session_ids=("ses_x",)), None)
    compiled = statement.compile(
        dialect=asyncpg_dialect.dialect(), compile_kwargs={"render_postcompile": True}
    )
    arguments = ", ".join(
        repr(value) if isinstance(value, str) else str(value)
        for value in (compiled.params[name] for name in compiled.positiontup or ())
    )
    engine = create_async_engine(URL)
    try:
        raw = await engine.raw_connection()
        try:
            connection = raw.driver_connection
            assert connection is not None
            await connection.execute("SET plan_cache_mode = force_generic_plan")
            await connection.execute("SET enable_seqscan = off")  # the table is nearly empty
            await connection.execute(f"PREPARE session_question AS {compiled}")
            rows = await connection.fetch(f"EXPLAIN EXECUTE session_question({arguments})")
        finally:
            raw.close()
    finally:
        await engine.dispose()
    plan = "\n".join(row[0] for row in rows)
    assert "$1" in plan  # the generic plan, parameters unknown
    assert "ix_audit_session" in plan
    assert "ix_audit_parent" in plan


async def test_signing_keys_rotate_once_for_every_replica(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Both replicas find the rotation due at the same moment: one publishes the next key, the
    other reads it, and from its time both sign with it and verify each other's tokens."""
    await wipe(URL)

    def rotating(chain: str) -> Settings:
        settings = replica(tmp_path, idp, chain)
        tokens = dataclasses.replace(settings.tokens, rotation_period=600.0, publish_ahead=60.0)
        revocation = dataclasses.replace(settings.revocation, prune_interval=0.02)
        return dataclasses.replace(settings, tokens=tokens, revocation=revocation)

    async def kids(h: Harness) -> list[str]:
        jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
        return [key["kid"] for key in jwks["keys"]]

    async with (
        running_harness(tmp_path, idp, clock, rotating("replica-a")) as a,
        running_harness(tmp_path, idp, clock, rotating("replica-b")) as b,
    ):
        [first] = await kids(a)
        assert await kids(b) == [first]  # b found a's key at its start
        clock.advance(541)
        for _ in range(200):
            if len(await kids(a)) == len(await kids(b)) == 2:
                break
            await asyncio.sleep(0.02)
        assert await kids(a) == await kids(b)  # the same next key on both: one rotation
        [rotated] = await audit(a, event_types=[pb.EVENT_TYPE_KEY_ROTATED])
        clock.advance(60)
        on_a, on_b = await a.delegate(), await b.delegate()
        [new, _] = await kids(a)
        assert kid_of(on_a.token) == kid_of(on_b.token) == new != first
        assert rotated.detail.startswith(f"{first} -> {new} at ")
        for h, token in ((a, on_b.token), (b, on_a.token)):
            assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_a_sub_agent_delegated_on_one_replica_never_outlives_a_parent_revoked_on_the_other(
    replicas: tuple[Harness, Harness],
) -> None:
    """The Delegate's transaction holds its lineage FOR SHARE, the Revoke's holds its target FOR
    UPDATE before reading the subtree: whichever commits first, the child is refused or revoked."""
    a, b = replicas
    for _ in range(10):
        parent = await a.delegate(scopes=["tickets.read", "agentid.delegate"])
        *children, revoked = await asyncio.gather(
            *(b.sub_delegate(parent.token) for _ in range(5)),
            a.stub.Revoke(
                pb.RevokeRequest(session_id=parent.session_id), metadata=bearer(ADMIN_KEY)
            ),
            return_exceptions=True,
        )
        assert isinstance(revoked, pb.RevokeResponse)
        for delegated in children:
            if isinstance(delegated, grpc.aio.AioRpcError):
                assert error_info(delegated).reason == "SESSION_REVOKED"
                continue
            assert isinstance(delegated, pb.DelegateResponse)
            assert delegated.session_id in revoked.session_ids  # written first: revoked too


async def test_a_job_whose_data_postgresql_refuses_fails_alone(
    replicas: tuple[Harness, Harness],
) -> None:
    """PostgreSQL's text refuses NUL. Requests are checked for it (INVALID_ARGUMENT), and should
    a write job still carry some, only that job fails: the Checks in its group commit are
    answered, and the store stays healthy."""
    a, _ = replicas
    session = await a.delegate()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await a.stub.Revoke(
            pb.RevokeRequest(session_id=session.session_id, reason="done\x00"),
            metadata=bearer(session.token),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def bad_job(connection: Any) -> Any:
        connection.execute(tables.counters.insert().values(name="nul\x00name", value=0))
        raise AssertionError("PostgreSQL took a NUL")

    results = await asyncio.gather(
        a.running.journal.run(bad_job),
        *(a.check(session.token, "tickets.read") for _ in range(30)),
        return_exceptions=True,
    )
    assert isinstance(results[0], DBAPIError)  # INTERNAL for its caller
    assert all(r.decision == pb.DECISION_ALLOW for r in results[1:])  # type: ignore[union-attr]
    assert a.running.journal.healthy


async def test_a_follower_with_a_limit_gets_the_newest_of_the_backlog_then_everything_new(
    replicas: tuple[Harness, Harness],
) -> None:
    a, b = replicas
    session = await a.delegate()
    decided = [int((await a.check(session.token, "tickets.read")).decision_id) for _ in range(6)]
    stream = b.stub.Audit(
        pb.AuditRequest(session_id=session.session_id, follow=True, limit=2),
        metadata=bearer(ADMIN_KEY),
    )
    backlog = [(await asyncio.wait_for(stream.read(), 5)).record.id for _ in range(2)]
    assert backlog == decided[-2:]
    later = [int((await a.check(session.token, "tickets.read")).decision_id) for _ in range(3)]
    assert [(await asyncio.wait_for(stream.read(), 10)).record.id for _ in range(3)] == later
    stream.cancel()


async def test_revokes_and_sub_delegations_on_both_replicas_never_deadlock(
    replicas: tuple[Harness, Harness],
) -> None:
    """Group commits that revoke and delegate under parents, on both replicas at once, with each
    replica delegating under what the other revokes: their batches take one advisory lock first,
    so PostgreSQL never finds a deadlock (which would fail whole batches, Checks and all)."""
    a, b = replicas
    refused: dict[tuple[str, str], int] = {}
    for _ in range(3):
        parents = await asyncio.gather(
            *(a.delegate(scopes=["tickets.read", "agentid.delegate"]) for _ in range(30))
        )
        calls: list[Any] = []
        for i, parent in enumerate(parents):
            here = a if i % 2 else b
            calls.append(
                here.stub.Revoke(
                    pb.RevokeRequest(session_id=parent.session_id), metadata=bearer(ADMIN_KEY)
                )
            )
            calls.append(here.sub_delegate(parents[(i + 1) % len(parents)].token))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, grpc.aio.AioRpcError):
                key = (result.code().name, error_info(result).reason)
                refused[key] = refused.get(key, 0) + 1
    assert set(refused) <= {("UNAUTHENTICATED", "SESSION_REVOKED")}, refused
    assert a.running.journal.healthy
    assert b.running.journal.healthy


def bounded(tmp_path: Path, idp: IdpFixture, chain: str) -> Settings:
    """A replica writing Revokes three sessions a transaction, buffering two events a watcher,
    and one stream per user."""
    settings = replica(tmp_path, idp, chain)
    revocation = dataclasses.replace(settings.revocation, watch_buffer=2, revoke_slice=3)
    server = dataclasses.replace(settings.server, max_streams_per_user=1)
    return dataclasses.replace(settings, revocation=revocation, server=server)


async def test_a_mass_revoke_in_slices_leaves_every_replicas_watchers_connected_and_in_sync(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Revoke(user_id) of more sessions than a watcher's buffer: on the replica that wrote it and
    on the one that read it from the store, the watcher stays connected and its set, snapshots
    and events assembled, equals the database's; a user's follow streams are capped there too."""
    await wipe(URL)
    async with (
        running_harness(tmp_path, idp, clock, bounded(tmp_path, idp, "replica-a")) as a,
        running_harness(tmp_path, idp, clock, bounded(tmp_path, idp, "replica-b")) as b,
    ):
        for h in (a, b):
            await listening(h)
        serials = {(await a.delegate(scopes=["tickets.read"])).serial for _ in range(8)}
        streams = [
            h.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(ADMIN_KEY))
            for h in (a, b)
        ]
        for stream in streams:
            assert (await asyncio.wait_for(stream.read(), 10)).HasField("snapshot")
        done = await a.stub.Revoke(pb.RevokeRequest(user_id="alice"), metadata=bearer(ADMIN_KEY))
        assert (len(done.session_ids), done.revocation_sequence) == (8, 8)
        engine = create_async_engine(URL)
        async with engine.connect() as connection:
            stored = {r.serial for r in await connection.execute(tables.revocations.select())}
        await engine.dispose()
        assert stored == serials
        for stream in streams:
            revoked: set[int] = set()
            sequence = 0
            while sequence < done.revocation_sequence:
                item = await asyncio.wait_for(stream.read(), 10)
                if item.HasField("snapshot"):
                    revoked = set(BitMap.deserialize(item.snapshot.revoked_serials))
                    sequence = item.snapshot.sequence
                else:
                    assert item.event.sequence == sequence + 1
                    revoked.add(item.event.serial)
                    sequence = item.event.sequence
            assert revoked == stored
        late = await b.delegate(scopes=["tickets.read"])
        await b.stub.Revoke(
            pb.RevokeRequest(session_id=late.session_id), metadata=bearer(ADMIN_KEY)
        )
        for stream in streams:  # the same streams, still connected
            event = (await asyncio.wait_for(stream.read(), 10)).event
            assert (event.sequence, event.serial) == (9, late.serial)
            stream.cancel()
        # A follower reads from the store here (no buffer): the per-user cap bounds them too.
        user = idp.token()
        held = a.stub.Audit(pb.AuditRequest(follow=True), metadata=bearer(user))
        await asyncio.wait_for(held.read(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await a.stub.Audit(pb.AuditRequest(follow=True), metadata=bearer(user)).read()
        assert error_info(caught.value).reason == "TOO_MANY_STREAMS"
        held.cancel()


async def test_a_hanging_store_turns_health_not_serving_without_waiting_for_it(
    replicas: tuple[Harness, Harness],
) -> None:
    """A statement waiting on another session's lock has no end of its own: health turns
    NOT_SERVING within database.unhealthy_after all the same, and back once it commits."""
    from tests.integration.test_store_health import NOT_SERVING, SERVING, health_becomes, refused

    a, _ = replicas
    session = await a.delegate(scopes=["tickets.read"])
    engine = create_async_engine(URL)
    try:
        async with engine.connect() as dba:
            await dba.execute(text("LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE"))
            waiting = asyncio.ensure_future(a.check(session.token, "tickets.read"))
            await health_becomes(a, NOT_SERVING, within=12)
            await refused(waiting)
            await refused(a.check(session.token, "tickets.read"))
            await dba.rollback()
    finally:
        await engine.dispose()
    await health_becomes(a, SERVING, within=20)
    assert (await a.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_a_replica_started_with_its_clock_ahead_loses_no_revocation(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Its pruning deletes a live token's revocation history; once the clock is put right the
    revocation is back (from the session), and a Revoke re-applies it with a new sequence."""
    from google.protobuf.duration_pb2 import Duration

    await wipe(URL)
    settings = replica(tmp_path, idp, "replica-a")
    pruning = dataclasses.replace(settings.revocation, prune_interval=0.02, history_retention=1.0)
    fast = dataclasses.replace(settings, revocation=pruning)
    revoke = pb.RevokeRequest
    async with running_harness(tmp_path, idp, clock, settings) as a:
        live = await a.delegate(scopes=["tickets.read"], ttl=Duration(seconds=600))
        first = await a.stub.Revoke(revoke(session_id=live.session_id), metadata=bearer(ADMIN_KEY))
    clock.step(7200)
    engine = create_async_engine(URL)
    try:
        async with running_harness(tmp_path, idp, clock, fast) as a:
            for _ in range(250):
                async with engine.connect() as db:
                    rows = (await db.execute(text("SELECT count(*) FROM revocations"))).scalar()
                if rows == 0:
                    break
                await asyncio.sleep(0.02)
            assert rows == 0
            clock.step(-7200)
            for _ in range(250):
                answer = await a.check(live.token, "tickets.read")
                if answer.decision == pb.DECISION_DENY:
                    break
                await asyncio.sleep(0.02)
            assert (answer.decision, answer.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
            again = await a.stub.Revoke(
                revoke(session_id=live.session_id), metadata=bearer(ADMIN_KEY)
            )
            assert list(again.session_ids) == [live.session_id]
            assert again.revocation_sequence == first.revocation_sequence + 1
    finally:
        await engine.dispose()


async def test_a_signing_key_retired_on_one_replica_stops_verifying_on_the_other(
    replicas: tuple[Harness, Harness],
) -> None:
    """RetireSigningKey on a: a's Check denies the key's tokens before the answer, b's within
    revocation.poll_interval (its verified-token cache forgotten too), and b signs with the new
    key."""
    a, b = replicas
    session = await a.delegate()
    old = kid_of(session.token)
    for h in (a, b, b):  # b's second Check comes from its cache
        assert (await h.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    answer = await a.stub.RetireSigningKey(
        pb.RetireSigningKeyRequest(kid=old, reason="compromised"), metadata=bearer(ADMIN_KEY)
    )
    assert answer.retired_kid == old
    assert (await a.check(session.token, "tickets.read")).reason == pb.REASON_SIGNATURE_INVALID
    loop = asyncio.get_running_loop()
    deadline = loop.time() + b.running.settings.revocation.poll_interval + 1.0
    while (await b.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW:
        assert loop.time() < deadline, "b still verifies the retired key"
        await asyncio.sleep(0.05)
    denied = await b.check(session.token, "tickets.read")
    assert denied.reason == pb.REASON_SIGNATURE_INVALID
    jwks = json.loads((await b.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    assert [key["kid"] for key in jwks["keys"]] == [answer.signing_kid]
    fresh = await b.delegate()
    assert kid_of(fresh.token) == answer.signing_kid
    assert (await a.check(fresh.token, "tickets.read")).decision == pb.DECISION_ALLOW
    [record] = await audit(b, event_types=[pb.EVENT_TYPE_KEY_RETIRED])
    assert record.detail == f"{old}: compromised"

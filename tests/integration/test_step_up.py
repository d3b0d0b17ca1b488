"""Step-up to the human: risk rules in Check, StepUp, ResolveStepUp with a fresh IdP login,
one-time consumption, WatchStepUps, and the audit records of each."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.conftest import (
    ADMIN_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    agentid_cli,
    bad_request,
    bearer,
    error_info,
    running_harness,
    struct,
)

RULES = [
    {"name": "large-transfer", "action": "payments.transfer", "when": "context.amount > 1000"},
    {"name": "identity-change", "action": "identity.*", "when": "true"},
    {"name": "big-export", "action": "data.export", "when": "context.rows > 10000"},
]


@pytest.fixture
async def h(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Harness]:
    def with_rules(config: dict[str, Any]) -> None:
        config["risk"] = RULES
        config["step_up"] = {"pending_ttl": "10m", "approval_ttl": "5m", "max_auth_age": "5m"}
        config["agents"][0]["max_scopes"].append("identity.*")

    async with running_harness(tmp_path, idp, clock, mutate=with_rules) as harness:
        yield harness


def fresh_user(h: Harness, sub: str = "alice", age: float = 0, **claims: Any) -> str:
    """An IdP token whose auth_time is ``age`` seconds before the server's clock."""
    return h.idp.token(
        sub=sub,
        scope="tickets.* payments.* identity.*",
        auth_time=int(h.clock.now() - age),
        **claims,
    )


async def agent(h: Harness, scopes: list[str] | None = None) -> pb.DelegateResponse:
    return await h.delegate(fresh_user(h), scopes=scopes or ["payments.transfer", "identity.*"])


async def step_up(
    h: Harness,
    token: str,
    action: str = "payments.transfer",
    resource: str = "account/42",
    **context: Any,
) -> pb.StepUp:
    request = pb.StepUpRequest(
        action=action,
        resource=resource,
        context=struct(context or {"amount": 5000}),
        binding_message="Transfer 5000 EUR to account 42",
    )
    return (await h.stub.StepUp(request, metadata=bearer(token))).step_up


async def resolve(
    h: Harness,
    step_up_id: str,
    approve: bool = True,
    credential: str | None = None,
    comment: str = "",
) -> pb.StepUp:
    request = pb.ResolveStepUpRequest(step_up_id=step_up_id, approve=approve, comment=comment)
    return (
        await h.stub.ResolveStepUp(request, metadata=bearer(credential or fresh_user(h)))
    ).step_up


async def transfer(
    h: Harness, token: str, amount: float = 5000, resource: str = "account/42"
) -> pb.CheckResponse:
    return await h.check(token, "payments.transfer", resource, context=struct({"amount": amount}))


# -- risk rules in Check -------------------------------------------------------------------------


async def test_a_firing_rule_requires_step_up(h: Harness) -> None:
    session = await agent(h)
    big = await transfer(h, session.token, 5000)
    assert (big.decision, big.reason, big.risk_rule) == (
        pb.DECISION_STEP_UP_REQUIRED,
        pb.REASON_HIGH_RISK,
        "large-transfer",
    )
    assert big.matched_scope == "payments.transfer"
    small = await transfer(h, session.token, 50)
    assert (small.decision, small.risk_rule) == (pb.DECISION_ALLOW, "")
    identity = await h.check(session.token, "identity.email.change", "user/alice")
    assert (identity.decision, identity.risk_rule) == (
        pb.DECISION_STEP_UP_REQUIRED,
        "identity-change",
    )


async def test_rules_fail_closed(h: Harness) -> None:
    session = await agent(h)
    missing = await h.check(session.token, "payments.transfer", "account/42")  # no context at all
    assert (missing.decision, missing.risk_rule) == (pb.DECISION_STEP_UP_REQUIRED, "large-transfer")
    wrong_type = await h.check(
        session.token, "payments.transfer", "a/1", context=struct({"amount": "lots"})
    )
    assert wrong_type.decision == pb.DECISION_STEP_UP_REQUIRED


async def test_scope_denial_comes_before_risk(h: Harness) -> None:
    session = await agent(h, scopes=["identity.*"])
    response = await transfer(h, session.token)
    assert (response.decision, response.reason, response.risk_rule) == (
        pb.DECISION_DENY,
        pb.REASON_SCOPE_NOT_GRANTED,
        "",
    )


# -- the flow --------------------------------------------------------------------------------------


async def test_approve_then_exactly_one_check_is_allowed(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    assert pending.id.startswith("stp_")
    assert (pending.state, pending.risk_rule, pending.user_id) == (
        pb.STEP_UP_STATE_PENDING,
        "large-transfer",
        "alice",
    )
    assert pending.binding_message == "Transfer 5000 EUR to account 42"
    assert (await step_up(h, session.token)).id == pending.id  # the same request while pending
    approved = await resolve(h, pending.id, comment="ok, once")
    assert (approved.state, approved.comment) == (pb.STEP_UP_STATE_APPROVED, "ok, once")
    assert (
        await transfer(h, session.token, 5000, "account/43")
    ).decision == pb.DECISION_STEP_UP_REQUIRED  # another binding
    assert (
        await transfer(h, session.token, 5001)
    ).decision == pb.DECISION_STEP_UP_REQUIRED  # another context
    allowed = await transfer(h, session.token)
    assert (allowed.decision, allowed.reason, allowed.step_up_id) == (
        pb.DECISION_ALLOW,
        pb.REASON_STEP_UP_APPROVED,
        pending.id,
    )
    again = await transfer(h, session.token)
    assert (again.decision, again.reason) == (pb.DECISION_STEP_UP_REQUIRED, pb.REASON_HIGH_RISK)


async def test_context_binding_is_canonical(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token, amount=5000, note="x")
    await resolve(h, pending.id)
    # Same context, other key order and 5000 vs 5000.0: the same RFC 8785 canonical JSON.
    response = await h.check(
        session.token,
        "payments.transfer",
        "account/42",
        context=struct({"note": "x", "amount": 5000.0}),
    )
    assert response.reason == pb.REASON_STEP_UP_APPROVED


async def test_deny_denies_until_a_new_request(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    denied = await resolve(h, pending.id, approve=False, comment="not today")
    assert denied.state == pb.STEP_UP_STATE_DENIED
    for _ in range(2):
        response = await transfer(h, session.token)
        assert (response.decision, response.reason, response.step_up_id) == (
            pb.DECISION_DENY,
            pb.REASON_STEP_UP_DENIED,
            "",  # api.md: the approval consumed, if any; the denial's id is in the record
        )
        [record] = [
            r.record
            async for r in h.stub.Audit(
                pb.AuditRequest(after_id=int(response.decision_id) - 1, limit=1),
                metadata=bearer(ADMIN_KEY),
            )
        ]
        assert record.step_up_id == pending.id
    newer = await step_up(h, session.token)  # the agent asks again: the newest decides
    assert newer.id != pending.id
    assert (await transfer(h, session.token)).decision == pb.DECISION_STEP_UP_REQUIRED


async def test_a_denial_holds_until_its_expiry(h: Harness) -> None:
    session = await agent(h)
    denied = await resolve(h, (await step_up(h, session.token)).id, approve=False)
    h.clock.advance(denied.expires_at.seconds - h.clock.now() - 1)
    assert (await transfer(h, session.token)).reason == pb.REASON_STEP_UP_DENIED
    h.clock.advance(2)  # past expires_at: back to asking for a step-up
    after = await transfer(h, session.token)
    assert (after.decision, after.reason) == (pb.DECISION_STEP_UP_REQUIRED, pb.REASON_HIGH_RISK)


async def test_exactly_once_under_concurrent_checks(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    await resolve(h, pending.id)
    responses = await asyncio.gather(*(transfer(h, session.token) for _ in range(60)))
    allowed = [r for r in responses if r.decision == pb.DECISION_ALLOW]
    assert len(allowed) == 1
    assert allowed[0].step_up_id == pending.id
    assert all(r.decision == pb.DECISION_STEP_UP_REQUIRED for r in responses if r is not allowed[0])


async def test_a_step_up_where_no_rule_fires_is_harmless(h: Harness) -> None:
    session = await agent(h)
    small = await step_up(h, session.token, amount=10)
    assert (small.state, small.risk_rule) == (pb.STEP_UP_STATE_PENDING, "")


# -- freshness and who may resolve -------------------------------------------------------------------


async def test_a_stale_login_is_challenged_as_rfc_9470_says(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, pending.id, credential=fresh_user(h, age=600))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(caught.value)
    assert info.reason == "INSUFFICIENT_USER_AUTHENTICATION"
    assert dict(info.metadata) == {"max_age": "300", "acr_values": ""}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, pending.id, credential=h.idp.token(auth_time=None))
    assert error_info(caught.value).reason == "INSUFFICIENT_USER_AUTHENTICATION"
    # Another user, even with a stale login, is told who they are not: PERMISSION_DENIED.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, pending.id, credential=fresh_user(h, sub="bob", age=600))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The agent cannot approve its own step-up.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, pending.id, credential=session.token)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_login_in_the_future_is_not_fresh(h: Harness) -> None:
    """An auth_time beyond the IdP's clock leeway (30 s by default) ahead of the server's clock
    proves no fresh login (a mis-set or forged IdP clock would make it fresh for hours); within
    the leeway it is a clock difference and counts as fresh."""
    session = await agent(h)
    pending = await step_up(h, session.token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, pending.id, credential=fresh_user(h, age=-3600))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(caught.value)
    assert info.reason == "INSUFFICIENT_USER_AUTHENTICATION"
    assert dict(info.metadata) == {"max_age": "300", "acr_values": ""}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, pending.id, credential=fresh_user(h, age=-40))
    assert error_info(caught.value).reason == "INSUFFICIENT_USER_AUTHENTICATION"
    resolved = await resolve(h, pending.id, credential=fresh_user(h, age=-20))
    assert resolved.state == pb.STEP_UP_STATE_APPROVED


async def test_accepted_acr_is_required_when_configured(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def acr(config: dict[str, Any]) -> None:
        config["risk"] = RULES
        config["step_up"] = {"accepted_acr": ["urn:mfa", "phr"]}

    async with running_harness(tmp_path, idp, clock, mutate=acr) as h:
        session = await agent(h, scopes=["payments.transfer"])
        pending = await step_up(h, session.token)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await resolve(h, pending.id, credential=fresh_user(h, acr="pwd"))
        assert dict(error_info(caught.value).metadata) == {
            "max_age": "300",
            "acr_values": "urn:mfa phr",
        }
        assert (
            await resolve(h, pending.id, credential=fresh_user(h, acr="urn:mfa"))
        ).state == pb.STEP_UP_STATE_APPROVED


async def test_an_agent_session_holds_a_bounded_number_of_pending_step_ups(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Each pending step-up is a row, an audit record and a line in the user's inbox: at most
    step_up.max_pending_per_session at once, one more RESOURCE_EXHAUSTED /
    TOO_MANY_PENDING_STEP_UPS with nothing written. Asking again for one already pending, another
    session, and a resolved or expired one free of the bound (before, any number was kept)."""

    def capped(config: dict[str, Any]) -> None:
        config["risk"] = RULES
        config["step_up"] = {"pending_ttl": "10m", "max_pending_per_session": 2}

    async with running_harness(tmp_path, idp, clock, mutate=capped) as h:
        session = await agent(h, scopes=["payments.transfer"])
        first = await step_up(h, session.token, resource="account/1")
        await step_up(h, session.token, resource="account/2")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await step_up(h, session.token, resource="account/3")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(caught.value)
        assert (info.reason, dict(info.metadata)) == ("TOO_MANY_PENDING_STEP_UPS", {"limit": "2"})
        assert (await step_up(h, session.token, resource="account/1")).id == first.id
        other = await agent(h, scopes=["payments.transfer"])
        assert await step_up(h, other.token, resource="account/3")
        await resolve(h, first.id, approve=False)
        third = await step_up(h, session.token, resource="account/3")
        clock.advance(601)
        assert (await step_up(h, session.token, resource="account/4")).id != third.id
        with sqlite3.connect(h.tmp_path / "agentid.db") as db:
            (held,) = db.execute(
                "SELECT count(*) FROM step_ups WHERE session_id = ?", (session.session_id,)
            ).fetchone()
        assert held == 4  # the refused one left nothing


async def test_resolving_twice_or_late_fails_precondition(h: Harness) -> None:
    session = await agent(h)
    first = await step_up(h, session.token)
    await resolve(h, first.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, first.id, approve=False)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).metadata["state"] == "APPROVED"
    late = await step_up(h, session.token, resource="account/7")
    h.clock.advance(601)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, late.id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).metadata["state"] == "EXPIRED"


async def test_an_unused_approval_expires(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    await resolve(h, pending.id)
    h.clock.advance(301)
    assert (await transfer(h, session.token)).decision == pb.DECISION_STEP_UP_REQUIRED


async def test_revoking_expires_the_sessions_step_ups(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    approved = await step_up(h, session.token, resource="account/9")
    await resolve(h, approved.id)
    await h.stub.Revoke(pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY))
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        states = dict(db.execute("SELECT id, state FROM step_ups").fetchall())
    assert states == {pending.id: pb.STEP_UP_STATE_EXPIRED, approved.id: pb.STEP_UP_STATE_EXPIRED}


# -- bad input -------------------------------------------------------------------------------------


async def test_bad_step_up_requests(h: Harness) -> None:
    session = await agent(h)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await step_up(h, session.token, action="tickets.read")  # not in the session's scopes
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await step_up(h, session.token, action="payments.*")
    assert [v.field for v in bad_request(caught.value).field_violations] == ["action"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await step_up(h, session.token, blob="x" * 20000)
    assert [v.field for v in bad_request(caught.value).field_violations] == ["context"]
    for credential in (fresh_user(h), ADMIN_KEY):  # only agents ask for step-ups
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await step_up(h, credential)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # What the user will read may not carry terminal escapes, NUL or reordering characters.
    for message in ("Pay 5 EUR\x1b[1A\x1b[2K", "Pay 5\x00", "Pay \u202e24 ot RUE 5"):
        request = pb.StepUpRequest(
            action="payments.transfer", resource="account/42", binding_message=message
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.stub.StepUp(request, metadata=bearer(session.token))
        assert [v.field for v in bad_request(caught.value).field_violations] == ["binding_message"]


async def test_bad_resolve_requests(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, "stp_nope")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, "stp_01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(h, "stp_01ARZ3NDEKTSV4RRFFQ69G5FAV", comment="ok\x00")
    assert [v.field for v in bad_request(caught.value).field_violations] == ["comment"]


# -- watching ----------------------------------------------------------------------------------------


async def read(stream: Any, within: float = 5) -> pb.StepUp:
    item = await asyncio.wait_for(stream.read(), within)
    assert item is not grpc.aio.EOF
    return item.step_up


async def test_the_users_inbox_then_every_change(h: Harness) -> None:
    session = await agent(h)
    first = await step_up(h, session.token)
    inbox = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(fresh_user(h)))
    assert (await read(inbox)).id == first.id  # current state first
    second = await step_up(h, session.token, resource="account/8")
    arrived = await read(inbox)  # pushed as it is created
    assert (arrived.id, arrived.state) == (second.id, pb.STEP_UP_STATE_PENDING)
    await resolve(h, first.id)
    change = await read(inbox)
    assert (change.id, change.state) == (first.id, pb.STEP_UP_STATE_APPROVED)
    await transfer(h, session.token)
    consumed = await read(inbox)
    assert (consumed.id, consumed.state) == (first.id, pb.STEP_UP_STATE_CONSUMED)
    inbox.cancel()


async def test_agent_watches_its_own_and_one_by_id(h: Harness) -> None:
    session = await agent(h)
    other = await agent(h)
    mine = await step_up(h, session.token)
    theirs = await step_up(h, other.token)
    own = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
    assert (await read(own)).id == mine.id
    one = h.stub.WatchStepUps(
        pb.WatchStepUpsRequest(step_up_id=mine.id), metadata=bearer(session.token)
    )
    assert (await read(one)).id == mine.id
    await resolve(h, theirs.id)
    await resolve(h, mine.id, approve=False)
    assert ((await read(own)).id, (await read(one)).state) == (mine.id, pb.STEP_UP_STATE_DENIED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(
            h.stub.WatchStepUps(
                pb.WatchStepUpsRequest(step_up_id=theirs.id), metadata=bearer(session.token)
            )
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    own.cancel()
    one.cancel()


async def test_current_only_lists_and_ends(h: Harness) -> None:
    session = await agent(h)
    created = [await step_up(h, session.token, resource=f"account/{n}") for n in range(3)]
    listing = h.stub.WatchStepUps(
        pb.WatchStepUpsRequest(current_only=True), metadata=bearer(fresh_user(h))
    )
    ids = [response.step_up.id async for response in listing]
    assert ids == [s.id for s in created]


# -- audit -----------------------------------------------------------------------------------------


async def test_each_step_is_audited(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    await resolve(h, pending.id, comment="fine")
    allowed = await transfer(h, session.token)
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        rows = db.execute(
            "SELECT id, event_type, actor_kind, actor_id, decision, reason, step_up_id, detail"
            " FROM audit_records WHERE step_up_id = ? ORDER BY id",
            (pending.id,),
        ).fetchall()
    assert [r[1:] for r in rows] == [
        (
            pb.EVENT_TYPE_STEP_UP_REQUESTED,
            pb.ACTOR_KIND_AGENT,
            session.session_id,
            0,
            0,
            pending.id,
            "Transfer 5000 EUR to account 42",
        ),
        (
            pb.EVENT_TYPE_STEP_UP_RESOLVED,
            pb.ACTOR_KIND_USER,
            "alice",
            pb.DECISION_ALLOW,
            0,
            pending.id,
            "fine",
        ),
        (
            pb.EVENT_TYPE_CHECK,
            pb.ACTOR_KIND_SERVICE,
            "payments-api",
            pb.DECISION_ALLOW,
            pb.REASON_STEP_UP_APPROVED,
            pending.id,
            "",
        ),
    ]
    assert rows[2][0] == int(allowed.decision_id)
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        identifiers = db.execute(
            "SELECT session_id, user_id, scopes FROM audit_records WHERE step_up_id = ?",
            (pending.id,),
        ).fetchall()
    expected = (session.session_id, "alice", ["payments.transfer", "identity.*"])
    assert [(s, u, json.loads(scopes)) for s, u, scopes in identifiers] == [expected] * 3


# -- the human's terminal tool -----------------------------------------------------------------------


async def cli(h: Harness, credential: str, *args: str) -> tuple[int, str, str]:
    return await agentid_cli(h, "step-ups", credential, *args)


async def test_the_step_ups_command(h: Harness) -> None:
    session = await agent(h)
    pending = await step_up(h, session.token)
    code, out, _ = await cli(h, fresh_user(h), "list")
    assert code == 0
    assert pending.id in out
    assert "PENDING" in out
    assert "large-transfer" in out
    # What an approval allows, in full, and the agent's words marked as the agent's.
    assert "allows:  payments.transfer on account/42" in out
    assert 'context: {"amount":5000}' in out
    assert "the agent says: 'Transfer 5000 EUR to account 42'" in out
    code, _, err = await cli(h, fresh_user(h, age=900), "approve", pending.id)
    assert code == 1
    assert "fresh login" in err
    code, out, _ = await cli(h, fresh_user(h), "approve", pending.id, "--comment", "ok")
    assert (code, out.strip()) == (0, f"{pending.id} is now APPROVED")
    assert (await transfer(h, session.token)).reason == pb.REASON_STEP_UP_APPROVED
    other = await step_up(h, session.token, resource="account/1")
    code, out, _ = await cli(h, fresh_user(h), "deny", other.id)
    assert (code, out.strip()) == (0, f"{other.id} is now DENIED")


async def test_housekeeping_expires_overdue_step_ups_and_tells_their_watchers(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A pending step-up past pending_ttl and an approval past approval_ttl are marked EXPIRED
    by the periodic pass (not only when somebody reads them), and watchers hear of each."""

    def quick(config: dict[str, Any]) -> None:
        config["risk"] = RULES
        config["step_up"] = {"pending_ttl": "10m", "approval_ttl": "5m", "max_auth_age": "5m"}
        config["revocation"] = {"prune_interval": "50ms"}

    async with running_harness(tmp_path, idp, clock, mutate=quick) as h:
        session = await h.delegate(fresh_user(h), scopes=["payments.transfer"])
        pending = await step_up(h, session.token)
        approved = await step_up(h, session.token, resource="account/9")
        await resolve(h, approved.id)
        watch = h.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
        assert {(await read(watch)).id for _ in range(2)} == {pending.id, approved.id}
        h.clock.advance(301)  # the approval is overdue, the pending one not yet
        change = await asyncio.wait_for(read(watch), 10)
        assert (change.id, change.state) == (approved.id, pb.STEP_UP_STATE_EXPIRED)
        h.clock.advance(300)
        change = await asyncio.wait_for(read(watch), 10)
        assert (change.id, change.state) == (pending.id, pb.STEP_UP_STATE_EXPIRED)
        watch.cancel()
    with sqlite3.connect(tmp_path / "agentid.db") as db:
        states = dict(db.execute("SELECT id, state FROM step_ups").fetchall())
    assert states == {pending.id: pb.STEP_UP_STATE_EXPIRED, approved.id: pb.STEP_UP_STATE_EXPIRED}

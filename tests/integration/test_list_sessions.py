"""ListSessions over real gRPC, on SQLite and (when AGENTID_TEST_POSTGRES_URL is set) PostgreSQL:
who sees which sessions, newest-first keyset pages that neither repeat nor skip while sessions
are delegated between them, ended sessions with their state, and page tokens that cannot be
edited or carried to another query or caller."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bad_request,
    bearer,
    error_info,
    running_harness,
    with_config,
)
from tests.integration.test_postgres import wipe

POSTGRES_URL = os.environ.get("AGENTID_TEST_POSTGRES_URL", "")
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            not POSTGRES_URL, reason="set AGENTID_TEST_POSTGRES_URL to a database tests may wipe"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
async def h(
    request: pytest.FixtureRequest, tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> AsyncIterator[Harness]:
    mutate = None
    if request.param == "postgresql":
        await wipe(POSTGRES_URL)
        mutate = with_config(database={"url": POSTGRES_URL})
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        yield harness


async def list_sessions(h: Harness, credential: str, **fields: Any) -> pb.ListSessionsResponse:
    request = pb.ListSessionsRequest(**fields)
    return await h.stub.ListSessions(request, metadata=bearer(credential))


async def ids(h: Harness, credential: str, **fields: Any) -> list[str]:
    """Every page's session ids, in order."""
    found: list[str] = []
    token = ""
    while True:
        page = await list_sessions(h, credential, page_token=token, **fields)
        found += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            return found


async def refused(h: Harness, credential: str, **fields: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_sessions(h, credential, **fields)
    return caught.value


def newest_first(*sessions: pb.DelegateResponse) -> list[str]:
    return [s.session_id for s in sorted(sessions, key=lambda s: s.serial, reverse=True)]


async def test_who_sees_which_sessions(h: Harness) -> None:
    alice, bob = h.idp.token(sub="alice"), h.idp.token(sub="bob")
    a1 = await h.delegate(alice, scopes=["tickets.read", "agentid.delegate"])
    a2 = await h.delegate(alice)
    a1_child = await h.sub_delegate(a1.token)
    a1_grandchild_parent = await h.sub_delegate(a1.token)
    b1 = await h.delegate(bob)
    everyone = newest_first(a1, a2, a1_child, a1_grandchild_parent, b1)
    alices = newest_first(a1, a2, a1_child, a1_grandchild_parent)

    # A user: their own, sub-agents included; naming themselves is the same.
    assert await ids(h, alice) == alices
    assert await ids(h, alice, user_id="alice") == alices
    assert await ids(h, bob) == [b1.session_id]
    # ... of one agent kind: their own sessions of it.
    assert await ids(h, alice, agent_id="sub-bot") == newest_first(a1_child, a1_grandchild_parent)
    # Another user's: refused, never a filtered answer.
    error = await refused(h, alice, user_id="bob")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "NOT_YOUR_SESSIONS"

    # An admin (role admin includes audit): anyone's, by user, by agent, or all.
    assert await ids(h, ADMIN_KEY) == everyone
    assert await ids(h, ADMIN_KEY, user_id="bob") == [b1.session_id]
    assert await ids(h, ADMIN_KEY, agent_id="support-bot") == newest_first(a1, a2, b1)
    assert await ids(h, ADMIN_KEY, user_id="alice", agent_id="support-bot") == newest_first(a1, a2)
    assert await ids(h, ADMIN_KEY, agent_id="no-such-bot") == []

    # An agent: its own session and its descendants, nobody else's.
    assert await ids(h, a1.token) == newest_first(a1, a1_child, a1_grandchild_parent)
    assert await ids(h, a1.token, agent_id="sub-bot") == newest_first(
        a1_child, a1_grandchild_parent
    )
    assert await ids(h, a1_child.token) == [a1_child.session_id]
    assert await ids(h, a2.token) == [a2.session_id]
    assert await ids(h, a1.token, user_id="alice") == newest_first(
        a1, a1_child, a1_grandchild_parent
    )
    error = await refused(h, a1.token, user_id="bob")
    assert (error.code(), error_info(error).reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_YOUR_SESSIONS",
    )

    # Services without role audit or admin; no credential at all.
    for key in (CHECK_KEY, WATCH_KEY):
        error = await refused(h, key)
        assert (error.code(), error_info(error).reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "CALLER_NOT_ALLOWED",
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.ListSessions(pb.ListSessionsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_session_as_listed(h: Harness) -> None:
    parent = await h.delegate(
        scopes=["tickets.read", "agentid.delegate"], task="triage", audiences=["crm"]
    )
    child = await h.sub_delegate(parent.token, task="read one")
    page = await list_sessions(h, ADMIN_KEY)
    listed = {s.session_id: s for s in page.sessions}
    got = listed[child.session_id]
    assert (got.agent_id, got.user_id, got.parent_session_id) == (
        "sub-bot",
        "alice",
        parent.session_id,
    )
    assert (list(got.scopes), got.task, got.serial) == (["tickets.read"], "read one", child.serial)
    assert got.expire_time == child.expires_at
    assert got.create_time.seconds <= int(h.clock.now())
    assert got.state == pb.SESSION_STATE_ACTIVE
    assert not got.HasField("revoke_time")
    assert got.revoke_reason == ""
    top = listed[parent.session_id]
    assert (top.parent_session_id, list(top.audiences)) == ("", ["crm"])
    assert page.next_page_token == ""


async def test_pages_neither_repeat_nor_skip_while_sessions_are_delegated(h: Harness) -> None:
    alice = h.idp.token(sub="alice")
    first = []
    for i in range(7):
        first.append(await h.delegate(alice))
        if i % 3 == 2:
            h.clock.advance(1)  # some share a created time (then serial orders), some do not
    seen: list[str] = []
    token = ""
    later = []
    while True:
        page = await list_sessions(h, alice, page_size=3, page_token=token)
        assert len(page.sessions) <= 3
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
        later.append(await h.delegate(alice))  # newer than the cursor: never on a later page
        h.clock.advance(1)
    assert seen == newest_first(*first)
    assert len(set(seen)) == len(seen)
    # Listed again from the start, the newer ones come first.
    assert await ids(h, alice) == newest_first(*first, *later)


async def test_ended_sessions_only_when_asked_with_their_state(h: Harness) -> None:
    alice = h.idp.token(sub="alice")
    short = await h.delegate(alice, ttl={"seconds": 60})
    revoked = await h.delegate(alice, scopes=["tickets.read", "agentid.delegate"])
    revoked_child = await h.sub_delegate(revoked.token)
    live = await h.delegate(alice)
    await h.stub.Revoke(
        pb.RevokeRequest(session_id=revoked.session_id, reason="task_complete"),
        metadata=bearer(alice),
    )
    h.clock.advance(61)

    assert await ids(h, alice) == [live.session_id]
    page = await list_sessions(h, alice, include_ended=True)
    states = {s.session_id: s for s in page.sessions}
    assert [s.session_id for s in page.sessions] == newest_first(
        short, revoked, revoked_child, live
    )
    assert states[live.session_id].state == pb.SESSION_STATE_ACTIVE
    assert states[short.session_id].state == pb.SESSION_STATE_EXPIRED
    assert not states[short.session_id].HasField("revoke_time")
    for session in (revoked, revoked_child):
        got = states[session.session_id]
        assert got.state == pb.SESSION_STATE_REVOKED
        assert got.revoke_reason == "task_complete"
        assert got.HasField("revoke_time")
        assert got.revoke_time.seconds <= int(h.clock.now())
    # Expired and revoked by then: still REVOKED.
    h.clock.advance(3600)
    page = await list_sessions(h, alice, include_ended=True)
    assert [s.state for s in page.sessions if s.session_id == revoked.session_id] == [
        pb.SESSION_STATE_REVOKED
    ]
    assert await ids(h, alice) == []


async def test_page_tokens_are_bound_to_their_query_and_caller(h: Harness) -> None:
    alice, bob = h.idp.token(sub="alice"), h.idp.token(sub="bob")
    for _ in range(3):
        await h.delegate(alice)
    token = (await list_sessions(h, alice, page_size=1)).next_page_token
    assert token
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[5] ^= 1  # another cursor, the seal unchanged
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    attempts: list[tuple[str, dict[str, Any]]] = [
        (alice, {"page_token": tampered}),
        (alice, {"page_token": token[:-2]}),
        (alice, {"page_token": "not a token!"}),
        (alice, {"page_token": token, "include_ended": True}),  # another query
        (alice, {"page_token": token, "agent_id": "support-bot"}),
        (bob, {"page_token": token}),  # another caller
        (ADMIN_KEY, {"page_token": token, "user_id": "alice"}),
    ]
    for credential, fields in attempts:
        error = await refused(h, credential, **fields)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert error_info(error).reason == "PAGE_TOKEN_INVALID"
        assert [v.field for v in bad_request(error).field_violations] == ["page_token"]
    # The page size may change from page to page.
    rest = await list_sessions(h, alice, page_token=token, page_size=5)
    assert len(rest.sessions) == 2
    assert rest.next_page_token == ""


async def test_page_sizes(h: Harness) -> None:
    alice = h.idp.token(sub="alice")
    for _ in range(3):
        await h.delegate(alice)
    error = await refused(h, alice, page_size=-1)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(error).field_violations] == ["page_size"]
    assert len((await list_sessions(h, alice, page_size=0)).sessions) == 3  # the default, 100
    assert len((await list_sessions(h, alice, page_size=5000)).sessions) == 3  # taken as 1000
    page = await list_sessions(h, alice, page_size=2)
    assert len(page.sessions) == 2
    assert page.next_page_token
    error = await refused(h, ADMIN_KEY, user_id="x" * 300)
    assert [v.field for v in bad_request(error).field_violations] == ["user_id"]

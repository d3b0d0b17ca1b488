"""The console's pages over HTTP, against the real dev OpenID Provider (as test_console.py):
pending step-ups with Approve / Deny (a fresh multi-factor login forced by the domain's rule),
live updates by Server-Sent Events, sessions with Revoke and Revoke all, the activity page; and
the refusals: no CSRF token, another user's step-up, a step-up resolved already, an expired
console session, a hostile binding message."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.web.console import fresh_login_path
from agentid_server.web.console_pages import CONSOLE_PAGES
from agentid_server.web.console_sessions import SESSION_TTL, ConsoleUser

from tests.conftest import (
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    running_harness,
    struct,
    with_config,
)
from tests.http import test_console as sign_in_tests
from tests.http.test_console import (
    Provider,
    browser,
    console_sections,
    sign_in,
    signed_in,
    to_callback,
)

# The dev OpenID Provider, and the skip without node and oidc-provider, of the sign-in's tests.
provider = sign_in_tests.provider
pytestmark = sign_in_tests.pytestmark

MFA = "urn:mfa"
RULES = [{"name": "large-transfer", "action": "payments.transfer", "when": "context.amount > 1000"}]


@pytest.fixture
async def h(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, provider: Provider
) -> AsyncIterator[Harness]:
    mutate = with_config(
        **console_sections(tmp_path, idp, provider),
        risk=RULES,  # type: ignore[arg-type]
        step_up={"max_auth_age": "5m", "accepted_acr": [MFA]},
    )
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        yield harness


def now_on(clock: FakeClock) -> None:
    """The server's clock to the wall clock: the provider's auth_time is the wall clock's."""
    clock.step(time.time() - clock.now())


def user_token(h: Harness, provider: Provider, user: str) -> str:
    """An access token of ``user`` as the provider issues them (same key, same issuer)."""
    scope = provider.users[user]["scope"]
    return h.idp.token(sub=user, scope=scope, iss=provider.issuer, auth_time=int(time.time()))


async def agent_of(h: Harness, provider: Provider, user: str = "alice", **fields: Any) -> Any:
    fields.setdefault("scopes", ["payments.transfer"] if user == "alice" else ["tickets.read"])
    return await h.delegate(user_token(h, provider, user), **fields)


async def step_up(
    h: Harness, token: str, message: str = "Transfer 5000 EUR to account 42", **context: Any
) -> pb.StepUp:
    request = pb.StepUpRequest(
        action="payments.transfer",
        resource="account/42",
        context=struct(context or {"amount": 5000}),
        binding_message=message,
    )
    return (await h.stub.StepUp(request, metadata=bearer(token))).step_up


async def transfer(h: Harness, token: str) -> pb.CheckResponse:
    return await h.check(token, "payments.transfer", "account/42", context=struct({"amount": 5000}))


async def get(session: aiohttp.ClientSession, h: Harness, path: str) -> tuple[int, str, Any]:
    async with session.get(h.http_url + path, allow_redirects=False) as response:
        return response.status, await response.text(), response.headers


async def post(
    session: aiohttp.ClientSession, h: Harness, path: str, form: dict[str, str]
) -> tuple[int, str, Any]:
    async with session.post(h.http_url + path, data=form, allow_redirects=False) as response:
        return response.status, await response.text(), response.headers


def me(h: Harness) -> ConsoleUser:
    [user] = signed_in(h)
    return user


async def resolve(
    session: aiohttp.ClientSession, h: Harness, step_up_id: str, decision: str, **extra: str
) -> tuple[int, str, Any]:
    form = {"csrf_token": me(h).csrf_token, "step_up_id": step_up_id, "decision": decision}
    return await post(session, h, "/console/step-ups/resolve", {**form, **extra})


async def sign_in_with_mfa(session: aiohttp.ClientSession, h: Harness, provider: Provider) -> None:
    alice = provider.users["alice"]
    path = fresh_login_path("/console/", max_age=300, acr_values=[MFA])
    await sign_in(session, h, "alice", alice["password"], code=alice["code"], start=path)


async def test_approve_forces_a_fresh_mfa_login_then_allows_once(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    alice = provider.users["alice"]
    agent = await agent_of(h, provider)
    assert (await transfer(h, agent.token)).decision == pb.DECISION_STEP_UP_REQUIRED
    asked = await step_up(h, agent.token)
    async with browser() as session:
        await sign_in(session, h, "alice", alice["password"])  # a password alone: urn:pwd
        status, page, headers = await get(session, h, "/console/step-ups")
        assert status == 200
        assert f'data-step-up-id="{asked.id}"' in page
        assert "Transfer 5000 EUR to account 42" in page
        assert agent.session_id in page
        assert "&#34;amount&#34;: 5000" in page  # the context, pretty JSON, escaped
        # Approve: the domain asks for a fresh login with the second factor (RFC 9470)
        status, _, headers = await resolve(session, h, asked.id, "approve")
        assert status == 303
        login = urlsplit(headers["Location"])
        assert login.path == "/console/login"
        assert parse_qs(login.query) == {
            "next": ["/console/step-ups/resume"], "max_age": ["300"], "acr_values": [MFA],
        }  # fmt: skip
        assert (await transfer(h, agent.token)).decision == pb.DECISION_STEP_UP_REQUIRED
        now_on(clock)
        start = headers["Location"]
        callback = await to_callback(
            session, h, "alice", alice["password"], code=alice["code"], start=start
        )
        async with session.get(callback, allow_redirects=False) as response:
            assert response.headers["Location"] == "/console/step-ups/resume"
        status, page, _ = await get(session, h, "/console/step-ups/resume")
        assert status == 200, page
        assert f'data-state="APPROVED" data-step-up-id="{asked.id}"' in page
        assert me(h).acr == MFA
        # the resumed action is done once: coming back again does nothing
        status, _, headers = await get(session, h, "/console/step-ups/resume")
        assert (status, headers["X-Agentid-Reason"]) == (409, "NO_PENDING_ACTION")
    allowed = await transfer(h, agent.token)
    assert (allowed.decision, allowed.reason) == (pb.DECISION_ALLOW, pb.REASON_STEP_UP_APPROVED)
    assert (await transfer(h, agent.token)).decision == pb.DECISION_STEP_UP_REQUIRED


async def test_deny_and_a_second_click_is_refused(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    agent = await agent_of(h, provider)
    denied, approved = await step_up(h, agent.token), await step_up(h, agent.token, amount=7000)
    async with browser() as session:
        await sign_in_with_mfa(session, h, provider)
        now_on(clock)
        status, page, _ = await resolve(session, h, denied.id, "deny", comment="not today")
        assert status == 200, page
        assert 'data-state="DENIED"' in page
        status, page, headers = await resolve(session, h, denied.id, "approve")
        assert (status, headers["X-Agentid-Reason"]) == (409, "STEP_UP_NOT_PENDING")
        assert "DENIED already" in page
        status, page, _ = await resolve(session, h, approved.id, "approve")
        assert 'data-state="APPROVED"' in page
        status, page, headers = await resolve(session, h, approved.id, "approve")  # twice
        assert (status, headers["X-Agentid-Reason"]) == (409, "STEP_UP_NOT_PENDING")
        assert "APPROVED already" in page
    response = await transfer(h, agent.token)
    assert (response.decision, response.reason) == (pb.DECISION_DENY, pb.REASON_STEP_UP_DENIED)


async def test_a_post_without_the_csrf_token_changes_nothing(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    agent = await agent_of(h, provider)
    asked = await step_up(h, agent.token)
    async with browser() as session:
        await sign_in_with_mfa(session, h, provider)
        now_on(clock)
        for form in ({}, {"csrf_token": "guess"}):
            form |= {"step_up_id": asked.id, "decision": "approve"}
            status, _, headers = await post(session, h, "/console/step-ups/resolve", form)
            assert (status, headers["X-Agentid-Reason"]) == (403, "CSRF")
            form = {k: v for k, v in form.items() if k == "csrf_token"}
            form["session_id"] = agent.session_id
            status, _, headers = await post(session, h, "/console/sessions/revoke", form)
            assert (status, headers["X-Agentid-Reason"]) == (403, "CSRF")
            status, _, _ = await post(session, h, "/console/sessions/revoke-all", {})
            assert status == 403
        _, page, _ = await get(session, h, "/console/step-ups")
        assert f'data-step-up-id="{asked.id}"' in page  # still pending
    assert (await transfer(h, agent.token)).decision == pb.DECISION_STEP_UP_REQUIRED


async def test_another_users_step_up_is_not_shown_nor_resolvable(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    bobs = await agent_of(h, provider, "bob")
    request = pb.StepUpRequest(action="tickets.read", resource="ticket/1", binding_message="bob's")
    theirs = (await h.stub.StepUp(request, metadata=bearer(bobs.token))).step_up
    bobs_session = bobs.session_id
    async with browser() as session:
        await sign_in_with_mfa(session, h, provider)
        now_on(clock)
        _, page, _ = await get(session, h, "/console/step-ups")
        assert theirs.id not in page
        assert "bob&#39;s" not in page
        for decision in ("approve", "deny"):
            status, page, headers = await resolve(session, h, theirs.id, decision)
            assert (status, headers["X-Agentid-Reason"]) == (404, "STEP_UP_NOT_FOUND")
            assert theirs.id not in page
        _, page, _ = await get(session, h, "/console/sessions")
        assert bobs_session not in page
        form = {"csrf_token": me(h).csrf_token, "session_id": bobs_session}
        status, _, headers = await post(session, h, "/console/sessions/revoke", form)
        assert (status, headers["X-Agentid-Reason"]) == (404, "NOT_FOUND")
    watch = h.stub.WatchStepUps(
        pb.WatchStepUpsRequest(step_up_id=theirs.id, current_only=True),
        metadata=bearer(user_token(h, provider, "bob")),
    )
    assert [r.step_up.state async for r in watch] == [pb.STEP_UP_STATE_PENDING]
    assert (await h.check(bobs.token, "tickets.read", "ticket/1")).decision == pb.DECISION_ALLOW


async def test_a_step_up_link_shows_that_step_up_first_and_marked(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    """?step_up=<id>, the link an MCP server's guard hands the agent for its user: that step-up
    first and marked, in the page and in the list the page's script fetches; another user's,
    or one no longer pending, is said not to be waiting and is not shown."""
    agent = await agent_of(h, provider)
    first, linked = await step_up(h, agent.token), await step_up(h, agent.token, amount=7000)
    bobs = await agent_of(h, provider, "bob")
    request = pb.StepUpRequest(action="tickets.read", resource="ticket/1")
    theirs = (await h.stub.StepUp(request, metadata=bearer(bobs.token))).step_up

    def shown(page: str) -> list[str]:
        return [
            part.split('"', 1)[0] for part in page.split('data-step-up-id="')[1:]
        ]  # fmt: skip

    async with browser() as session:
        # Signed out: the sign-in brings the user back to the same step-up.
        status, _, headers = await get(session, h, f"/console/step-ups?step_up={linked.id}")
        assert status == 302
        location = urlsplit(headers["Location"])
        assert parse_qs(location.query) == {"next": [f"/console/step-ups?step_up={linked.id}"]}
        await sign_in_with_mfa(session, h, provider)
        now_on(clock)
        _, page, _ = await get(session, h, "/console/step-ups")
        assert shown(page) == [first.id, linked.id]
        assert 'data-testid="wanted"' not in page
        _, page, _ = await get(session, h, f"/console/step-ups?step_up={linked.id}")
        assert shown(page) == [linked.id, first.id]
        assert page.count('data-testid="wanted"') == 1
        assert f'data-list="/console/step-ups/list?step_up={linked.id}"' in page
        assert 'data-testid="wanted-not-pending"' not in page
        _, listed, _ = await get(session, h, f"/console/step-ups/list?step_up={linked.id}")
        assert shown(listed) == [linked.id, first.id]
        for other in (theirs.id, "stp_01ARZ3NDEKTSV4RRFFQ69G5FAV", "<script>"):
            _, page, _ = await get(session, h, f"/console/step-ups?step_up={other}")
            assert shown(page) == [first.id, linked.id]
            assert ('data-testid="wanted-not-pending"' in page) == other.startswith("stp_")
            assert "<script>" not in page.split("<main", 1)[1]


async def test_a_hostile_binding_message_and_context_are_only_shown_escaped(
    h: Harness, provider: Provider
) -> None:
    agent = await agent_of(h, provider)
    hostile, escaped = "<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"
    await step_up(h, agent.token, hostile, amount=5000, note='<img src=x onerror="alert(2)">')
    async with browser() as session:
        await sign_in(session, h, "alice", provider.users["alice"]["password"])
        for path in ("/console/step-ups", "/console/step-ups/list", "/console/activity"):
            status, page, headers = await get(session, h, path)
            assert status == 200
            assert "<script>alert" not in page
            assert "<img" not in page
            assert escaped in page
            assert "<script" not in page.replace('<script src="/console/static/console.js"', "")
            assert "script-src 'self'" in headers["Content-Security-Policy"]
        _, page, _ = await get(session, h, "/console/step-ups")
        assert "&lt;img src=x onerror=" in page
        assert "The agent's own words" in page  # marked as the agent's, in its own box
        assert f'<blockquote data-testid="binding-message">{escaped}</blockquote>' in page


async def test_server_sent_events_deliver_a_new_step_up_and_end_with_the_session(
    h: Harness, provider: Provider
) -> None:
    assert h.running.http is not None
    h.running.http.runner.app[CONSOLE_PAGES].events.heartbeat = 0.2
    agent = await agent_of(h, provider)
    async with browser() as session:
        await sign_in(session, h, "alice", provider.users["alice"]["password"])
        async with session.get(h.http_url + "/console/step-ups/events") as events:
            assert events.status == 200
            assert events.headers["Content-Type"] == "text/event-stream"
            assert "default-src 'self'" in events.headers["Content-Security-Policy"]
            asked = await step_up(h, agent.token)
            event = await next_event(events, "step-up")
            assert (event["id"], event["state"]) == (asked.id, "PENDING")
            assert (event["agent_id"], event["action"]) == ("support-bot", "payments.transfer")
            assert event["binding_message"] == "Transfer 5000 EUR to account 42"
            form = {"csrf_token": me(h).csrf_token}
            status, _, _ = await post(session, h, "/console/logout", form)
            assert status == 303
            assert await next_event(events, "end") == {"reason": "SIGNED_OUT"}
        async with session.get(h.http_url + "/console/step-ups/events") as refused:
            assert refused.status == 401  # signed out: EventSource does not retry


async def test_event_streams_count_against_the_users_stream_budget(
    h: Harness, provider: Provider
) -> None:
    assert h.running.http is not None
    pages = h.running.http.runner.app[CONSOLE_PAGES]
    pages.events.heartbeat = 0.2
    limit = h.running.settings.server.max_streams_per_user
    async with browser() as session:
        await sign_in(session, h, "alice", provider.users["alice"]["password"])
        opened = [await session.get(h.http_url + "/console/step-ups/events") for _ in range(limit)]
        try:
            assert {r.status for r in opened} == {200}
            async with session.get(h.http_url + "/console/step-ups/events") as one_more:
                assert one_more.status == 429
                assert one_more.headers["X-Agentid-Reason"] == "TOO_MANY_STREAMS"
        finally:
            for response in opened:
                response.close()


async def next_event(events: aiohttp.ClientResponse, name: str) -> dict[str, Any]:
    """The data of the next event called ``name`` (others and keep-alives skipped)."""

    async def read() -> dict[str, Any]:
        current = ""
        while line := (await events.content.readline()).decode():
            if line.startswith("event: "):
                current = line[len("event: ") :].strip()
            elif line.startswith("data: ") and current == name:
                return dict(json.loads(line[len("data: ") :]))
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(read(), 10)


async def test_sessions_revoke_one_with_its_sub_agents_then_all(
    h: Harness, provider: Provider
) -> None:
    parent = await agent_of(h, provider, scopes=["tickets.read", "agentid.delegate"], task="triage")
    child = await h.sub_delegate(parent.token)
    other = await agent_of(h, provider, scopes=["tickets.read"], task="<b>bold</b>")
    async with browser() as session:
        await sign_in(session, h, "alice", provider.users["alice"]["password"])
        status, page, _ = await get(session, h, "/console/sessions")
        assert status == 200
        for listed in (parent, child, other):
            assert f'data-session-id="{listed.session_id}"' in page
        assert f'data-session-id="{child.session_id}" data-testid="session" data-depth="1"' in page
        assert "&lt;b&gt;bold&lt;/b&gt;" in page
        form = {"csrf_token": me(h).csrf_token, "session_id": parent.session_id}
        status, page, _ = await post(session, h, "/console/sessions/revoke", form)
        assert status == 200, page
        assert 'data-revoked="2"' in page
        for revoked in (parent, child):
            response = await h.check(revoked.token, "tickets.read", "ticket/1")
            assert (response.decision, response.reason) == (
                pb.DECISION_DENY,
                pb.REASON_SESSION_REVOKED,
            )
        assert (await h.check(other.token, "tickets.read")).decision == pb.DECISION_ALLOW
        _, page, _ = await get(session, h, "/console/sessions")
        assert parent.session_id not in page
        form = {"csrf_token": me(h).csrf_token}
        status, page, _ = await post(session, h, "/console/sessions/revoke-all", form)
        assert 'data-revoked="1"' in page
        response = await h.check(other.token, "tickets.read")
        assert (response.decision, response.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
        _, page, _ = await get(session, h, "/console/sessions")
        assert 'data-testid="no-sessions"' in page


async def test_activity_shows_what_my_agents_did_only(h: Harness, provider: Provider) -> None:
    mine = await agent_of(h, provider)
    bobs = await agent_of(h, provider, "bob")
    await transfer(h, mine.token)
    await h.check(bobs.token, "tickets.read", "ticket/1")
    async with browser() as session:
        await sign_in(session, h, "alice", provider.users["alice"]["password"])
        status, page, _ = await get(session, h, "/console/activity")
        assert status == 200
        assert mine.session_id in page
        assert "STEP_UP_REQUIRED" in page
        assert bobs.session_id not in page
        status, page, _ = await get(session, h, "/console/activity?hours=1&after=99999")
        assert 'data-testid="no-records"' in page


async def test_an_expired_console_session_is_sent_to_sign_in_and_approves_nothing(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    agent = await agent_of(h, provider)
    asked = await step_up(h, agent.token)
    async with browser() as session:
        await sign_in_with_mfa(session, h, provider)
        csrf = me(h).csrf_token
        clock.advance(SESSION_TTL)
        for path in ("/console/step-ups", "/console/sessions", "/console/activity"):
            status, _, headers = await get(session, h, path)
            assert status == 302
            location = urlsplit(headers["Location"])
            assert (location.path, parse_qs(location.query)) == ("/console/login", {"next": [path]})
        form = {"csrf_token": csrf, "step_up_id": asked.id, "decision": "approve"}
        status, page, headers = await post(session, h, "/console/step-ups/resolve", form)
        assert (status, headers["X-Agentid-Reason"]) == (401, "SIGNED_OUT")
        assert "Nothing was done" in page
    clock.advance(-SESSION_TTL)
    assert (await transfer(h, agent.token)).decision == pb.DECISION_STEP_UP_REQUIRED


async def test_security_headers_on_every_console_answer(h: Harness, provider: Provider) -> None:
    async with browser() as session:
        await sign_in(session, h, "alice", provider.users["alice"]["password"])
        paths = ["/console/", "/console/step-ups", "/console/sessions", "/console/activity",
                 "/console/static/console.js", "/console/nowhere", "/console/login"]  # fmt: skip
        for path in paths:
            _, _, headers = await get(session, h, path)
            csp = headers["Content-Security-Policy"]
            assert "default-src 'self'; script-src 'self'; style-src 'self'" in csp
            assert "frame-ancestors 'none'; base-uri 'none'" in csp
            assert f"form-action 'self' {provider.issuer}" in csp
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["Cache-Control"] == "no-store"
        status, script, headers = await get(session, h, "/console/static/console.js")
        assert status == 200
        assert headers["Content-Type"].startswith("text/javascript")
        assert "EventSource" in script
        _, page, _ = await get(session, h, "/console/")
        assert "Signed in as <strong>alice</strong>" in page
        assert "<script>" not in page  # nothing inline
        assert "style=" not in page

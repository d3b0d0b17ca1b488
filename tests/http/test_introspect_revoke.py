"""POST /oauth2/introspect (RFC 7662) and POST /oauth2/revoke (RFC 7009): the revocation set
Check reads, the Revoker gRPC Revoke uses (durable, pushed to watchers, audited)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.app import CannotListen, build_server

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    ISSUER,
    OTHER_AUDIENCE_KEY,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    make_settings,
)
from tests.http.helpers import claims_of, post_form


async def introspect(
    h: Harness, token: str, authorization: str = f"Bearer {CHECK_KEY}"
) -> tuple[int, dict[str, object], object]:
    headers = {"Authorization": authorization} if authorization else {}
    return await post_form(h, "/oauth2/introspect", {"token": token}, headers)


async def test_an_active_token_shows_its_claims(harness: Harness) -> None:
    delegated = await harness.delegate(scopes=["tickets.read"], audiences=["payments-api"])
    status, body, headers = await introspect(harness, delegated.token)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    claims = claims_of(delegated.token)
    assert body == {
        "active": True, "iss": ISSUER, "sub": "alice", "act": claims["act"],
        "aud": ["payments-api"], "scope": "tickets.read", "client_id": "support-bot",
        "exp": claims["exp"], "iat": claims["iat"], "nbf": claims["nbf"], "jti": claims["jti"],
        "sn": claims["sn"], "token_type": "Bearer",
    }  # fmt: skip
    basic = base64.b64encode(f"payments-api:{CHECK_KEY}".encode()).decode()
    assert (await introspect(harness, delegated.token, f"Basic {basic}"))[1] == body


async def test_anything_not_currently_valid_is_only_inactive(harness: Harness) -> None:
    revoked = await harness.delegate()
    await harness.stub.Revoke(
        pb.RevokeRequest(session_id=revoked.session_id), metadata=bearer(ADMIN_KEY)
    )
    other_audience = await harness.delegate(audiences=["payments-api"])
    expiring = await harness.delegate()
    live = await harness.delegate()
    tampered = live.token[:-4] + ("AAAA" if not live.token.endswith("AAAA") else "BBBB")
    for token in (revoked.token, tampered, "garbage", "a.b.c", harness.idp.token()):
        assert (await introspect(harness, token))[1] == {"active": False}
    assert (await introspect(harness, other_audience.token, f"Bearer {OTHER_AUDIENCE_KEY}"))[1] == {
        "active": False
    }
    harness.clock.advance(901)
    assert (await introspect(harness, expiring.token))[1] == {"active": False}


async def test_an_answer_once_active_is_decided_anew_on_every_call(harness: Harness) -> None:
    """The active answer is kept serialized per token; whether the token is active is not: a
    token introspected active, then revoked, expired or asked by another audience's service is
    inactive at once."""
    revoked, expiring = await harness.delegate(), await harness.delegate()
    scoped = await harness.delegate(audiences=["payments-api"])
    for delegated in (revoked, expiring, scoped):
        assert (await introspect(harness, delegated.token))[1]["active"] is True
    await harness.stub.Revoke(
        pb.RevokeRequest(session_id=revoked.session_id), metadata=bearer(ADMIN_KEY)
    )
    assert (await introspect(harness, revoked.token))[1] == {"active": False}
    assert (await introspect(harness, scoped.token, f"Bearer {OTHER_AUDIENCE_KEY}"))[1] == {
        "active": False
    }
    harness.clock.advance(901)
    assert (await introspect(harness, expiring.token))[1] == {"active": False}


async def test_introspection_callers(harness: Harness) -> None:
    token = (await harness.delegate()).token
    status, body, headers = await introspect(harness, token, "")
    assert (status, body["error"]) == (401, "invalid_client")
    assert "Bearer" in headers["WWW-Authenticate"]
    assert (await introspect(harness, token, "Bearer not-a-key"))[0] == 401
    assert (await introspect(harness, token, f"Bearer {token}"))[0] == 401  # a token is no key
    wrong_name = base64.b64encode(f"ops:{CHECK_KEY}".encode()).decode()
    assert (await introspect(harness, token, f"Basic {wrong_name}"))[0] == 401
    status, body, _ = await introspect(harness, token, f"Bearer {WATCH_KEY}")
    assert (status, body["error"]) == (403, "unauthorized_client")
    assert (await introspect(harness, token, f"Bearer {ADMIN_KEY}"))[0] == 200  # admin: all


async def test_revocation_is_revoke(harness: Harness) -> None:
    parent = await harness.delegate(scopes=["tickets.read", "agentid.delegate"])
    child = await harness.sub_delegate(parent.token)
    watch = harness.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(WATCH_KEY))
    events = aiter(watch)
    assert (await anext(events)).HasField("snapshot")
    # The parent's agent revokes its sub-agent's token (an ancestor), as a public client.
    status, body, headers = await post_form(
        harness, "/oauth2/revoke", {"token": child.token, "client_id": "support-bot"}
    )
    assert (status, body) == (200, {})
    assert headers["Cache-Control"] == "no-store"
    check = await harness.check(child.token, "tickets.read")
    assert (check.decision, check.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    pushed = await asyncio.wait_for(anext(events), 5)
    assert pushed.event.session_id == child.session_id
    watch.cancel()
    stream = harness.stub.Audit(
        pb.AuditRequest(event_types=[pb.EVENT_TYPE_REVOKE]), metadata=bearer(ADMIN_KEY)
    )
    [record] = [r.record async for r in stream]
    assert record.session_id == child.session_id
    assert "support-bot" in record.detail
    # Its own session, by its own agent; the parent keeps working.
    assert (await harness.check(parent.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_revocation_answers_200_for_what_cannot_be_revoked(harness: Harness) -> None:
    token = (await harness.delegate()).token
    for garbage in ("garbage", "a.b.c", token[:-4] + "AAAA", harness.idp.token()):
        status, _, _ = await post_form(
            harness, "/oauth2/revoke", {"token": garbage, "client_id": "support-bot"}
        )
        assert status == 200
    for _ in range(2):  # revoked, then already revoked
        status, _, _ = await post_form(
            harness, "/oauth2/revoke", {"token": token, "client_id": "support-bot"}
        )
        assert status == 200
    stream = harness.stub.Audit(
        pb.AuditRequest(event_types=[pb.EVENT_TYPE_REVOKE]), metadata=bearer(ADMIN_KEY)
    )
    assert len([r async for r in stream]) == 1


async def test_revocation_clients(harness: Harness) -> None:
    token = (await harness.delegate()).token
    for form in ({"token": token}, {"token": token, "client_id": "nobody-bot"}):
        status, body, _ = await post_form(harness, "/oauth2/revoke", form)
        assert (status, body["error"]) == (401, "invalid_client")
    # Another registered agent, neither the token's nor an ancestor's.
    status, body, _ = await post_form(
        harness, "/oauth2/revoke", {"token": token, "client_id": "sub-bot"}
    )
    assert (status, body["error"]) == (400, "unauthorized_client")
    assert (await harness.check(token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_a_taken_http_address_stops_the_start(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, harness: Harness
) -> None:
    def same_http_port(config: dict[str, Any]) -> None:
        config["http"] = {"listen": f"127.0.0.1:{harness.running.http_port}"}
        config["database"] = {"url": f"sqlite+aiosqlite:///{tmp_path / 'second.db'}"}

    with pytest.raises(CannotListen, match=r"http\.listen"):
        await build_server(make_settings(tmp_path, idp, same_http_port), clock=clock)
    assert (await harness.delegate()).token  # the first one still serves

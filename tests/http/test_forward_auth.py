"""Forward auth (`/authz/forward`, http.md "Gateways") over real HTTP against a running server:
each answer with a matched route is a Check (same decision, reason and audit record), the status
and headers of the table, routes matched first-wins per gateway service, and requests read
strictly: what a lenient parse would let through is denied. The real gateways (nginx, Caddy) in
front of it are tests/gateways/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.config import ConfigError
from agentid_server.tokens.jwk import public_jwk, thumbprint
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    OTHER_AUDIENCE_KEY,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    make_settings,
    running_harness,
)
from tests.http.helpers import dpop_proof

ROUTES = [
    {"service": "payments-api", "method": "GET", "path": "/tickets/{id}", "action": "tickets.read", "resource": "ticket/{id}"},
    {"service": "payments-api", "method": "*", "path": "/tickets/{id}/comments", "action": "tickets.comment", "resource": "ticket/{id}"},
    {"service": "payments-api", "method": "POST", "path": "/accounts/{account}/transfers", "action": "payments.transfer", "resource": "account/{account}"},
    {"service": "payments-api", "method": "GET", "path": "/files/{path...}", "action": "tickets.read", "resource": "file/{path}"},
    {"service": "payments-api", "method": "GET", "path": "/", "action": "tickets.read"},
    {"service": "crm-api", "method": "GET", "path": "/tickets/{id}", "action": "tickets.delete", "resource": "ticket/{id}"},
]  # fmt: skip
RULES = [
    {
        "name": "large-transfer",
        "action": "payments.transfer",
        "when": "double(context.amount) > 1000.0 && context.method == 'POST'",
    }
]


def gateway_config(config: dict[str, Any]) -> None:
    config["routes"] = ROUTES
    config["risk"] = RULES


@pytest.fixture
async def h(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path, idp, clock, mutate=gateway_config) as harness:
        yield harness


async def forward(
    h: Harness,
    method: str = "GET",
    uri: str = "/tickets/42",
    token: str | None = None,
    key: str | None = CHECK_KEY,
    scheme: str = "Bearer",
    extra: list[tuple[str, str]] | None = None,
    convention: str = "X-Forwarded",
) -> tuple[int, dict[str, str]]:
    headers: list[tuple[str, str]] = []
    if key is not None:
        headers.append(("X-Agentid-Key", key))
    if token is not None:
        headers.append(("Authorization", f"{scheme} {token}"))
    if convention == "X-Forwarded":
        headers += [("X-Forwarded-Method", method), ("X-Forwarded-Uri", uri)]
    elif convention == "X-Original":
        headers += [("X-Original-Method", method), ("X-Original-URI", uri)]
    headers += extra or []
    async with (
        aiohttp.ClientSession() as session,
        session.get(h.http_url + "/authz/forward", headers=headers) as response,
    ):
        assert await response.read() == b""
        return response.status, dict(response.headers)


async def records(h: Harness) -> list[pb.AuditRecord]:
    stream = h.stub.Audit(
        pb.AuditRequest(event_types=[pb.EVENT_TYPE_CHECK]), metadata=bearer(ADMIN_KEY)
    )
    return [r.record async for r in stream]


async def test_an_allowed_request_is_a_check_with_its_record(h: Harness) -> None:
    session = await h.delegate(scopes=["tickets.read:ticket/42"])
    for convention in ("X-Forwarded", "X-Original"):
        status, headers = await forward(h, token=session.token, convention=convention)
        assert status == 200
        assert headers["X-Agentid-Reason"] == "REASON_GRANTED"
        assert headers["X-Agentid-Session-Id"] == session.session_id
        assert headers["X-Agentid-User-Id"] == "alice"
        assert headers["X-Agentid-Agent-Id"] == "support-bot"
        record = (await records(h))[-1]
        assert str(record.id) == headers["X-Agentid-Decision-Id"]
        assert (record.action, record.resource, record.actor_id) == (
            "tickets.read",
            "ticket/42",
            "payments-api",
        )
        assert record.decision == pb.DECISION_ALLOW
    # The same question over gRPC gets the same decision.
    grpc_answer = await h.check(session.token, "tickets.read", "ticket/42")
    assert grpc_answer.decision == pb.DECISION_ALLOW


async def test_denials_carry_the_status_and_headers_of_the_table(h: Harness) -> None:
    narrow = await h.delegate(scopes=["tickets.read:ticket/7"])
    status, headers = await forward(h)  # no token at all
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    status, headers = await forward(h, token="not-a-jwt")
    assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer error="invalid_token"')
    assert headers["X-Agentid-Reason"] == "REASON_TOKEN_MALFORMED"
    status, headers = await forward(h, token=narrow.token)  # ticket/42 is not granted
    assert (status, headers["WWW-Authenticate"]) == (403, 'Bearer error="insufficient_scope"')
    assert headers["X-Agentid-Reason"] == "REASON_SCOPE_NOT_GRANTED"
    # Revoked: the next request is refused.
    await h.stub.Revoke(pb.RevokeRequest(session_id=narrow.session_id), metadata=bearer(ADMIN_KEY))
    status, headers = await forward(h, uri="/tickets/7", token=narrow.token)
    assert (status, headers["X-Agentid-Reason"]) == (401, "REASON_SESSION_REVOKED")
    # Audience: the crm gateway's route, a token for payments only.
    only_payments = await h.delegate(scopes=["tickets.*"], audiences=["payments"])
    status, headers = await forward(h, token=only_payments.token, key=OTHER_AUDIENCE_KEY)
    assert (status, headers["X-Agentid-Reason"]) == (403, "REASON_AUDIENCE_MISMATCH")
    assert "WWW-Authenticate" not in headers


async def test_step_up_required_names_the_rule_and_risk_rules_see_strings(h: Harness) -> None:
    session = await h.delegate(scopes=["payments.transfer"])
    uri = "/accounts/acc-9/transfers?amount=2500&amount=5000"  # the last value wins
    status, headers = await forward(h, "POST", uri, token=session.token)
    assert status == 403
    assert headers["X-Agentid-Decision"] == "STEP_UP_REQUIRED"
    assert headers["X-Agentid-Risk-Rule"] == "large-transfer"
    record = (await records(h))[-1]
    assert dict(record.context) == {"amount": "5000", "account": "acc-9", "method": "POST"}
    status, _ = await forward(h, "POST", "/accounts/acc-9/transfers?amount=10", token=session.token)
    assert status == 200
    # A query parameter never overrides the path's.
    status, _ = await forward(
        h, "POST", "/accounts/acc-9/transfers?account=other&amount=1", token=session.token
    )
    assert status == 200
    assert (await records(h))[-1].resource == "account/acc-9"


async def test_routes_are_matched_first_wins_per_gateway(h: Harness) -> None:
    session = await h.delegate(scopes=["tickets.*"])
    assert (await forward(h, "GET", "/tickets/42/comments", token=session.token))[0] == 200
    assert (await forward(h, "DELETE", "/tickets/42/comments", token=session.token))[0] == 200
    assert (await forward(h, "GET", "/files/a/b/c.txt", token=session.token))[0] == 200
    assert (await records(h))[-1].resource == "file/a/b/c.txt"
    assert (await forward(h, "GET", "/", token=session.token))[0] == 200
    before = len(await records(h))
    for method, uri in (
        ("DELETE", "/tickets/42"),
        ("GET", "/accounts/1/transfers"),
        ("GET", "/nope"),
    ):
        status, headers = await forward(h, method, uri, token=session.token)
        assert (status, headers["X-Agentid-Reason"]) == (403, "ROUTE_NOT_FOUND")
    assert len(await records(h)) == before  # no route: no Check, nothing audited
    # The crm gateway's route for the same path is its own (tickets.delete).
    status, headers = await forward(h, token=session.token, key=OTHER_AUDIENCE_KEY)
    assert (await records(h))[-1].action == "tickets.delete"


async def test_the_gateways_key_is_required_and_must_have_role_check(h: Harness) -> None:
    session = await h.delegate(scopes=["tickets.read"])
    before = len(await records(h))
    for key in (None, "", "not-a-key"):
        status, headers = await forward(h, token=session.token, key=key)
        assert (status, headers["X-Agentid-Reason"]) == (401, "UNAUTHENTICATED")
    status, headers = await forward(h, token=session.token, key=WATCH_KEY)
    assert (status, headers["X-Agentid-Reason"]) == (403, "CALLER_NOT_ALLOWED")
    # The agent's own token is not a gateway's key.
    status, _ = await forward(h, token=session.token, key=session.token)
    assert status == 401
    assert len(await records(h)) == before


@pytest.mark.parametrize(
    "uri",
    [
        "/tickets/../tickets/42",
        "/tickets/%2e%2e/42",
        "/tickets/./42",
        "/tickets/4%2F2",
        "/tickets/4%2f2",
        "/tickets/4%5C2",
        "//tickets/42",
        "/tickets//42",
        "/tickets/42/",
        "/tickets/%ff",
        "/tickets/%00",
        "/tickets/4%2",
        "/tickets/%zz",
        "tickets/42",
        "/tickets/42#frag",
        "/tickets/" + "x" * 5000,
        "/tickets/42?q=%ff",
        "/tickets/42?q=%0d%0a",
    ],
)
async def test_uris_a_lenient_parse_would_pass_are_denied(h: Harness, uri: str) -> None:
    session = await h.delegate(scopes=["tickets.*"])
    status, headers = await forward(h, uri=uri, token=session.token)
    assert (status, headers["X-Agentid-Reason"]) == (403, "ROUTE_NOT_FOUND")


async def test_ambiguous_or_missing_forwarded_headers_are_denied(h: Harness) -> None:
    session = await h.delegate(scopes=["tickets.*"])
    cases: list[tuple[str, list[tuple[str, str]]]] = [
        ("none", []),
        ("method only", [("X-Forwarded-Method", "GET")]),
        ("uri only", [("X-Forwarded-Uri", "/tickets/42")]),
        ("conflicting uris", [("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/tickets/42"), ("X-Original-URI", "/tickets/7")]),
        ("conflicting methods", [("X-Forwarded-Method", "GET"), ("X-Original-Method", "DELETE"), ("X-Forwarded-Uri", "/tickets/42")]),
        ("uri twice", [("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/tickets/42"), ("X-Forwarded-Uri", "/tickets/7")]),
    ]  # fmt: skip
    for name, extra in cases:
        status, headers = await forward(h, token=session.token, extra=extra, convention="")
        assert (status, headers["X-Agentid-Reason"]) == (403, "ROUTE_NOT_FOUND"), name
    # Both conventions naming the same request are one request.
    agreeing = [("X-Original-Method", "GET"), ("X-Original-URI", "/tickets/42")]
    assert (await forward(h, token=session.token, extra=agreeing))[0] == 200


async def test_only_the_authorization_header_carries_the_token(h: Harness) -> None:
    session = await h.delegate(scopes=["tickets.*"])
    status, headers = await forward(h, uri=f"/tickets/42?access_token={session.token}")
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    for value in (f"Basic {session.token}", f"Bearer {session.token} extra", "Bearer"):
        status, headers = await forward(h, extra=[("Authorization", value)])
        assert (status, headers["X-Agentid-Reason"]) == (401, "REASON_TOKEN_MALFORMED"), value
    twice = [("Authorization", f"Bearer {session.token}")] * 2
    assert (await forward(h, extra=twice))[0] == 401
    assert (await forward(h, token=session.token, scheme="bearer"))[0] == 200


async def test_a_dpop_bound_token_needs_its_proof_for_the_original_url(h: Harness) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    session = await h.delegate(
        scopes=["payments.transfer"], jkt=thumbprint(public_jwk(key.public_key()))
    )
    uri = "/accounts/acc-1/transfers?amount=5"
    url = "https://pay.example/accounts/acc-1/transfers"
    origin = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "pay.example")]
    proof = dpop_proof(key, url, session.token)
    status, headers = await forward(
        h, "POST", uri, token=session.token, scheme="DPoP", extra=[*origin, ("DPoP", proof)]
    )
    assert (status, headers["X-Agentid-Reason"]) == (200, "REASON_GRANTED")
    # The same proof again, a proof for another URL, none, or the token as a bearer token.
    for scheme, extra in (
        ("DPoP", [*origin, ("DPoP", proof)]),
        ("DPoP", [*origin, ("DPoP", dpop_proof(key, "https://other.example/x", session.token))]),
        ("DPoP", origin),
        ("Bearer", origin),
    ):
        status, headers = await forward(
            h, "POST", uri, token=session.token, scheme=scheme, extra=extra
        )
        assert (status, headers["X-Agentid-Reason"]) == (401, "REASON_PROOF_OF_POSSESSION_FAILED")


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ({"path": "tickets/{id}"}, "must begin with /"),
        ({"path": "/tickets//{id}"}, "empty segment"),
        ({"path": "/tickets/{id}/{id}"}, "twice"),
        ({"path": "/files/{p...}/x"}, "last segment"),
        ({"path": "/t/x{id}"}, "a literal or one"),
        ({"path": "/t/{1id}"}, "not a name"),
        ({"resource": "ticket/{nope}"}, "which the path does not"),
        ({"resource": "ticket/{id"}, "without }"),
        ({"method": "FETCH"}, "not an HTTP method"),
        ({"action": "Tickets.Read"}, "action"),
        ({"service": "watcher"}, "with role check"),
        ({"service": "nobody"}, "with role check"),
    ],
)
def test_a_bad_route_stops_the_start_naming_it(
    tmp_path: Path, idp: IdpFixture, route: dict[str, str], problem: str
) -> None:
    def mutate(config: dict[str, Any]) -> None:
        base = {"service": "payments-api", "method": "GET", "path": "/tickets/{id}", "action": "tickets.read", "resource": "ticket/{id}"}  # fmt: skip
        config["routes"] = [ROUTES[0], {**base, **route}]

    with pytest.raises(ConfigError) as caught:
        make_settings(tmp_path, idp, mutate)
    assert caught.value.key.startswith("routes[1].")
    assert problem in caught.value.problem

"""Envoy's external authorization v3 (`envoy.service.auth.v3.Authorization/Check`, http.md
"Gateways") over real gRPC, against a server on port 0. No Envoy binary runs here: the client is
Envoy's own published stubs (`xds-protos`), sending the CheckRequest Envoy's `ext_authz` filter
sends (the request's method, path with query, host, scheme and lower-case headers, pseudo-headers
included) with the gateway's key in the `authorization` metadata (`initial_metadata`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.tokens.jwk import public_jwk, thumbprint
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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
)
from tests.security.test_proof_of_possession import proof

SERVICE = "envoy.service.auth.v3.Authorization"
ROUTES = [
    {"service": "payments-api", "method": "GET", "path": "/tickets/{id}",
     "action": "tickets.read", "resource": "tickets/{id}"},
    {"service": "payments-api", "method": "DELETE", "path": "/tickets/{id}",
     "action": "tickets.delete", "resource": "tickets/{id}"},
    {"service": "payments-api", "method": "POST", "path": "/accounts/{account}/transfers",
     "action": "payments.transfer", "resource": "accounts/{account}"},
]  # fmt: skip
RULES = [
    {"name": "large-transfer", "action": "payments.transfer",
     "when": "double(context.amount) > 1000.0"},
]  # fmt: skip
HOST = "payments.example"
OK, UNAUTHENTICATED, PERMISSION_DENIED = 0, 16, 7
OWN = ("X-Agentid-Session-Id", "X-Agentid-User-Id", "X-Agentid-Agent-Id", "X-Agentid-Decision-Id")


@pytest.fixture
async def h(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Harness]:
    def gateway(config: dict[str, Any]) -> None:
        config["routes"] = ROUTES
        config["risk"] = RULES

    async with running_harness(tmp_path, idp, clock, mutate=gateway) as harness:
        yield harness


def envoy_request(
    method: str,
    path: str,
    authorization: str | None = None,
    *,
    scheme: str = "https",
    raw: list[tuple[str, str]] | None = None,
    **headers: str,
) -> CheckRequest:
    """The CheckRequest Envoy's ext_authz filter sends for ``method path`` (headers lower case,
    pseudo-headers among them, a repeated header's values joined by commas); with ``raw``, the
    headers one by one in `header_map`, as with `encode_raw_headers: true`."""
    sent = {":method": method, ":path": path, ":authority": HOST, ":scheme": scheme}
    sent["user-agent"] = "curl/8"
    if authorization is not None:
        sent["authorization"] = authorization
    sent.update({name.replace("_", "-"): value for name, value in headers.items()})
    http = AttributeContext.HttpRequest(
        id="42", method=method, path=path, host=HOST, scheme=scheme, protocol="HTTP/1.1"
    )
    if raw is None:
        http.headers.update(sent)
    else:
        pairs = [*sent.items(), *raw]
        http.header_map.CopyFrom(
            HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
        )
    return CheckRequest(attributes=AttributeContext(request=AttributeContext.Request(http=http)))


async def ask(h: Harness, request: CheckRequest, key: str = CHECK_KEY) -> CheckResponse:
    stub = external_auth_pb2_grpc.AuthorizationStub(h.channel)
    response: CheckResponse = await stub.Check(request, metadata=bearer(key), timeout=10)
    return response


def headers(options: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for option in options:
        assert option.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        found[option.header.key] = option.header.value
    return found


def denied(response: CheckResponse) -> tuple[int, int, dict[str, str]]:
    """(gRPC status code, HTTP status, headers) of a denial."""
    assert response.WhichOneof("http_response") == "denied_response"
    http = response.denied_response
    return response.status.code, http.status.code, headers(http.headers)


async def agent(h: Harness, scopes: list[str], **fields: Any) -> pb.DelegateResponse:
    user = h.idp.token(scope="tickets.* payments.*")
    return await h.delegate(user, scopes=scopes, **fields)


async def test_an_allowed_request_goes_on_with_the_agentid_headers(h: Harness) -> None:
    session = await agent(h, ["tickets.read"])
    forged = {"x_agentid_user_id": "mallory", "x_agentid_risk_rule": "none"}
    response = await ask(
        h, envoy_request("GET", "/tickets/7?x=1", f"Bearer {session.token}", **forged)
    )
    assert response.status.code == OK
    assert response.WhichOneof("http_response") == "ok_response"
    added = headers(response.ok_response.headers)
    assert added["X-Agentid-Reason"] == "REASON_GRANTED"
    assert added["X-Agentid-Session-Id"] == session.session_id
    assert added["X-Agentid-Agent-Id"] == "support-bot"
    assert added["X-Agentid-User-Id"] == "alice"  # overwrites what the client sent
    assert set(OWN) <= set(added)
    # The client's other X-Agentid-* headers never reach the service as if agentid said them.
    assert list(response.ok_response.headers_to_remove) == ["x-agentid-risk-rule"]

    # The answer is a Check: its audit record is the one named, with the route's action/resource.
    stream = h.stub.Audit(
        pb.AuditRequest(session_id=session.session_id, event_types=[pb.EVENT_TYPE_CHECK]),
        metadata=bearer(ADMIN_KEY),
    )
    records = [r.record async for r in stream]
    assert [r.id for r in records] == [int(added["X-Agentid-Decision-Id"])]
    assert (records[0].action, records[0].resource) == ("tickets.read", "tickets/7")


async def test_denials_carry_the_tables_status_and_headers(h: Harness) -> None:
    reader = await agent(h, ["tickets.read"])
    payer = await agent(h, ["payments.transfer"])
    await h.stub.Revoke(
        pb.RevokeRequest(session_id=payer.session_id), metadata=bearer(h.idp.token())
    )
    payer2 = await agent(h, ["payments.transfer"])

    status, http, sent = denied(await ask(h, envoy_request("GET", "/tickets/7")))
    assert (status, http) == (UNAUTHENTICATED, 401)
    assert sent == {"WWW-Authenticate": "Bearer", "X-Agentid-Reason": "REASON_TOKEN_MALFORMED"}

    for authorization, reason in (
        ("Bearer not-a-token", "REASON_TOKEN_MALFORMED"),
        ("Basic dXNlcjpwYXNz", "REASON_TOKEN_MALFORMED"),
        (f"Bearer {reader.token} {reader.token}", "REASON_TOKEN_MALFORMED"),
    ):
        status, http, sent = denied(await ask(h, envoy_request("GET", "/tickets/7", authorization)))
        assert (status, http) == (UNAUTHENTICATED, 401), authorization[:12]
        assert sent["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert sent["X-Agentid-Reason"] == reason

    revoked = envoy_request("POST", "/accounts/a1/transfers", f"Bearer {payer.token}")
    status, http, sent = denied(await ask(h, revoked))
    assert (status, http, sent["X-Agentid-Reason"]) == (
        UNAUTHENTICATED,
        401,
        "REASON_SESSION_REVOKED",
    )
    assert sent["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert sent["X-Agentid-Decision-Id"]

    scope = envoy_request("DELETE", "/tickets/7", f"Bearer {reader.token}")
    status, http, sent = denied(await ask(h, scope))
    assert (status, http, sent["X-Agentid-Reason"]) == (
        PERMISSION_DENIED,
        403,
        "REASON_SCOPE_NOT_GRANTED",
    )
    assert sent["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'

    big = envoy_request("POST", "/accounts/a1/transfers?amount=5000", f"Bearer {payer2.token}")
    status, http, sent = denied(await ask(h, big))
    assert (status, http) == (PERMISSION_DENIED, 403)
    assert sent["X-Agentid-Decision"] == "STEP_UP_REQUIRED"
    assert sent["X-Agentid-Risk-Rule"] == "large-transfer"
    small = envoy_request("POST", "/accounts/a1/transfers?amount=5", f"Bearer {payer2.token}")
    assert (await ask(h, small)).status.code == OK

    for method, path in (
        ("GET", "/invoices/7"),  # no route
        ("PUT", "/tickets/7"),  # a method outside the routes
        ("GET", "/tickets/7/../8"),
        ("GET", "/tickets/a%2Fb"),
        ("GET", "//tickets/7"),
        ("GET", "/tickets/%ff"),
        ("GET", "/tickets/" + "x" * 5000),
        ("", "/tickets/7"),
        ("GET", ""),
    ):
        request = envoy_request(method, path, f"Bearer {reader.token}")
        status, http, sent = denied(await ask(h, request))
        assert (status, http, sent) == (
            PERMISSION_DENIED,
            403,
            {"X-Agentid-Reason": "ROUTE_NOT_FOUND"},
        ), (method, path[:40])


async def test_a_token_in_the_query_or_sent_twice_is_not_read(h: Harness) -> None:
    session = await agent(h, ["tickets.read"])
    in_query = envoy_request("GET", f"/tickets/7?access_token={session.token}")
    assert denied(await ask(h, in_query))[:2] == (UNAUTHENTICATED, 401)
    # Envoy joins a repeated header with commas in `headers`; `header_map` keeps each.
    twice = envoy_request(
        "GET", "/tickets/7", raw=[("authorization", f"Bearer {session.token}")] * 2
    )
    assert denied(await ask(h, twice))[:2] == (UNAUTHENTICATED, 401)
    once = envoy_request("GET", "/tickets/7", raw=[("authorization", f"Bearer {session.token}")])
    assert (await ask(h, once)).status.code == OK


async def test_a_dpop_bound_token_needs_a_proof_for_the_original_url(h: Harness) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    session = await agent(h, ["payments.transfer"], jkt=thumbprint(public_jwk(key.public_key())))
    token = session.token
    url = f"https://{HOST}/accounts/a1/transfers"

    def request(pop: str | None, **headers: str) -> CheckRequest:
        extra = {"dpop": pop} if pop is not None else {}
        return envoy_request(
            "POST", "/accounts/a1/transfers?amount=5", f"DPoP {token}", **extra, **headers
        )

    good = await ask(h, request(proof(key, token, htu=url)))
    assert good.status.code == OK, denied(good)
    # Behind a proxy that ended TLS, Envoy's scheme is http; X-Forwarded-Proto says https.
    behind = envoy_request(
        "POST",
        "/accounts/a1/transfers?amount=5",
        f"DPoP {token}",
        scheme="http",
        dpop=proof(key, token, htu=url),
        x_forwarded_proto="https",
    )
    assert (await ask(h, behind)).status.code == OK
    for pop in (
        None,
        proof(key, token, htu=f"https://{HOST}/accounts/a2/transfers"),
        proof(key, token, htu=url, htm="GET"),
        proof(ec.generate_private_key(ec.SECP256R1()), token, htu=url),
        proof(key, token, htu=url, iat=int(time.time()) - 3600),
    ):
        status, http, sent = denied(await ask(h, request(pop)))
        assert (status, http) == (UNAUTHENTICATED, 401)
        assert sent["X-Agentid-Reason"] == "REASON_PROOF_OF_POSSESSION_FAILED"
    as_bearer = envoy_request(
        "POST", "/accounts/a1/transfers", f"Bearer {token}", dpop=proof(key, token, htu=url)
    )
    assert denied(await ask(h, as_bearer))[:2] == (UNAUTHENTICATED, 401)


async def test_the_gateway_must_be_a_service_with_role_check(h: Harness) -> None:
    session = await agent(h, ["tickets.read"])
    request = envoy_request("GET", "/tickets/7", f"Bearer {session.token}")
    stub = external_auth_pb2_grpc.AuthorizationStub(h.channel)
    for metadata, code, reason in (
        ((), grpc.StatusCode.UNAUTHENTICATED, None),
        (bearer("not-a-known-key-0123456789"), grpc.StatusCode.UNAUTHENTICATED, None),
        (bearer(WATCH_KEY), grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED"),
        (bearer(session.token), grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(request, metadata=metadata, timeout=10)
        assert caught.value.code() == code
        if reason is not None:
            assert error_info(caught.value).reason == reason
    # Nothing was checked or audited for those calls.
    stream = h.stub.Audit(
        pb.AuditRequest(session_id=session.session_id, event_types=[pb.EVENT_TYPE_CHECK]),
        metadata=bearer(ADMIN_KEY),
    )
    assert [r async for r in stream] == []


async def test_health_names_the_service(h: Harness) -> None:
    """Envoy's cluster health check (`grpc_health_check: {service_name: ...}`) may ask for it."""
    stub = health_pb2_grpc.HealthStub(h.channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(h: Harness) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{SERVICE}.Check"),
    ]
    answers = [a async for a in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in answers[0].list_services_response.service}
    assert SERVICE in names
    assert "agentid.v1.AgentIdentityService" in names
    for answer in answers[1:]:
        assert answer.WhichOneof("message_response") == "file_descriptor_response"
        assert answer.file_descriptor_response.file_descriptor_proto


async def forward(h: Harness, method: str, uri: str, authorization: str | None) -> Any:
    """The same question through /authz/forward (nginx's `auth_request`)."""
    sent = {"X-Agentid-Key": CHECK_KEY, "X-Original-Method": method, "X-Original-URI": uri}
    if authorization is not None:
        sent["Authorization"] = authorization
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{h.http_url}/authz/forward", headers=sent) as response,
    ):
        return response.status, {k: v for k, v in response.headers.items() if k in ANSWERED}


ANSWERED = {
    *OWN,
    "X-Agentid-Reason",
    "X-Agentid-Decision",
    "X-Agentid-Risk-Rule",
    "WWW-Authenticate",
}


async def test_both_doors_give_the_same_answers(h: Harness) -> None:
    """Envoy's ext_authz and /authz/forward read a request alike and answer alike (each its own
    Check: only the decision ids differ)."""
    reader = await agent(h, ["tickets.read"])
    payer = await agent(h, ["payments.transfer"])
    for method, uri, authorization in (
        ("GET", "/tickets/7", f"Bearer {reader.token}"),
        ("GET", "/tickets/7", None),
        ("GET", "/tickets/7", "Bearer not-a-token"),
        ("DELETE", "/tickets/7", f"Bearer {reader.token}"),
        ("POST", "/accounts/a1/transfers?amount=5000", f"Bearer {payer.token}"),
        ("GET", "/tickets/a%2Fb", f"Bearer {reader.token}"),
    ):
        status, sent = await forward(h, method, uri, authorization)
        response = await ask(h, envoy_request(method, uri, authorization))
        if response.status.code == OK:
            envoy = 200, headers(response.ok_response.headers)
        else:
            envoy = denied(response)[1:]
        for answer in (sent, envoy[1]):
            if "X-Agentid-Decision-Id" in answer:
                answer["X-Agentid-Decision-Id"] = "..."
        assert (status, sent) == envoy, (method, uri)

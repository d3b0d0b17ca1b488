"""nginx (`auth_request`) and Caddy (`forward_auth`) in front of a small upstream, each running
docs/gateways.md's configuration and asking agentid's `/authz/forward`: what is allowed reaches
the upstream with the `X-Agentid-*` headers, what is denied never does and the client gets the
status and headers of http.md's table. Requests go out as raw bytes, so the paths are exactly
what a client can send (an HTTP library would tidy them up first)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
from agentid.v1 import agentid_pb2 as pb
from multidict import CIMultiDict

from tests.conftest import ADMIN_KEY, Harness, bearer
from tests.gateways.conftest import Upstream
from tests.gateways.gateways import (
    DOC_KEY,
    Gateway,
    caddy_config,
    doc_block,
    nginx_config,
)


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def send(
    gateway: Gateway,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> Answer:
    """One HTTP/1.1 request written byte for byte (the target as given), its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{gateway.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(-1), 15)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    return Answer(int(status_line.split()[1]), parsed, rest)


def auth(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


async def agent(h: Harness, *scopes: str) -> pb.DelegateResponse:
    return await h.delegate(scopes=list(scopes or ("tickets.read",)))


def only(answer: Answer, name: str) -> str:
    values = answer.headers.getall(name, [])
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


# -- allowed ---------------------------------------------------------------------------------------


async def test_an_allowed_request_reaches_the_upstream_with_who_is_asking(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    session = await agent(h)
    forged = [
        ("X-Agentid-User-Id", "mallory"),
        ("X-Agentid-Session-Id", "forged"),
        ("X-Agentid-Decision-Id", "1"),
    ]
    answer = await send(gateway, "GET", "/tickets/42?view=full", [*auth(session.token), *forged])
    assert (answer.status, answer.body) == (200, b"upstream")
    [seen] = upstream.seen
    assert (seen.method, seen.target) == ("GET", "/tickets/42?view=full")
    assert seen.headers.getall("X-Agentid-Session-Id") == [session.session_id]
    assert seen.headers.getall("X-Agentid-Agent-Id") == ["support-bot"]
    [user] = seen.headers.getall("X-Agentid-User-Id")
    assert user
    assert user != "mallory"
    [decision_id] = seen.headers.getall("X-Agentid-Decision-Id")
    assert decision_id.isdigit()
    assert decision_id != "1"
    assert "X-Agentid-Key" not in seen.headers  # the gateway's key stays between it and agentid


# -- denied: never reaches the upstream ------------------------------------------------------------


async def test_no_token_is_401_bearer_and_never_reaches_the_upstream(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    answer = await send(gateway, "GET", "/tickets/42")
    assert answer.status == 401
    assert only(answer, "WWW-Authenticate") == "Bearer"
    assert only(answer, "X-Agentid-Reason") == "REASON_TOKEN_MALFORMED"
    assert upstream.seen == []


async def test_a_scope_not_granted_is_403_insufficient_scope(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    session = await agent(h, "tickets.read")
    answer = await send(
        gateway, "POST", "/accounts/A1/transfers?amount=5", auth(session.token), b"{}"
    )
    assert answer.status == 403
    assert only(answer, "WWW-Authenticate") == 'Bearer error="insufficient_scope"'
    assert only(answer, "X-Agentid-Reason") == "REASON_SCOPE_NOT_GRANTED"
    assert upstream.seen == []


async def test_a_path_no_route_names_is_403_route_not_found(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    session = await agent(h)
    for method, target in (("GET", "/admin"), ("DELETE", "/tickets/42"), ("GET", "/")):
        answer = await send(gateway, method, target, auth(session.token))
        assert answer.status == 403, target
        assert only(answer, "X-Agentid-Reason") == "ROUTE_NOT_FOUND"
        assert "WWW-Authenticate" not in answer.headers
    assert upstream.seen == []


async def test_a_revoked_token_is_refused_on_its_next_request(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    session = await agent(h)
    assert (await send(gateway, "GET", "/tickets/1", auth(session.token))).status == 200
    await h.stub.Revoke(
        pb.RevokeRequest(session_id=session.session_id, reason="test"), metadata=bearer(ADMIN_KEY)
    )
    answer = await send(gateway, "GET", "/tickets/2", auth(session.token))
    assert answer.status == 401
    assert only(answer, "WWW-Authenticate") == 'Bearer error="invalid_token"'
    assert only(answer, "X-Agentid-Reason") == "REASON_SESSION_REVOKED"
    assert [seen.target for seen in upstream.seen] == ["/tickets/1"]


async def test_a_step_up_is_403_with_the_decision_and_the_rule(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    session = await agent(h, "payments.transfer")
    big = await send(gateway, "POST", "/accounts/A1/transfers?amount=5000", auth(session.token))
    assert big.status == 403
    assert only(big, "X-Agentid-Decision") == "STEP_UP_REQUIRED"
    assert only(big, "X-Agentid-Risk-Rule") == "large-transfer"
    assert only(big, "X-Agentid-Reason") == "REASON_HIGH_RISK"
    assert upstream.seen == []
    small = await send(
        gateway, "POST", "/accounts/A1/transfers?amount=50", auth(session.token), b'{"a": 1}'
    )
    assert small.status == 200
    [seen] = upstream.seen
    assert (seen.method, seen.target) == ("POST", "/accounts/A1/transfers?amount=50")


async def test_forwarded_headers_a_client_sends_itself_change_nothing(
    gateway: Gateway, h: Harness, upstream: Upstream
) -> None:
    """A client naming another method or URI in the gateways' own headers: the gateway's value
    replaces it, or both conventions disagree and agentid denies; never allowed as named."""
    session = await agent(h)
    spoof = [
        ("X-Original-URI", "/tickets/42"),
        ("X-Forwarded-Uri", "/tickets/42"),
        ("X-Original-Method", "GET"),
        ("X-Forwarded-Method", "GET"),
    ]
    answer = await send(gateway, "DELETE", "/admin/all", [*auth(session.token), *spoof])
    assert answer.status == 403
    assert upstream.seen == []


# -- tricky paths --------------------------------------------------------------------------------

TRICKY = [
    "/tickets/x/../42",
    "/tickets/./42",
    "/tickets/%2e%2e/42",
    "/tickets/%2E%2E/42",
    "/tickets/a%2Fb",
    "/tickets/a%2fb",
    "/tickets/a%5Cb",
    "//tickets//42",
    "/tickets//42",
    "/tickets/42/",
    "/tickets/%ff",
    "/tickets/%C0%AE%C0%AE",
    "/tickets/%00",
    "/tickets/%zz",
    "/tickets/" + "a" * 5000,
]


@pytest.mark.parametrize("target", TRICKY)
async def test_tricky_paths_are_denied_and_never_reach_the_upstream(
    gateway: Gateway, h: Harness, upstream: Upstream, target: str
) -> None:
    session = await agent(h)
    answer = await send(gateway, "GET", target, auth(session.token))
    assert answer.status in (400, 403), (target, answer.status)
    if answer.status == 403:
        assert only(answer, "X-Agentid-Reason") == "ROUTE_NOT_FOUND"
    assert upstream.seen == []


# What nginx 1.22 does with each (docs/gateways.md's table): agentid judges $request_uri, the
# target as sent, which is also what proxy_pass (no URI part) passes on to the service.
NGINX_PASSES = [
    ("/tickets/../../admin", 400, None),  # above the root: nginx's own 400, before auth
    ("/tickets/x/../42", 403, "ROUTE_NOT_FOUND"),  # $uri would have been /tickets/42
    ("/tickets/%2e%2e/42", 403, "ROUTE_NOT_FOUND"),  # $uri: /42
    ("/tickets/a%2Fb", 403, "ROUTE_NOT_FOUND"),  # $uri: /tickets/a/b
    ("//tickets//42", 403, "ROUTE_NOT_FOUND"),  # $uri: /tickets/42 (merge_slashes)
    ("/tickets/%ff", 403, "ROUTE_NOT_FOUND"),  # not UTF-8
    ("/tickets/%00", 400, None),  # nginx refuses an encoded NUL itself
    ("/tickets/%zz", 400, None),  # and a malformed escape
    ("/tickets/" + "a" * 5000, 403, "ROUTE_NOT_FOUND"),  # over agentid's 4096 bytes
    ("/tickets/" + "a" * 9000, 414, None),  # over nginx's 8 KiB request line
    ("/tickets/42?access_token=QUERY", 401, "REASON_TOKEN_MALFORMED"),  # query never read
]


@pytest.mark.parametrize(("target", "status", "reason"), NGINX_PASSES)
async def test_what_nginx_passes_on_is_judged_as_sent(
    nginx: Gateway, h: Harness, upstream: Upstream, target: str, status: int, reason: str | None
) -> None:
    session = await agent(h)
    headers = [] if "access_token" in target else auth(session.token)
    if "access_token" in target:
        target = target.replace("QUERY", session.token)
    answer = await send(nginx, "GET", target, headers)
    assert answer.status == status
    assert answer.headers.get("X-Agentid-Reason") == reason
    if status == 401:
        assert only(answer, "WWW-Authenticate") == "Bearer"
    assert upstream.seen == []


async def test_nginx_forwards_request_uri_and_the_service_receives_the_same(
    nginx: Gateway, h: Harness, upstream: Upstream
) -> None:
    """The target agentid judged (X-Original-URI: $request_uri) is the one the upstream gets,
    escapes and all: a route's capture allows what the service will read."""
    session = await agent(h)
    answer = await send(nginx, "GET", "/tickets/T%2D1?q=a%20b&x=1", auth(session.token))
    assert answer.status == 200
    [seen] = upstream.seen
    assert seen.target == "/tickets/T%2D1?q=a%20b&x=1"


# -- the doc's blocks are what runs -------------------------------------------------------------


def test_the_configurations_that_run_are_the_docs(tmp_path: Path) -> None:
    nginx = doc_block("nginx")
    rendered = nginx_config(tmp_path, port=1, agentid="127.0.0.1:2", service="127.0.0.1:3", key="k")
    assert "proxy_set_header X-Original-URI $request_uri;" in nginx
    assert DOC_KEY in nginx
    assert DOC_KEY not in rendered
    # Every line of the doc's block is in the running config, but for the four replaced values.
    for line in nginx.splitlines():
        if not any(v in line for v in ("listen 80;", "127.0.0.1:8080", "127.0.0.1:3000", DOC_KEY)):
            assert line.strip() in rendered
    caddy = caddy_config(port=1, agentid="127.0.0.1:2", service="127.0.0.1:3")
    for line in doc_block("caddyfile").splitlines():
        if not any(v in line for v in (":80 {", "127.0.0.1:8080", "127.0.0.1:3000")):
            assert line.strip() in caddy

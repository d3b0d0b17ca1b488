"""Forward auth (`/authz/forward`, http.md "Gateways"): nginx `auth_request`, Traefik
`ForwardAuth` and Caddy `forward_auth` ask here before passing a request on. This adapter reads
what the gateway forwards (its key, the agent's token, the original method and URI) and hands it
to the domain's Gateway; the answer is an empty body with the status and headers it decides.

Headers are read strictly: a header the gateway sends twice, or both conventions (X-Forwarded-*
and X-Original-*) naming different values, is an ambiguous request, and matches no route. A token
in the URI's query (RFC 6750 section 2.3) is never read: only the Authorization header counts."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDictProxy

from agentid_server.domain.gateway import ROUTE_NOT_FOUND, ForwardedRequest, Gateway
from agentid_server.domain.model import Role, ServicePrincipal

FORWARD_PATH = "/authz/forward"
KEY_HEADER = "X-Agentid-Key"
_AMBIGUOUS = object()


def mount_forward(
    app: web.Application,
    gateway: Gateway,
    services: Callable[[str], ServicePrincipal | None],
) -> None:
    """Serves `/authz/forward` on every method (nginx's subrequest keeps the original one)."""

    async def forward(request: web.Request) -> web.Response:
        headers = request.headers
        key = _one(headers, KEY_HEADER)
        caller = services(key) if isinstance(key, str) and key else None
        if caller is None:
            return _answer(401, {"X-Agentid-Reason": "UNAUTHENTICATED"})
        if not caller.has_role(Role.CHECK):
            return _answer(403, {"X-Agentid-Reason": "CALLER_NOT_ALLOWED"})
        method = _either(headers, "X-Forwarded-Method", "X-Original-Method")
        uri = _either(headers, "X-Forwarded-Uri", "X-Original-URI")
        if not isinstance(method, str) or not isinstance(uri, str):
            return _answer(403, {"X-Agentid-Reason": ROUTE_NOT_FOUND})
        credentials = _credentials(headers)
        if credentials is None:
            return _answer(
                401,
                {
                    "WWW-Authenticate": 'Bearer error="invalid_token"',
                    "X-Agentid-Reason": "REASON_TOKEN_MALFORMED",
                },
            )
        scheme, token = credentials
        proof = _one(headers, "DPoP")
        answer = await gateway.decide(
            caller,
            ForwardedRequest(
                method=method,
                uri=uri,
                token=token,
                dpop=scheme == "dpop",
                proof=proof if isinstance(proof, str) else "",
                url=_url(headers, uri),
            ),
        )
        return _answer(answer.status, answer.headers)

    app.router.add_route("*", FORWARD_PATH, forward)


def _answer(status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, headers=headers)


def _one(headers: CIMultiDictProxy[str], name: str) -> str | object | None:
    """The header's value; None when absent; _AMBIGUOUS when sent more than once."""
    values = headers.getall(name, [])
    if not values:
        return None
    return values[0] if len(values) == 1 else _AMBIGUOUS


def _either(headers: CIMultiDictProxy[str], first: str, second: str) -> str | object | None:
    """One value from either convention; _AMBIGUOUS when they disagree."""
    a, b = _one(headers, first), _one(headers, second)
    if a is None:
        return b
    if b is None or a == b:
        return a
    return _AMBIGUOUS


def _credentials(headers: CIMultiDictProxy[str]) -> tuple[str, str] | None:
    """("bearer" | "dpop", token); ("", "") without an Authorization header; None when it is
    not one token in one of those schemes (sent twice, another scheme, more than one word)."""
    value = _one(headers, "Authorization")
    if value is None:
        return "", ""
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme not in ("bearer", "dpop") or not token or " " in token:
        return None
    return scheme, token


def _url(headers: CIMultiDictProxy[str], uri: str) -> str:
    """The original request's URL without its query (a DPoP proof's htu), from X-Forwarded-Proto
    and X-Forwarded-Host; empty when the gateway does not say (a proof then fails)."""
    proto, host = _one(headers, "X-Forwarded-Proto"), _one(headers, "X-Forwarded-Host")
    if not isinstance(proto, str) or not isinstance(host, str) or proto not in ("http", "https"):
        return ""
    return f"{proto}://{host}{uri.partition('?')[0]}"

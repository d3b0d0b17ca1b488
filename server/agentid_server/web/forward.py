"""Forward auth (`/authz/forward`, http.md "Gateways"): nginx `auth_request`, Traefik
`ForwardAuth` and Caddy `forward_auth` ask here before passing a request on. This adapter reads
the gateway's key and the original method and URI from either header convention (X-Forwarded-*,
X-Original-*), and hands the headers to the domain's reading of a forwarded request
(domain/gateway.py ``read_forwarded``, shared with Envoy's ext_authz) and to its Gateway; the
answer is an empty body with the status and headers it decides."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from agentid_server.domain.gateway import (
    ForwardedRequest,
    Gateway,
    either,
    one,
    read_forwarded,
    request_url,
)
from agentid_server.domain.model import Role, ServicePrincipal

FORWARD_PATH = "/authz/forward"
KEY_HEADER = "X-Agentid-Key"


def mount_forward(
    app: web.Application,
    gateway: Gateway,
    services: Callable[[str], ServicePrincipal | None],
) -> None:
    """Serves `/authz/forward` on every method (nginx's subrequest keeps the original one)."""

    async def forward(request: web.Request) -> web.Response:
        headers = request.headers

        def values(name: str) -> list[str]:
            return headers.getall(name, [])

        key = one(values, KEY_HEADER)
        caller = services(key) if isinstance(key, str) and key else None
        if caller is None:
            return _answer(401, {"X-Agentid-Reason": "UNAUTHENTICATED"})
        if not caller.has_role(Role.CHECK):
            return _answer(403, {"X-Agentid-Reason": "CALLER_NOT_ALLOWED"})
        proto, host = one(values, "X-Forwarded-Proto"), one(values, "X-Forwarded-Host")
        read = read_forwarded(
            values,
            either(values, "X-Forwarded-Method", "X-Original-Method"),
            either(values, "X-Forwarded-Uri", "X-Original-URI"),
            lambda uri: request_url(proto, host, uri),
        )
        answer = await gateway.decide(caller, read) if isinstance(read, ForwardedRequest) else read
        return _answer(answer.status, answer.headers)

    app.router.add_route("*", FORWARD_PATH, forward)


def _answer(status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, headers=headers)

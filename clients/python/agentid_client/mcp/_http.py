"""The guard's HTTP layer, in front of the SDK's app (outermost, before its authentication):
the RFC 9728 metadata, the credential of every request to the MCP endpoint judged once (a
key-bound token's proof verified and spent), and the Check of every ``tools/call`` before
the SDK's transport sees the request."""

from __future__ import annotations

import json

from mcp.server.auth.handlers.metadata import ProtectedResourceMetadataHandler
from mcp.server.auth.routes import cors_middleware
from mcp.server.transport_security import RequestBodyLimitMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentid_client.mcp._answers import challenge, refusal, unavailable
from agentid_client.mcp._guard import PRESENTED, GuardUnavailable, McpGuard, Presented, ToolCall


class GuardLayer:
    """ASGI: serves the RFC 9728 metadata (the SDK's handler, with the DPoP algorithms its own
    route leaves out); for the MCP endpoint, judges the request's credential (the SDK's bearer
    authentication then reads the verdict through the guard's verifier hook), answers the
    refusals the SDK cannot word (a key-bound token without its proof: RFC 9449's challenge;
    agentid unreachable: 503), and has agentid check every ``tools/call``."""

    def __init__(self, app: ASGIApp, guard: McpGuard, max_body_bytes: int) -> None:
        self._app = app
        self._guard = guard
        handler = ProtectedResourceMetadataHandler(guard.metadata)
        self._metadata = cors_middleware(handler.handle, ["GET", "OPTIONS"])
        # The SDK's own bounded body reader (413 beyond the bound), then the Check.
        self._post = RequestBodyLimitMiddleware(self._check, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else None
        if path == self._guard.metadata_path:
            await self._metadata(scope, receive, send)
            return
        presented = _presented(HTTPConnection(scope)) if path == self._guard.path else None
        if presented is None:  # not the endpoint, or no usable credential: the SDK's answer
            await self._app(scope, receive, send)
            return
        if presented.scheme == "DPoP":
            # The SDK's bearer authentication reads the Bearer scheme only: the token is shown
            # to it so, the scheme kept here (and checked against the token's binding).
            headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
            headers.append((b"authorization", b"Bearer " + presented.token.encode("latin-1")))
            scope = {**scope, "headers": headers}
        reset = PRESENTED.set(presented)
        try:
            try:
                await self._guard.authenticate(presented)
            except GuardUnavailable as unknown:
                await unavailable(f"{unknown}: try again shortly")(scope, receive, send)
                return
            if presented.refusal is not None:
                denied = presented.refusal
                params = {"error": denied.error, "error_description": denied.description}
                header = challenge(denied.scheme, params, self._guard.resource_metadata_url)
                await refusal(401, header, denied.error, denied.description)(scope, receive, send)
                return
            if scope["method"] == "POST" and presented.claims is not None:
                await self._post(scope, receive, send)
            else:  # a token the SDK's authentication refuses (401), or no tools/call to check
                await self._app(scope, receive, send)
        finally:
            PRESENTED.reset(reset)

    async def _check(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        replay = _replaying(first, receive)
        call = _tool_call(first.get("body", b"")) if first["type"] == "http.request" else None
        presented = PRESENTED.get()
        if call is not None and presented is not None and presented.claims is not None:
            refused = await self._guard.check_call(call, presented, presented.claims, scope)
            if refused is not None:
                await refused(scope, replay, send)
                return
        await self._app(scope, replay, send)


def _presented(connection: HTTPConnection) -> Presented | None:
    values = connection.headers.getlist("authorization")
    proofs = connection.headers.getlist("dpop")
    if len(values) != 1 or len(proofs) > 1:  # two credentials, or two proofs: neither is used
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if not token or scheme.lower() not in ("bearer", "dpop"):
        return None
    method = connection.scope["method"]
    if scheme.lower() == "dpop":
        return Presented("DPoP", token, proofs[0] if proofs else "", method)
    return Presented("Bearer", token, "", method)


def _replaying(first: Message, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replay


def _tool_call(body: bytes) -> ToolCall | None:
    """The body's tools/call request, or None for anything else (the SDK answers it, and the
    interceptor refuses any tools/call that was not checked here)."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    request_id, params = message.get("id"), message.get("params")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(request_id, params["name"], arguments)

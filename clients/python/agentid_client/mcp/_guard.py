"""The MCP server guard: agent tokens verified locally through the SDK's own auth hooks (its
``token_verifier`` and ``AuthSettings``, RFC 9728 metadata naming agentid), and every
``tools/call`` a Check at agentid before the tool runs.

The Check happens in front of the SDK's transport, where a refusal can still be an HTTP 403
(the SDK commits its answer's status before a tool runs); what only the SDK knows (the
client's capabilities, its protocol version) decides how a step-up is asked for, in a
``tools/call`` interceptor (an SDK Extension), which also refuses any call that reached it
without a Check."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from agentid.v1 import agentid_pb2 as pb
from mcp.server.auth.handlers.metadata import ProtectedResourceMetadataHandler
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url, cors_middleware
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import RequestBodyLimitMiddleware
from mcp.shared.auth import ProtectedResourceMetadata
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, ErrorData, JSONRPCError, RequestId
from pydantic import AnyHttpUrl
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentid_client._client import AgentIdClient, ContextError
from agentid_client._errors import AgentIdError
from agentid_client._revocations import RevocationWatcher, WatcherNotReady, WatcherStopped
from agentid_client.mcp._policy import Binding, ToolCallRefused, ToolPolicy
from agentid_client.tokens import AgentClaims, KeyFetch, TokenRejected, TokenVerifier

if TYPE_CHECKING:
    from agentid_client.mcp._server import GuardedMCPServer

log = logging.getLogger("agentid_client.mcp")

# The JSON-RPC error code of a tools/call agentid refused (the answer's HTTP status is 401 or
# 403 and its WWW-Authenticate says why; the SDK's client surfaces the body's error). In the
# band JSON-RPC leaves to implementations (-32000..-32019), beside the SDK's own -32000/-32001.
TOOL_CALL_REFUSED = -32003
# What agentid's Check verifies DPoP proofs with (server tokens/dpop.py PROOF_ALGORITHMS).
DPOP_ALGORITHMS = ("EdDSA", "ES256", "RS256", "PS256")
# Check's reasons that are about the token, not its scope: 401 invalid_token (RFC 6750 3.1).
_TOKEN_REASONS = frozenset(
    {
        pb.REASON_TOKEN_MALFORMED,
        pb.REASON_SIGNATURE_INVALID,
        pb.REASON_TOKEN_EXPIRED,
        pb.REASON_TOKEN_NOT_YET_VALID,
        pb.REASON_SESSION_REVOKED,
        pb.REASON_PROOF_OF_POSSESSION_FAILED,
    }
)
_ACTION = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
# The ASGI scope key the Check's outcome travels under, from the HTTP layer to the interceptor.
CHECKED = "agentid.mcp.checked"


@dataclass(slots=True)
class Presented:
    """The credential one HTTP request presents: the token, its scheme (``Bearer`` or
    ``DPoP``), the DPoP proof, and the claims once verified (so a request verifies once)."""

    scheme: str
    token: str
    proof: str = ""
    claims: AgentClaims | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A ``tools/call`` request as the HTTP layer read it from the body."""

    request_id: RequestId
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Checked:
    """A tools/call agentid answered ALLOW or STEP_UP_REQUIRED for, on its way to the tool."""

    call: ToolCall
    presented: Presented
    claims: AgentClaims
    binding: Binding
    answer: pb.CheckResponse


# The credential of the request being served, for the SDK's token verifier hook (which is
# handed the token alone): set by the guard's HTTP layer around the SDK's app.
_PRESENTED: ContextVar[Presented | None] = ContextVar("agentid_mcp_presented", default=None)


class McpGuard:
    """Protects an MCP server (the official ``mcp`` SDK's MCPServer over streamable HTTP) with
    agentid.

    ``resource_url``: the server's canonical URL (RFC 8707), which agents' tokens must name in
    ``aud`` and the URL its streamable HTTP endpoint is served at. ``server_name``: the middle of
    the default actions, ``mcp.<server_name>.<tool>``. ``issuer``: agentid's ``tokens.issuer``
    (the tokens' ``iss``, the metadata's authorization server); ``public_url``: agentid's HTTP
    door (default: the issuer), for the approval page's link and the default ``keys``, its
    ``jwks_uri``. ``keys``: where the verifying keys come from (a ``jwks_uri``, an AgentIdClient
    for GetJwks). ``checker``: an AgentIdClient with the key of a ``[[services]]`` entry with role
    ``check`` whose ``audience`` is ``resource_url``. ``watcher``: a RevocationWatcher, so a
    revoked session is refused on its next request, not only its next tool call. ``tools``:
    each tool's ToolPolicy (``declare`` adds more); a tool without one is checked with the
    default action, no resource and no context. ``accept_dpop``: accept tokens bound to the
    agent's key, presented with ``Authorization: DPoP`` and a proof."""

    def __init__(
        self,
        *,
        resource_url: str,
        server_name: str,
        issuer: str,
        checker: AgentIdClient,
        public_url: str | None = None,
        keys: AgentIdClient | str | KeyFetch | None = None,
        watcher: RevocationWatcher | None = None,
        tools: Mapping[str, ToolPolicy] | None = None,
        accept_dpop: bool = True,
    ) -> None:
        parts = urlsplit(resource_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
        ):
            raise ValueError("resource_url is an absolute http(s) URL without query or fragment")
        if not _ACTION.fullmatch(server_name):
            raise ValueError(
                "server_name becomes part of actions: dot-separated segments of [a-z0-9_-]"
            )
        self.resource_url = resource_url
        self.server_name = server_name
        self.issuer = issuer
        self.public_url = (public_url or issuer).rstrip("/")
        self.path = parts.path or "/"
        self._checker = checker
        self._verifier = TokenVerifier(
            issuer,
            keys if keys is not None else f"{self.public_url}/.well-known/jwks.json",
            audience=resource_url,
            watcher=watcher,
        )
        self._policies: dict[str, ToolPolicy] = dict(tools or {})
        self._accept_dpop = accept_dpop
        # Validated from strings, so the models keep a path-less issuer without a trailing "/"
        # (an authorization server's issuer is compared exactly, RFC 8414 section 3.3).
        self.auth_settings = AuthSettings.model_validate(
            {
                "issuer_url": issuer,
                "resource_server_url": resource_url,
                "validate_token_resource": True,
            }
        )
        self.token_verifier = AgentTokenVerifier(self)
        self.metadata = ProtectedResourceMetadata.model_validate(
            {
                "resource": resource_url,
                "authorization_servers": [issuer],
                "bearer_methods_supported": ["header"],
                "resource_name": server_name,
                "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS) if accept_dpop else None,
            }
        )
        metadata_url = build_resource_metadata_url(AnyHttpUrl(resource_url))
        self.resource_metadata_url = str(metadata_url)
        self.metadata_path = urlsplit(self.resource_metadata_url).path

    def declare(
        self,
        tool: str,
        *,
        action: str | None = None,
        resource: str = "",
        context: list[str] | Mapping[str, str] | None = None,
    ) -> None:
        """How calls of ``tool`` are checked (see ToolPolicy)."""
        self._policies[tool] = ToolPolicy(action=action, resource=resource, context=context)

    def mcp_server(self, name: str | None = None, **options: Any) -> GuardedMCPServer:
        """An MCPServer (``options`` are its own) that verifies agent tokens with this guard and
        checks every tool call; its streamable HTTP app serves the guard's HTTP layer."""
        from agentid_client.mcp._server import GuardedMCPServer

        return GuardedMCPServer(self, name or self.server_name, **options)

    # -- authentication ------------------------------------------------------------------------

    async def authenticate(self, presented: Presented) -> AgentClaims | None:
        """The claims of a token this server accepts, or None: signature, issuer, times,
        ``aud`` naming ``resource_url``, not revoked (with a watcher), and presented as it is
        bound (a key-bound token with the DPoP scheme and a proof, any other as a bearer)."""
        if presented.claims is not None:
            return presented.claims
        try:
            claims = await self._verifier.verify(presented.token)
        except TokenRejected as refused:
            log.info("mcp guard: a token refused: %s", refused.reason)
            return None
        except (WatcherNotReady, WatcherStopped) as unknown:
            log.warning(
                "mcp guard: revocations unknown (%s): refusing tokens", type(unknown).__name__
            )
            return None
        except (ConnectionError, OSError, ValueError, jwt.PyJWKClientError, AgentIdError) as failed:
            log.warning("mcp guard: agentid's keys could not be read: %s", failed)
            return None
        if claims.aud is None or self.resource_url not in claims.aud:
            log.info("mcp guard: a token refused: AUDIENCE_MISMATCH (no aud naming this server)")
            return None
        bound = claims.jkt is not None
        if bound != (presented.scheme == "DPoP") or (bound and not presented.proof):
            log.info("mcp guard: a token refused: presented otherwise than it is bound")
            return None
        if bound and not self._accept_dpop:
            return None
        presented.claims = claims
        return claims

    # -- the Check of a tool call ---------------------------------------------------------------

    async def check_call(
        self, call: ToolCall, presented: Presented, claims: AgentClaims, scope: Scope
    ) -> Response | None:
        """Asks agentid about one tool call. None: the call goes on to the SDK (ALLOW, or
        STEP_UP_REQUIRED for the interceptor to ask the user), its outcome in the scope;
        otherwise the answer that refuses it."""
        policy = self._policies.get(call.name) or ToolPolicy()
        try:
            binding = policy.bind(self.server_name, call.name, call.arguments)
        except ToolCallRefused as refused:
            return jsonrpc_error(call.request_id, INVALID_PARAMS, str(refused), 400)
        bound = bool(presented.proof)
        try:
            answer = await self._checker.check(
                presented.token,
                binding.action,
                binding.resource,
                context=binding.context,
                pop_proof=presented.proof,
                pop_method="POST" if bound else "",
                pop_uri=self.resource_url if bound else "",
            )
        except ContextError as unsendable:
            message = f"tool {call.name}: an argument cannot be a Check's context: {unsendable}"
            return jsonrpc_error(call.request_id, INVALID_PARAMS, message, 400)
        except AgentIdError as error:
            if error.code.name == "INVALID_ARGUMENT":
                message = f"agentid cannot check tool {call.name}: {error.message}"
                return jsonrpc_error(call.request_id, INVALID_PARAMS, message, 400)
            log.warning("mcp guard: Check failed (%s %s): refusing", error.code.name, error.reason)
            message = "agentid could not decide on this call: try again shortly"
            return jsonrpc_error(
                call.request_id, INTERNAL_ERROR, message, 503, {"Retry-After": "1"}
            )
        if answer.decision in (pb.DECISION_ALLOW, pb.DECISION_STEP_UP_REQUIRED):
            scope[CHECKED] = Checked(call, presented, claims, binding, answer)
            return None
        return self._refused(call, binding, answer, presented)

    def _refused(
        self, call: ToolCall, binding: Binding, answer: pb.CheckResponse, presented: Presented
    ) -> Response:
        reason = pb.Reason.Name(answer.reason)
        description = answer.message or reason
        data: dict[str, Any] = {
            "reason": reason,
            "decision_id": answer.decision_id,
            "resource_metadata": self.resource_metadata_url,
        }
        said = _quotable(description)
        if answer.reason in _TOKEN_REASONS:
            status, data["error"] = 401, "invalid_token"
            challenge = (
                f'Bearer error="invalid_token", error_description="{said}", '
                f'resource_metadata="{self.resource_metadata_url}"'
            )
            if presented.scheme == "DPoP" and answer.reason == pb.REASON_PROOF_OF_POSSESSION_FAILED:
                algorithms = " ".join(DPOP_ALGORITHMS)
                challenge = (
                    f'DPoP error="invalid_dpop_proof", error_description="{said}", '
                    f'algs="{algorithms}"'
                )
        else:
            scope_value = binding.action + (f":{binding.resource}" if binding.resource else "")
            status, data["error"], data["scope"] = 403, "insufficient_scope", scope_value
            challenge = (
                f'Bearer error="insufficient_scope", scope="{_quotable(scope_value)}", '
                f'resource_metadata="{self.resource_metadata_url}", error_description="{said}"'
            )
        log.info(
            "mcp guard: tool %s refused: %s (decision %s)", call.name, reason, answer.decision_id
        )
        headers = {"WWW-Authenticate": challenge}
        return jsonrpc_error(call.request_id, TOOL_CALL_REFUSED, description, status, headers, data)

    def step_up_client(self, presented: Presented) -> AgentIdClient:
        """The agent's own credential on the checker's connection: StepUp is the agent's call."""
        return self._checker.with_credential(presented.token)


class AgentTokenVerifier:
    """The SDK's ``TokenVerifier`` hook (``MCPServer(token_verifier=...)``): agent tokens
    verified locally by the guard, as the SDK's AccessToken (``client_id`` the agent, ``subject``
    the user, ``claims`` every claim; a tool reads it with ``get_access_token()``)."""

    def __init__(self, guard: McpGuard) -> None:
        self._guard = guard

    async def verify_token(self, token: str) -> AccessToken | None:
        presented = _PRESENTED.get()
        if presented is None or presented.token != token:
            # Not through the guard's HTTP layer: nothing says a DPoP proof came with it.
            presented = Presented("Bearer", token)
        claims = await self._guard.authenticate(presented)
        if claims is None:
            return None
        return AccessToken(
            token=token,
            client_id=claims.agent_id,
            scopes=list(claims.scopes),
            expires_at=claims.exp,
            resource=self._guard.resource_url,
            subject=claims.sub,
            claims=dict(claims.payload),
        )


class GuardLayer:
    """ASGI, in front of the SDK's app: serves the RFC 9728 metadata (the SDK's handler, with
    the DPoP algorithms its own route leaves out), presents a DPoP-scheme token to the SDK's
    bearer authentication, and has agentid check every ``tools/call`` before the SDK sees it."""

    def __init__(self, app: ASGIApp, guard: McpGuard, max_body_bytes: int) -> None:
        self._app = app
        self._guard = guard
        handler = ProtectedResourceMetadataHandler(guard.metadata)
        self._metadata = cors_middleware(handler.handle, ["GET", "OPTIONS"])
        # The SDK's own bounded body reader (413 beyond the bound), then the Check.
        self._post = RequestBodyLimitMiddleware(self._check, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in (
            self._guard.path,
            self._guard.metadata_path,
        ):
            await self._app(scope, receive, send)
            return
        if scope["path"] == self._guard.metadata_path:
            await self._metadata(scope, receive, send)
            return
        presented = _presented(HTTPConnection(scope))
        if presented is None:  # no usable credential: the SDK answers 401
            await self._app(scope, receive, send)
            return
        if presented.scheme == "DPoP":
            # The SDK's bearer authentication reads the Bearer scheme only; the scheme is kept
            # here and checked against the token's binding by the verifier hook.
            headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
            headers.append((b"authorization", b"Bearer " + presented.token.encode("latin-1")))
            scope = {**scope, "headers": headers}
        reset = _PRESENTED.set(presented)
        try:
            if scope["method"] == "POST":
                await self._post(scope, receive, send)
            else:
                await self._app(scope, receive, send)
        finally:
            _PRESENTED.reset(reset)

    async def _check(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        replay = _replaying(first, receive)
        call = _tool_call(first.get("body", b"")) if first["type"] == "http.request" else None
        presented = _PRESENTED.get()
        if call is not None and presented is not None:
            claims = await self._guard.authenticate(presented)
            if claims is not None:  # else the SDK's authentication answers 401
                refusal = await self._guard.check_call(call, presented, claims, scope)
                if refusal is not None:
                    await refusal(scope, replay, send)
                    return
        await self._app(scope, replay, send)


def _presented(connection: HTTPConnection) -> Presented | None:
    values = connection.headers.getlist("authorization")
    proofs = connection.headers.getlist("dpop")
    if len(values) != 1 or len(proofs) > 1:
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if not token or scheme.lower() not in ("bearer", "dpop"):
        return None
    if scheme.lower() == "dpop":
        return Presented("DPoP", token, proofs[0] if proofs else "")
    return Presented("Bearer", token, "")


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


def jsonrpc_error(
    request_id: RequestId,
    code: int,
    message: str,
    status: int,
    headers: Mapping[str, str] | None = None,
    data: Any = None,
) -> Response:
    """A JSON-RPC error for the request, at an HTTP status: the SDK's client surfaces the body's
    error for a non-2xx answer."""
    error = JSONRPCError(
        jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message, data=data)
    )
    body = error.model_dump_json(by_alias=True, exclude_none=True)
    return Response(body, status, headers=dict(headers or {}), media_type="application/json")


def _quotable(text: str) -> str:
    """Text for a WWW-Authenticate quoted value: RFC 6750's characters only (no quote or
    backslash, no control characters), at most 300 of them."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:300]

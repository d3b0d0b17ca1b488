"""The MCP server guard: agent tokens verified locally through the SDK's own auth hooks (its
``token_verifier`` and ``AuthSettings``, RFC 9728 metadata naming agentid), and every
``tools/call`` a Check at agentid before the tool runs.

The Check happens in front of the SDK's transport (``_http.GuardLayer``), where a refusal can
still be an HTTP 403 (the SDK commits its answer's status before a tool runs); what only the
SDK knows (the client's capabilities, its protocol version) decides how a step-up is asked for,
in a ``tools/call`` interceptor (``_server.GuardExtension``), which also refuses any call that
reached it without a Check."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from agentid.v1 import agentid_pb2 as pb
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url
from mcp.server.auth.settings import AuthSettings
from mcp.shared.auth import ProtectedResourceMetadata
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, RequestId
from pydantic import AnyHttpUrl
from starlette.responses import Response
from starlette.types import Scope

from agentid_client._client import AgentIdClient, ContextError
from agentid_client._errors import AgentIdError
from agentid_client._revocations import RevocationWatcher, WatcherNotReady, WatcherStopped
from agentid_client.dpop import PROOF_ALGORITHMS, ProofRejected, ProofVerifier
from agentid_client.mcp._answers import challenge, jsonrpc_error
from agentid_client.mcp._policy import ACTION, Binding, ToolCallRefused, ToolPolicy
from agentid_client.tokens import AgentClaims, KeyFetch, TokenRejected, TokenVerifier

if TYPE_CHECKING:
    from agentid_client.mcp._server import GuardedMCPServer

log = logging.getLogger("agentid_client.mcp")

# The JSON-RPC error code of a tools/call agentid refused (the answer's HTTP status is 401 or
# 403 and its WWW-Authenticate says why; the SDK's client surfaces the body's error). In the
# band JSON-RPC leaves to implementations (-32000..-32019), beside the SDK's own -32000/-32001.
TOOL_CALL_REFUSED = -32003
# Check's reasons that are about the token (or its proof), not its scope: 401 (RFC 6750 3.1).
_TOKEN_REASONS = frozenset(
    {
        pb.REASON_TOKEN_MALFORMED,
        pb.REASON_SIGNATURE_INVALID,
        pb.REASON_TOKEN_EXPIRED,
        pb.REASON_TOKEN_NOT_YET_VALID,
        pb.REASON_AUDIENCE_MISMATCH,
        pb.REASON_SESSION_REVOKED,
        pb.REASON_PROOF_OF_POSSESSION_FAILED,
    }
)
# The ASGI scope key the Check's outcome travels under, from the HTTP layer to the interceptor.
CHECKED = "agentid.mcp.checked"


class GuardUnavailable(Exception):
    """Whether the token is good cannot be known now (agentid's keys unreadable, the revocation
    watcher not ready or stopped): the request is refused (503), the token not judged."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A 401 the guard answers itself (the SDK's covers a token that does not verify): a
    key-bound token presented without its proof, or with a bad or replayed one."""

    scheme: str  # of the challenge: "Bearer" or "DPoP"
    error: str  # invalid_token, invalid_dpop_proof
    description: str


@dataclass(slots=True)
class Presented:
    """The credential one HTTP request presents, and what the guard made of it (once: a
    proof is spent when it is verified)."""

    scheme: str  # "Bearer" or "DPoP"
    token: str
    proof: str = ""
    method: str = ""
    judged: bool = False
    claims: AgentClaims | None = None
    refusal: Refusal | None = None


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
PRESENTED: ContextVar[Presented | None] = ContextVar("agentid_mcp_presented", default=None)


class McpGuard:
    """Protects an MCP server (the official ``mcp`` SDK's MCPServer over streamable HTTP) with
    agentid.

    ``resource_url``: the server's canonical URL (RFC 8707), which agents' tokens must name in
    ``aud`` and the URL its streamable HTTP endpoint is served at. ``server_name``: the middle of
    the default actions, ``mcp.<server_name>.<tool>``. ``issuer``: agentid's ``tokens.issuer``
    (the tokens' ``iss``, the metadata's authorization server); ``public_url``: agentid's HTTP
    door (default: the issuer), for the approval page's link and the default ``keys``, its
    ``jwks_uri``. ``keys``: where the verifying keys come from (a ``jwks_uri``, an AgentIdClient
    for GetJwks). ``client``: an AgentIdClient with the key of a ``[[services]]`` entry with role
    ``check`` whose ``audience`` is ``resource_url``. ``watcher``: a RevocationWatcher, so a
    revoked session is refused on its next request, not only its next tool call. ``tools``:
    each tool's ToolPolicy (``declare`` adds more); a tool without one is checked with the
    default action, no resource and no context. ``dpop``: accept tokens bound to the agent's
    key (presented with ``Authorization: DPoP`` and a proof, verified here and spent once); a
    ProofVerifier sets the replay cache's bounds, False refuses such tokens."""

    def __init__(
        self,
        *,
        resource_url: str,
        server_name: str,
        issuer: str,
        client: AgentIdClient,
        public_url: str | None = None,
        keys: AgentIdClient | str | KeyFetch | None = None,
        watcher: RevocationWatcher | None = None,
        tools: Mapping[str, ToolPolicy] | None = None,
        dpop: bool | ProofVerifier = True,
    ) -> None:
        parts = urlsplit(resource_url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
        ):
            raise ValueError("resource_url is an absolute http(s) URL without query or fragment")
        if not ACTION.fullmatch(server_name):
            raise ValueError(
                "server_name becomes part of actions: dot-separated segments of [a-z0-9_-]"
            )
        self.resource_url = resource_url
        self.server_name = server_name
        self.issuer = issuer
        self.public_url = (public_url or issuer).rstrip("/")
        self.path = parts.path or "/"
        self._client = client
        self._verifier = TokenVerifier(
            issuer,
            keys if keys is not None else f"{self.public_url}/.well-known/jwks.json",
            audience=resource_url,
            watcher=watcher,
        )
        self._policies: dict[str, ToolPolicy] = dict(tools or {})
        self._proofs = (
            dpop if isinstance(dpop, ProofVerifier) else ProofVerifier() if dpop else None
        )
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
        algorithms = list(PROOF_ALGORITHMS) if self._proofs is not None else None
        self.metadata = ProtectedResourceMetadata.model_validate(
            {
                "resource": resource_url,
                "authorization_servers": [issuer],
                "bearer_methods_supported": ["header"],
                "resource_name": server_name,
                "dpop_signing_alg_values_supported": algorithms,
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
        bound: a key-bound token with the DPoP scheme and a good proof (spent here), any other
        as a bearer (``presented.refusal`` says why when the guard answers the 401 itself).
        GuardUnavailable when it cannot be known. Judged once per request."""
        if not presented.judged:
            presented.judged = True
            presented.claims = await self._judge(presented)
        return presented.claims

    async def _judge(self, presented: Presented) -> AgentClaims | None:
        try:
            claims = await self._verifier.verify(presented.token)
        except TokenRejected as refused:
            log.info("mcp guard: a token refused: %s", refused.reason)
            return None  # the SDK's 401
        except (WatcherNotReady, WatcherStopped) as unknown:
            log.warning("mcp guard: revocations unknown (%s)", type(unknown).__name__)
            raise GuardUnavailable("the revoked sessions are not known yet") from None
        except (ConnectionError, OSError, ValueError, jwt.PyJWKClientError, AgentIdError) as failed:
            log.warning("mcp guard: agentid's keys could not be read: %s", failed)
            raise GuardUnavailable("agentid's keys could not be read") from None
        if claims.aud is None or self.resource_url not in claims.aud:
            log.info("mcp guard: a token refused: AUDIENCE_MISMATCH (no aud naming this server)")
            return None
        if claims.jkt is None:
            if presented.scheme == "DPoP":
                return self._refuse(
                    presented, "Bearer", "invalid_token", "the token is not bound to a key"
                )
            return claims
        if self._proofs is None:
            return self._refuse(
                presented, "Bearer", "invalid_token", "DPoP-bound tokens are not accepted here"
            )
        if presented.scheme != "DPoP":
            return self._refuse(
                presented, "DPoP", "invalid_token", "a DPoP-bound token goes with the DPoP scheme"
            )
        try:
            self._proofs.verify(
                presented.proof,
                jkt=claims.jkt,
                method=presented.method,
                url=self.resource_url,
                access_token=presented.token,
                user=claims.sub,
            )
        except ProofRejected as rejected:
            return self._refuse(presented, "DPoP", "invalid_dpop_proof", str(rejected))
        return claims

    @staticmethod
    def _refuse(presented: Presented, scheme: str, error: str, description: str) -> None:
        log.info("mcp guard: a token refused: %s (%s)", error, description)
        presented.refusal = Refusal(scheme, error, description)

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
            answer = await self._client.check(
                presented.token,
                binding.action,
                binding.resource,
                context=binding.context,
                pop_proof=presented.proof,
                pop_method=presented.method if bound else "",
                pop_uri=self.resource_url if bound else "",
            )
        except ContextError as unsendable:
            message = f"tool {call.name}: an argument cannot be a Check's context: {unsendable}"
            return jsonrpc_error(call.request_id, INVALID_PARAMS, message, 400)
        except AgentIdError as error:
            if error.code.name == "INVALID_ARGUMENT":
                message = f"agentid cannot check tool {call.name}: {error.message}"
                return jsonrpc_error(call.request_id, INVALID_PARAMS, message, 400)
            return agentid_failed(call.request_id, error)
        if answer.decision in (pb.DECISION_ALLOW, pb.DECISION_STEP_UP_REQUIRED):
            scope[CHECKED] = Checked(call, presented, claims, binding, answer)
            return None
        reason = pb.Reason.Name(answer.reason)
        description = answer.message or reason
        log.info(
            "mcp guard: tool %s refused: %s (decision %s)", call.name, reason, answer.decision_id
        )
        data: dict[str, Any] = {"reason": reason, "decision_id": answer.decision_id}
        if answer.reason in _TOKEN_REASONS:
            # The token (or its proof) is not good: 401, as the local verification answers it.
            proof_failed = answer.reason == pb.REASON_PROOF_OF_POSSESSION_FAILED
            code = "invalid_dpop_proof" if bound and proof_failed else "invalid_token"
            data["error"] = code
            params = {"error": code, "error_description": description}
            header = challenge("DPoP" if bound else "Bearer", params, self.resource_metadata_url)
            status = 401
        else:
            # The MCP spec's scope challenge: the scope this call needs, and where to learn more.
            scope_value = binding.action + (f":{binding.resource}" if binding.resource else "")
            data.update(error="insufficient_scope", scope=scope_value)
            params = {"error": "insufficient_scope", "scope": scope_value}
            params["error_description"] = description
            header = challenge("Bearer", params, self.resource_metadata_url)
            status = 403
        data["resource_metadata"] = self.resource_metadata_url
        headers = {"WWW-Authenticate": header}
        return jsonrpc_error(call.request_id, TOOL_CALL_REFUSED, description, status, headers, data)

    def agent_client(self, presented: Presented) -> AgentIdClient:
        """The agent's own credential on the guard's connection: StepUp is the agent's call."""
        return self._client.with_credential(presented.token)


def agentid_failed(request_id: RequestId, error: AgentIdError) -> Response:
    """agentid could not decide (unreachable, a deadline, a refused credential): the call is
    refused, 503 when it may work again shortly, 500 otherwise; nothing about the token."""
    log.warning(
        "mcp guard: agentid failed (%s %s): the call is refused", error.code.name, error.reason
    )
    retry = error.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    message = f"agentid could not decide this call ({error.code.name})"
    headers = {"Retry-After": "1"} if retry else {}
    return jsonrpc_error(request_id, INTERNAL_ERROR, message, 503 if retry else 500, headers)


class AgentTokenVerifier:
    """The SDK's ``TokenVerifier`` hook (``MCPServer(token_verifier=...)``): agent tokens
    verified locally by the guard, as the SDK's AccessToken (``client_id`` the agent, ``subject``
    the user, ``claims`` every claim; a tool reads it with ``get_access_token()``)."""

    def __init__(self, guard: McpGuard) -> None:
        self._guard = guard

    async def verify_token(self, token: str) -> AccessToken | None:
        presented = PRESENTED.get()
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

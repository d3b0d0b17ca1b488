"""OAuth answers: RFC 6749 section 5.2 errors and JSON bodies, and how the domain's errors map
onto them. A description is the domain's message (never a token, key or assertion: see
domain/errors.py) or one written here."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from agentid_server.domain.errors import (
    AgentIdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
JSON_TYPE = "application/json"


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error answer: ``error`` code, a description for people, and the
    HTTP status (400 unless the RFC says otherwise)."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        return json_response(body, self.status, self.headers)


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def invalid_client(description: str) -> OAuthError:
    """401: the client (the agent) could not be authenticated (RFC 6749 section 5.2)."""
    challenge = {"WWW-Authenticate": 'Basic realm="agentid"'}
    return OAuthError("invalid_client", description, 401, challenge)


def json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer that no cache keeps (tokens, errors, introspection)."""
    return web.Response(
        text=json.dumps(body, separators=(",", ":")),
        status=status,
        content_type=JSON_TYPE,
        headers={**NO_STORE, **(headers or {})},
    )


# A violated DelegateInput field, named as the token endpoint's parameter that carries it.
_PARAMETER_OF_FIELD = {
    "agent_id": "client_id",
    "scopes": "scope",
    "ttl": "expires_in",
    "task": "task",
    "audiences": "resource/audience",
    "jkt": "DPoP",
}

# PermissionDenied reasons of Delegate and the OAuth error each is at the token endpoint.
_DENIED = {
    "SCOPE_ESCALATION": "invalid_scope",
    "AGENT_SCOPE_EXCEEDED": "invalid_scope",
    "DELEGATION_NOT_GRANTED": "invalid_grant",
    "SESSION_EXPIRED": "invalid_grant",
    "AUDIENCE_ESCALATION": "invalid_target",  # RFC 8693 section 2.2.2
    "KEY_BINDING_ESCALATION": "invalid_dpop_proof",  # RFC 9449 section 5
}


def delegate_error(error: AgentIdError) -> OAuthError:
    """A refused Delegate as the token endpoint answers it (docs/http.md)."""
    if isinstance(error, InvalidArgument):
        return invalid_request(_renamed(error))
    if isinstance(error, NotFound):  # AGENT_NOT_REGISTERED: client_id names no agent
        return invalid_client("client_id is not a registered agent")
    if isinstance(error, PermissionDenied):
        if error.reason == "ACTOR_UNAUTHENTICATED":
            return invalid_client(error.message)  # what is wrong, never the assertion
        if error.reason in ("SCOPE_ESCALATION", "AGENT_SCOPE_EXCEEDED"):
            scopes = error.metadata.get("scopes", "")
            return OAuthError("invalid_scope", f"scope not covered: {scopes}")
        return OAuthError(_DENIED.get(error.reason, "invalid_request"), error.message)
    if isinstance(error, FailedPrecondition):
        if error.reason == "AGENT_DISABLED":  # the kill switch: this client may not get tokens
            return OAuthError("unauthorized_client", error.message)
        return OAuthError("invalid_grant", error.message)  # DELEGATION_TOO_DEEP
    if isinstance(error, Unauthenticated):
        return OAuthError("invalid_grant", f"subject_token refused: {error.message}")
    if isinstance(error, ResourceExhausted):
        return _exhausted(error)
    if isinstance(error, Unavailable):
        return OAuthError("temporarily_unavailable", error.message, 503, {"Retry-After": "1"})
    return invalid_request(error.message)


def _exhausted(error: ResourceExhausted) -> OAuthError:
    """429 with Retry-After (RFC 9110 section 10.2.3), in whole seconds rounded up."""
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return OAuthError("temporarily_unavailable", error.message, 429, headers)


def _renamed(error: InvalidArgument) -> str:
    """The violations, each named by the parameter that carried the field."""
    if not error.violations:
        return error.message
    parts = []
    for violation in error.violations:
        field, _, index = violation.field.partition("[")
        name = _PARAMETER_OF_FIELD.get(field, violation.field)
        parts.append(f"{name}{'[' + index if index else ''}: {violation.description}")
    return "; ".join(parts)

"""The answers the guard writes itself: RFC 6750 / RFC 9449 challenges and JSON-RPC errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mcp_types import ErrorData, JSONRPCError, RequestId
from starlette.responses import Response

from agentid_client.dpop import PROOF_ALGORITHMS


def challenge(scheme: str, params: Mapping[str, str], resource_metadata: str) -> str:
    """A WWW-Authenticate value: ``scheme`` with ``params``, the DPoP algorithms for a DPoP
    challenge, and where the protected resource's metadata is (RFC 9728 section 5.1)."""
    values = dict(params)
    if scheme == "DPoP":
        values["algs"] = " ".join(PROOF_ALGORITHMS)
    values["resource_metadata"] = resource_metadata
    return f"{scheme} " + ", ".join(f'{name}="{quoted(value)}"' for name, value in values.items())


def refusal(status: int, header: str, error: str, description: str) -> Response:
    """A challenge's answer: the status, WWW-Authenticate, and the OAuth error body."""
    body = json.dumps({"error": error, "error_description": description})
    headers = {"WWW-Authenticate": header, "Cache-Control": "no-store"}
    return Response(body, status, headers=headers, media_type="application/json")


def unavailable(description: str) -> Response:
    """503: whether the request may go on cannot be known now; retry shortly."""
    body = json.dumps({"error": "temporarily_unavailable", "error_description": description})
    headers = {"Retry-After": "1", "Cache-Control": "no-store"}
    return Response(body, 503, headers=headers, media_type="application/json")


def jsonrpc_error(
    request_id: RequestId | None,
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


def quoted(text: str) -> str:
    """Text fit for a challenge's quoted-string (RFC 6750 section 3: printable ASCII, no ``"``
    or ``\\``)."""
    return "".join("'" if c in '"\\' else c if " " <= c <= "~" else "?" for c in text)

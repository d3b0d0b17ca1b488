"""The agent's side: a token for one MCP server by OAuth token exchange at agentid (RFC 8693,
``resource`` = the server, RFC 8707), optionally bound to a key the agent holds (DPoP, RFC
9449), and an ``httpx2.Auth`` that the MCP SDK's streamable HTTP client sends it with."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agentid_client.dpop import ProofKey, dpop_proof

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 60  # seconds: agentid accepts up to 5 minutes
AssertionKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class TokenExchangeError(Exception):
    """agentid refused the exchange: the OAuth ``error`` code (``invalid_scope``,
    ``invalid_grant``, ``invalid_client``...), its description and the HTTP status."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description


@dataclass(frozen=True)
class ExchangedToken:
    """A token for one MCP server: ``access_token`` (never printed), ``token_type`` (``Bearer``,
    or ``DPoP`` when bound to the proof key), ``scope`` granted, ``expires_at`` (epoch s), and
    ``resource``: the server it was made for (its ``aud``)."""

    access_token: str = field(repr=False)
    token_type: str
    scope: str
    expires_at: float
    resource: str = ""


def client_assertion(key: AssertionKey, client_id: str, audience: str, kid: str = "") -> str:
    """The agent's RFC 7523 client assertion: ``iss`` = ``sub`` = the agent id, ``aud`` the
    token endpoint, good for a minute, a fresh ``jti``; signed with a key of its JWKS."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = "ES256"
    else:
        algorithm = "RS256"
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


async def exchange_token(
    token_endpoint: str,
    *,
    client_id: str,
    subject_token: str,
    resource: str,
    scope: str,
    subject_token_type: str = JWT_TOKEN_TYPE,
    proof_key: ProofKey | None = None,
    assertion_key: AssertionKey | None = None,
    assertion_kid: str = "",
    expires_in: int | None = None,
    task: str = "",
    http_client: httpx2.AsyncClient | None = None,
) -> ExchangedToken:
    """Asks agentid's token endpoint (its discovery's ``token_endpoint``) for a token for the
    MCP server at ``resource`` (its ``aud``), with ``scope`` (space-separated) of what the
    subject token (the user's IdP token, or the agent's own for a sub-agent) may give.

    ``assertion_key``: the agent's key when it has keys (agentid then wants its client
    assertion; ``assertion_kid`` names the key in the agent's JWKS). ``proof_key``: bind the
    token to this key (every request with it then needs a proof of it); a subject token bound
    to a key needs that key here too. TokenExchangeError when agentid refuses."""
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "client_id": client_id,
        "subject_token": subject_token,
        "subject_token_type": subject_token_type,
        "resource": resource,
        "scope": scope,
    }
    if assertion_key is not None:
        form["client_assertion_type"] = JWT_BEARER_ASSERTION
        form["client_assertion"] = client_assertion(
            assertion_key, client_id, token_endpoint, assertion_kid
        )
    if expires_in is not None:
        form["expires_in"] = str(expires_in)
    if task:
        form["task"] = task
    headers = {"Accept": "application/json"}
    if proof_key is not None:
        # The subject's hash goes with the proof: agentid compares it when the subject token
        # is itself bound to this key (a sub-agent's), and ignores it otherwise.
        headers["DPoP"] = dpop_proof(proof_key, "POST", token_endpoint, subject_token)
    client = http_client or httpx2.AsyncClient(timeout=30.0)
    try:
        response = await client.post(token_endpoint, data=form, headers=headers)
    finally:
        if http_client is None:
            await client.aclose()
    answer = _json(response)
    if response.status_code != 200:
        raise TokenExchangeError(
            response.status_code,
            str(answer.get("error", "invalid_response")),
            str(answer.get("error_description", "")),
        )
    token, token_type = answer.get("access_token"), answer.get("token_type")
    expires = answer.get("expires_in")
    if not isinstance(token, str) or not isinstance(expires, int) or token_type is None:
        raise TokenExchangeError(response.status_code, "invalid_response", "no token in it")
    if proof_key is not None and str(token_type).lower() != "dpop":
        raise TokenExchangeError(response.status_code, "invalid_response", "the token is unbound")
    return ExchangedToken(
        token,
        "DPoP" if proof_key is not None else "Bearer",
        str(answer.get("scope", "")),
        time.time() + expires,
        resource,
    )


def _json(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class AgentAuth(httpx2.Auth):
    """Sends an agent's token with every request of an ``httpx2.AsyncClient`` (the MCP SDK's
    ``streamable_http_client(url, http_client=httpx2.AsyncClient(auth=auth))``):
    ``Authorization: Bearer <token>``, or for a token bound to ``proof_key``
    ``Authorization: DPoP <token>`` and a fresh ``DPoP`` proof for the request's method and
    URL. The token goes to the MCP server it was made for and nowhere else: a request to
    another origin than ``resource``'s (an ExchangedToken's own by default) carries nothing of
    it. A bare token string without ``resource`` is sent with every request of the client: use
    one client per server then."""

    def __init__(
        self,
        token: str | ExchangedToken,
        *,
        proof_key: ProofKey | None = None,
        resource: str | None = None,
    ) -> None:
        self._token = token.access_token if isinstance(token, ExchangedToken) else token
        self._proof_key = proof_key
        if resource is None and isinstance(token, ExchangedToken):
            resource = token.resource
        self._origin = _origin(resource) if resource else None

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        if self._origin is not None and _origin(str(request.url)) != self._origin:
            yield request  # another server: nothing of the token goes there
            return
        if self._proof_key is None:
            request.headers["Authorization"] = f"Bearer {self._token}"
        else:
            request.headers["Authorization"] = f"DPoP {self._token}"
            request.headers["DPoP"] = dpop_proof(
                self._proof_key, request.method, str(request.url), self._token
            )
        yield request


def _origin(url: str) -> tuple[str, str, int | None]:
    """A URL's origin (scheme, host, port; the scheme's default port made explicit)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port

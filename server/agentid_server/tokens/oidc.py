"""What agentid checks as an OpenID Connect client, wherever it signs a user in: the console
(web/oidc_client.py, a confidential client on the HTTP door) and `agentid login` (cli/login.py,
a public client on the user's machine). One copy of the rules, so the two cannot drift.

The protocol itself is Authlib's: the authorization URL and the code exchange through its
OAuth 2 client (the caller builds it: a confidential or public one), and OpenID Connect Core's
ID token rules through `CodeIDToken` (iss, aud, azp, exp, iat, nonce, at_hash). Here: the
discovery document (read with a size cap, its issuer checked), the request's fresh values
(`state`, `nonce`, the PKCE verifier), a step-up's fresh login (RFC 9470 section 4), the ID
token's signature against the IdP's JWKS, and what a fresh login promised (auth_time, acr).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
import jwt
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oidc.core import CodeIDToken
from joserfc.errors import JoseError

from agentid_server.tokens.idp import JwksCache, key_fits

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
MAX_DISCOVERY_BYTES = 256 * 1024
MAX_ID_TOKEN_BYTES = 16 * 1024


class LoginFailed(Exception):
    """A sign-in refused: ``reason`` is stable (tests, logs); the message is safe to show."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Authorization:
    """Where to send the browser, and what the callback must find again (kept by the client)."""

    url: str
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True, slots=True)
class IdTokenClaims:
    """What agentid keeps of a validated ID token."""

    subject: str
    auth_time: int | None
    acr: str | None
    # Every claim, for mapping the user as the IdP's access tokens are (`[[idp]] user_claim`).
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)


async def fetch_discovery(issuer: str) -> dict[str, Any]:
    """The issuer's discovery document (OpenID Connect Discovery 1.0), which must name that
    very issuer (section 4.3) and the endpoints a code flow needs. httpx2.HTTPError or
    ValueError when it cannot be read or does not fit."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    async with (
        httpx2.AsyncClient(timeout=FETCH_TIMEOUT) as client,
        client.stream("GET", url, headers={"Accept": "application/json"}) as response,
    ):
        response.raise_for_status()
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_DISCOVERY_BYTES:
                raise ValueError("the discovery document is too large")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("the discovery document is not a JSON object")
    if document.get("issuer") != issuer:
        raise ValueError("the discovery document names another issuer")
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(document.get(name), str):
            raise ValueError(f"the discovery document has no {name}")
    return document


def offered_algorithms(document: dict[str, Any], allowed: Sequence[str]) -> tuple[str, ...]:
    """The ID token algorithms we allow that the IdP says it signs with (RS256 if unsaid)."""
    offered = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    return tuple(a for a in allowed if a in offered)


def authorization_request(
    client: AsyncOAuth2Client,
    endpoint: str,
    *,
    max_age: int | None = None,
    acr_values: Sequence[str] = (),
) -> Authorization:
    """A new authorization request: fresh `state`, `nonce` and PKCE verifier (S256 is the
    client's). With ``max_age`` or ``acr_values`` (a step-up's fresh login) the IdP is also
    told `prompt=login`: it must authenticate the user again, whatever session it holds."""
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    verifier = generate_token(64)  # RFC 7636: 43 to 128 characters
    extra: dict[str, str] = {"nonce": nonce}
    if max_age is not None:
        extra["max_age"] = str(max_age)
    if acr_values:
        extra["acr_values"] = " ".join(acr_values)
    if max_age is not None or acr_values:
        extra["prompt"] = "login"
    url, _ = client.create_authorization_url(endpoint, state=state, code_verifier=verifier, **extra)
    return Authorization(url=url, state=state, nonce=nonce, code_verifier=verifier)


async def exchange_code(
    client: AsyncOAuth2Client, token_endpoint: str, code: str, code_verifier: str
) -> dict[str, Any]:
    """The token response for ``code`` (with its PKCE verifier): it holds an access and an ID
    token, or LoginFailed. Nothing of the response reaches a log or a message."""
    try:
        token: dict[str, Any] = await client.fetch_token(
            token_endpoint,
            grant_type="authorization_code",
            code=code,
            code_verifier=code_verifier,
        )
    except OAuthError as error:
        raise LoginFailed(
            f"the IdP refused the code: {_printable(str(error.error))}", "CODE_REFUSED"
        ) from None
    except (httpx2.HTTPError, ValueError) as error:
        log.warning("the IdP's token endpoint failed: %s", type(error).__name__)
        raise LoginFailed("the IdP's token endpoint did not answer", "IDP_UNAVAILABLE") from None
    if not isinstance(token.get("access_token"), str) or not isinstance(token.get("id_token"), str):
        raise LoginFailed("the IdP answered without an ID and access token", "NO_TOKENS")
    return token


def _printable(text: str) -> str:
    """The IdP's error code as shown (a page, a terminal): short, and nothing that acts."""
    return "".join(c if c.isprintable() else "?" for c in text[:64])


async def validate_id_token(
    id_token: str,
    *,
    keys: JwksCache,
    algorithms: Sequence[str],
    issuer: str,
    client_id: str,
    nonce: str,
    access_token: str | None,
    now: float,
    leeway: float,
    max_age: int | None = None,
    acr_values: Sequence[str] = (),
) -> IdTokenClaims:
    """The ID token's signature (the IdP's JWKS), then OpenID Connect Core 3.1.3.7 through
    Authlib's CodeIDToken (iss, aud = our client_id, azp, exp, iat, nonce, at_hash), then
    what a fresh login promised: `auth_time` within ``max_age``, `acr` one of ``acr_values``."""
    if len(id_token) > MAX_ID_TOKEN_BYTES:
        raise LoginFailed("the ID token is too large", "ID_TOKEN_INVALID")
    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.InvalidTokenError:
        raise LoginFailed("the ID token is not a JWT", "ID_TOKEN_INVALID") from None
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in algorithms or "crit" in header:
        raise LoginFailed("the ID token's algorithm is not allowed", "ID_TOKEN_INVALID")
    key = await keys.key(kid) if isinstance(kid, str) else None
    if key is None or not key_fits(alg, key):
        raise LoginFailed("the ID token's signing key is unknown", "ID_TOKEN_INVALID")
    try:
        # The signature alone: the claims are Authlib's to check, below.
        payload = jwt.decode(
            id_token,
            key.material,
            algorithms=[alg],
            options={
                "verify_aud": False,
                "verify_iss": False,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidTokenError:
        raise LoginFailed("the ID token's signature is invalid", "ID_TOKEN_INVALID") from None
    claims = CodeIDToken(
        payload,
        header,
        {
            "iss": {"essential": True, "value": issuer},
            "aud": {"essential": True, "value": client_id},
        },
        {"nonce": nonce, "client_id": client_id, "access_token": access_token, "max_age": max_age},
    )
    try:
        claims.validate(now=int(now), leeway=int(leeway))
    except JoseError as error:
        claim = getattr(error, "claim", "")
        reason = {"nonce": "NONCE_MISMATCH", "aud": "AUDIENCE_MISMATCH", "azp": "AUDIENCE_MISMATCH"}
        raise LoginFailed(
            f"the ID token is refused: {error.description}", reason.get(claim, "ID_TOKEN_INVALID")
        ) from None
    subject, auth_time, acr = payload.get("sub"), payload.get("auth_time"), payload.get("acr")
    if not isinstance(subject, str) or not subject:
        raise LoginFailed("the ID token has no subject", "ID_TOKEN_INVALID")
    if not isinstance(auth_time, int) or isinstance(auth_time, bool):
        auth_time = None
    if max_age is not None and (auth_time is None or now - auth_time > max_age + leeway):
        raise LoginFailed("the IdP did not sign the user in again", "LOGIN_NOT_FRESH")
    if acr_values and acr not in acr_values:
        raise LoginFailed("the sign-in was not of the requested kind (acr)", "ACR_NOT_MET")
    return IdTokenClaims(subject, auth_time, acr if isinstance(acr, str) else None, payload)

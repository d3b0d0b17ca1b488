"""agentid as an OpenID Connect client of its `[[idp]]`: the console's sign-in.

The authorization code flow with PKCE (S256), `state` and `nonce`, spoken through Authlib's
OAuth 2 client (the authorization URL, the code exchange, client authentication) and its OIDC
claim rules (`CodeIDToken`: iss, aud, azp, exp, iat, nonce, at_hash, auth_time with max_age),
so none of the protocol is written here. The endpoints come from the issuer's discovery
document, fetched on first use and again once it is `DISCOVERY_MAX_AGE` old. The ID token's
signature is checked against the IdP's JWKS with the same cache, algorithms and key rules as
its access tokens (tokens/idp.py).

A step-up's fresh login (RFC 9470 section 4) asks for `prompt=login`, `max_age` and
`acr_values`, and its ID token is refused unless it shows a login that recent and that acr.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import jwt
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oidc.core import CodeIDToken
from joserfc.errors import JoseError

from agentid_server.config import IdpSettings
from agentid_server.domain.ports import Clock
from agentid_server.tokens.idp import JwksCache, key_fits

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
MAX_DISCOVERY_BYTES = 256 * 1024
DISCOVERY_MAX_AGE = 3600.0  # the discovery document is read again this often
DISCOVERY_RETRY = 10.0  # after a failed read, the next try waits this long
MAX_ID_TOKEN_BYTES = 16 * 1024


class LoginFailed(Exception):
    """A sign-in refused: ``reason`` is stable (tests, logs); the message is safe to show."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Authorization:
    """Where to send the browser, and what the callback must find again (kept server-side)."""

    url: str
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True, slots=True)
class IdTokenClaims:
    """What the console keeps of a validated ID token."""

    subject: str
    auth_time: int | None
    acr: str | None


@dataclass(frozen=True, slots=True)
class SignIn:
    """A completed sign-in: the ID token's word on who and how, and the access token that is
    the user's credential at agentid (what ResolveStepUp and Delegate verify)."""

    id_token: IdTokenClaims
    access_token: str


@dataclass(frozen=True, slots=True)
class _Discovery:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    jwks: JwksCache
    algorithms: tuple[str, ...]


class OidcClient:
    """Signs users in at one IdP (the `[[idp]]` with a `client_id`)."""

    def __init__(
        self, idp: IdpSettings, redirect_uri: str, client_secret: str | None, clock: Clock
    ) -> None:
        self._idp = idp
        self._redirect_uri = redirect_uri
        self._secret = client_secret
        self._clock = clock
        self._discovery: _Discovery | None = None
        self._loaded_at = float("-inf")
        self._tried_at = float("-inf")

    @property
    def issuer(self) -> str:
        return self._idp.issuer

    def _client(self) -> AsyncOAuth2Client:
        """A fresh Authlib client per sign-in: it keeps per-flow state of its own."""
        return AsyncOAuth2Client(
            client_id=self._idp.client_id,
            client_secret=self._secret,
            token_endpoint_auth_method="client_secret_basic" if self._secret else "none",
            scope=" ".join(self._idp.login_scopes),
            redirect_uri=self._redirect_uri,
            code_challenge_method="S256",
            timeout=FETCH_TIMEOUT,
        )

    async def authorization(
        self, *, max_age: int | None = None, acr_values: Sequence[str] = ()
    ) -> Authorization:
        """The authorization request. With ``max_age`` or ``acr_values`` (a step-up's fresh
        login) the IdP is also told `prompt=login`: it must authenticate the user again."""
        discovery = await self._discover()
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = generate_token(64)  # RFC 7636: 43 to 128 characters
        extra: dict[str, str] = {"nonce": nonce}
        if max_age is not None:
            extra["max_age"] = str(max_age)
        if acr_values:
            extra["acr_values"] = " ".join(acr_values)
        if max_age is not None or acr_values:
            extra["prompt"] = "login"
        async with self._client() as client:
            url, _ = client.create_authorization_url(
                discovery.authorization_endpoint, state=state, code_verifier=verifier, **extra
            )
        return Authorization(url=url, state=state, nonce=nonce, code_verifier=verifier)

    async def finish(
        self,
        code: str,
        *,
        nonce: str,
        code_verifier: str,
        max_age: int | None = None,
        acr_values: Sequence[str] = (),
    ) -> SignIn:
        """Exchanges the code (with its PKCE verifier) and validates the ID token."""
        discovery = await self._discover()
        try:
            async with self._client() as client:
                token: dict[str, Any] = await client.fetch_token(
                    discovery.token_endpoint,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
        except OAuthError as error:
            raise LoginFailed(
                f"the IdP refused the code: {str(error.error)[:64]}", "CODE_REFUSED"
            ) from None
        except (httpx2.HTTPError, ValueError) as error:
            log.warning("the IdP's token endpoint failed: %s", type(error).__name__)
            raise LoginFailed(
                "the IdP's token endpoint did not answer", "IDP_UNAVAILABLE"
            ) from None
        access_token, id_token = token.get("access_token"), token.get("id_token")
        if not isinstance(access_token, str) or not isinstance(id_token, str):
            raise LoginFailed("the IdP answered without an ID and access token", "NO_TOKENS")
        claims = await validate_id_token(
            id_token,
            keys=discovery.jwks,
            algorithms=discovery.algorithms,
            issuer=self._idp.issuer,
            client_id=self._idp.client_id,
            nonce=nonce,
            access_token=access_token,
            now=self._clock.now(),
            leeway=self._idp.leeway,
            max_age=max_age,
            acr_values=acr_values,
        )
        return SignIn(claims, access_token)

    async def _discover(self) -> _Discovery:
        now = self._clock.monotonic()
        fresh = now - self._loaded_at < DISCOVERY_MAX_AGE
        if self._discovery is not None and (fresh or now - self._tried_at < DISCOVERY_RETRY):
            return self._discovery
        if self._discovery is None and now - self._tried_at < DISCOVERY_RETRY:
            raise LoginFailed("the IdP's discovery document is unavailable", "IDP_UNAVAILABLE")
        self._tried_at = now
        try:
            document = await self._fetch_discovery()
        except (httpx2.HTTPError, ValueError) as error:
            log.warning("could not read the IdP's discovery document: %s", error)
            if self._discovery is not None:
                return self._discovery  # the last one read stays in use
            raise LoginFailed(
                "the IdP's discovery document is unavailable", "IDP_UNAVAILABLE"
            ) from None
        jwks_uri = document["jwks_uri"]
        known = self._discovery
        jwks = (
            known.jwks
            if known is not None and known.jwks_uri == jwks_uri
            else JwksCache(
                "",
                jwks_uri,
                self._idp.jwks_min_refresh,
                self._idp.jwks_max_age,
                monotonic=self._clock.monotonic,
                owner=f"IdP {self._idp.issuer} (ID tokens)",
            )
        )
        offered = document.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = tuple(a for a in self._idp.algorithms if a in offered)
        self._discovery = _Discovery(
            document["authorization_endpoint"],
            document["token_endpoint"],
            jwks_uri,
            jwks,
            algorithms,
        )
        self._loaded_at = now
        return self._discovery

    async def _fetch_discovery(self) -> dict[str, Any]:
        url = self._idp.issuer.rstrip("/") + "/.well-known/openid-configuration"
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
        # OpenID Connect Discovery 4.3: the issuer named must be the one asked.
        if document.get("issuer") != self._idp.issuer:
            raise ValueError("the discovery document names another issuer")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(name), str):
                raise ValueError(f"the discovery document has no {name}")
        return document


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
    return IdTokenClaims(subject, auth_time, acr if isinstance(acr, str) else None)

"""agentid as an OpenID Connect client of its `[[idp]]`: the console's sign-in.

The authorization code flow with PKCE (S256), `state` and `nonce`, spoken through Authlib's
OAuth 2 client (the authorization URL, the code exchange, client authentication) and its OIDC
claim rules (`CodeIDToken`: iss, aud, azp, exp, iat, nonce, at_hash, auth_time with max_age),
so none of the protocol is written here; the rules it shares with `agentid login` (discovery,
the request's fresh values, the ID token's checks) are in tokens/oidc.py. The endpoints come
from the issuer's discovery document, fetched on first use and again once it is
`DISCOVERY_MAX_AGE` old. The ID token's signature is checked against the IdP's JWKS with the
same cache, algorithms and key rules as its access tokens (tokens/idp.py).

A step-up's fresh login (RFC 9470 section 4) asks for `prompt=login`, `max_age` and
`acr_values`, and its ID token is refused unless it shows a login that recent and that acr.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client

from agentid_server.config import IdpSettings
from agentid_server.domain.ports import Clock
from agentid_server.tokens.idp import JwksCache
from agentid_server.tokens.oidc import (
    Authorization,
    IdTokenClaims,
    LoginFailed,
    authorization_request,
    exchange_code,
    fetch_discovery,
    offered_algorithms,
    validate_id_token,
)

# What the console and its tests name from here; the rules themselves live in tokens/oidc.py.
__all__ = [
    "Authorization",
    "IdTokenClaims",
    "LoginFailed",
    "OidcClient",
    "SignIn",
    "validate_id_token",
]

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
DISCOVERY_MAX_AGE = 3600.0  # the discovery document is read again this often
DISCOVERY_RETRY = 10.0  # after a failed read, the next try waits this long


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
        async with self._client() as client:
            return authorization_request(
                client, discovery.authorization_endpoint, max_age=max_age, acr_values=acr_values
            )

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
        async with self._client() as client:
            token = await exchange_code(client, discovery.token_endpoint, code, code_verifier)
        access_token, id_token = token["access_token"], token["id_token"]
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
            document = await fetch_discovery(self._idp.issuer)
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
        algorithms = offered_algorithms(document, self._idp.algorithms)
        self._discovery = _Discovery(
            document["authorization_endpoint"],
            document["token_endpoint"],
            jwks_uri,
            jwks,
            algorithms,
        )
        self._loaded_at = now
        return self._discovery

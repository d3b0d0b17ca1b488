"""User authentication: IdP tokens from the trusted `[[idp]]`s, verified against their JWKS.

The JWKS comes from a file or a URL, is cached, and is fetched again when a token names a `kid`
we do not know (at most once per `jwks_min_refresh`, so unknown kids cannot hammer the IdP) and
once it is `jwks_max_age` old, so a key the IdP removed stops being trusted. While the IdP cannot
be reached, the keys last loaded stay in use, and a fetch is tried again every `jwks_min_refresh`.
Only RS256, PS256, ES256 and EdDSA are accepted; `none` and HMAC never are.

A verified token is remembered (bounded, keyed by the token string) until it expires or its key
leaves the JWKS: a user calling again with the same token costs a dict lookup and a clock read
instead of three JWT decodes and a signature check (≈ 330 µs here, whatever the algorithm).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agentid_server.config import IdpSettings
from agentid_server.domain.errors import Unauthenticated
from agentid_server.domain.model import UserPrincipal
from agentid_server.domain.revoking import MAX_USER_ID_LENGTH
from agentid_server.domain.scopes import Scope, ScopeSet, ScopeSyntaxError
from agentid_server.tokens.agent_tokens import cached_bytes

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1 << 20
VERIFIED_CACHE_SIZE = 4096  # users' tokens remembered at once; the least recently used go first
VERIFIED_CACHE_BYTES = 32 << 20  # and the memory they may take, as cached_bytes counts it


class JwksCache:
    """The public keys of one IdP (or one agent: its client assertions' keys) by kid, loaded
    from its file or URL. ``monotonic``: the clock that paces fetches (the server's, so tests
    can move it); ``owner``: whose keys they are, as logged."""

    def __init__(
        self,
        source_file: str,
        source_url: str,
        min_refresh: float,
        max_age: float = 600.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        owner: str = "IdP",
    ) -> None:
        self._file, self._url = source_file, source_url
        self._monotonic, self._owner = monotonic, owner
        self._min_refresh = min_refresh
        self._max_age = max_age
        self._keys: dict[str, IdpKey] = {}
        self._tried_at = float("-inf")  # the last fetch, successful or not
        self._loaded_at = float("-inf")  # the last successful one
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> IdpKey | None:
        if self._due(kid):
            async with self._lock:
                if self._due(kid):  # nobody refreshed while this call waited for the lock
                    await self.refresh()
        return self._keys.get(kid)

    def _due(self, kid: str) -> bool:
        """Fetch when the keys are old or lack ``kid``, at most once per min_refresh."""
        now = self._monotonic()
        if now - self._tried_at < self._min_refresh:
            return False
        return kid not in self._keys or now - self._loaded_at >= self._max_age

    async def refresh(self) -> None:
        started = self._tried_at = self._monotonic()
        try:
            document = await asyncio.to_thread(self._read)
            self._keys = parse_jwks(document)
            self._loaded_at = started
        except (OSError, ValueError) as exc:
            # Keep serving with the keys we have; the next call after jwks_min_refresh tries again.
            source = self._file or _without_secrets(self._url)
            log.warning(
                "could not load %s JWKS from %s: %s", self._owner, source, type(exc).__name__
            )

    def _read(self) -> Any:
        if self._file:
            with open(self._file, "rb") as handle:
                raw = handle.read(MAX_JWKS_BYTES + 1)
        else:
            request = urllib.request.Request(self._url, headers={"Accept": "application/json"})  # noqa: S310
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:  # noqa: S310
                raw = response.read(MAX_JWKS_BYTES + 1)
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError("the JWKS document is too large")
        return json.loads(raw)


@dataclass(frozen=True)
class IdpKey:
    material: Any
    declared_alg: str | None


def _without_secrets(url: str) -> str:
    """The URL as logged: no credentials, query or fragment (they may carry a secret)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_jwks(document: Any) -> dict[str, IdpKey]:
    """Signature keys with a kid, by kid; keys for encryption or of unusable types are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys: dict[str, IdpKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue
        try:
            material = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue
        declared = entry.get("alg")
        keys[entry["kid"]] = IdpKey(material, declared if isinstance(declared, str) else None)
    return keys


def key_fits(alg: str, key: IdpKey) -> bool:
    """Does the key's type fit the algorithm (and its own `alg`, when the JWK states one)?"""
    if key.declared_alg is not None and key.declared_alg != alg:
        return False
    material = key.material
    if alg in ("RS256", "PS256"):
        return isinstance(material, rsa.RSAPublicKey) and material.key_size >= 2048
    if alg == "ES256":
        return isinstance(material, ec.EllipticCurvePublicKey) and isinstance(
            material.curve, ec.SECP256R1
        )
    if alg == "EdDSA":
        return isinstance(material, ed25519.Ed25519PublicKey)
    return False


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token that verified: its principal, until when it stays valid, and the key it needs."""

    principal: UserPrincipal
    valid_until: float  # exp + leeway: from then on PyJWT would call it expired
    jwks: JwksCache
    kid: str
    key: IdpKey


def _cached_bytes(token: str, verified: _Verified) -> int:
    return cached_bytes(token, len(verified.principal.grantable.scopes))


class IdpVerifier:
    """Turns an IdP token into a UserPrincipal, or raises Unauthenticated with a reason."""

    def __init__(
        self,
        idps: Sequence[IdpSettings],
        max_token_bytes: int,
        cache_size: int = VERIFIED_CACHE_SIZE,
        cache_bytes: int = VERIFIED_CACHE_BYTES,
    ) -> None:
        self._idps = {idp.issuer: idp for idp in idps}
        self._jwks = {
            idp.issuer: JwksCache(
                idp.jwks_file, idp.jwks_url, idp.jwks_min_refresh, idp.jwks_max_age
            )
            for idp in idps
        }
        self._max_token_bytes = max_token_bytes
        self._verified: dict[str, _Verified] = {}
        self._cache_size = max(1, cache_size)
        self._cache_bytes = cache_bytes
        self._bytes = 0

    async def load(self) -> None:
        """Loads every JWKS once at start."""
        await asyncio.gather(*(cache.refresh() for cache in self._jwks.values()))

    async def verify(self, token: str) -> UserPrincipal:
        if len(token) > self._max_token_bytes:
            raise Unauthenticated("the token is too large", reason="TOKEN_TOO_LARGE")
        cache = self._verified
        known = cache.pop(token, None)
        if known is not None and (
            time.time() >= known.valid_until  # expired: verified again, refused with why
            # its key was rotated out (the JWKS read again first when jwks_max_age is up)
            or await known.jwks.key(known.kid) is not known.key
        ):
            self._bytes -= _cached_bytes(token, known)
            known = None
        if known is None:
            known = await self._verify_uncached(token)
            cost = _cached_bytes(token, known)
            if cost > self._cache_bytes:
                return known.principal  # larger than the whole cache: not remembered
            while cache and (
                len(cache) >= self._cache_size or self._bytes + cost > self._cache_bytes
            ):
                oldest = next(iter(cache))  # least recently used first: dicts keep order
                self._bytes -= _cached_bytes(oldest, cache.pop(oldest))
            self._bytes += cost
        replaced = cache.pop(token, None)  # put back by a call that ran while this one awaited
        if replaced is not None:
            self._bytes -= _cached_bytes(token, replaced)
        cache[token] = known  # (re)inserted last: the most recently used
        return known.principal

    async def _verify_uncached(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise Unauthenticated(
                "the credential is not a valid JWT", reason="TOKEN_MALFORMED"
            ) from None
        issuer = unverified.get("iss")
        idp = self._idps.get(issuer) if isinstance(issuer, str) else None
        if idp is None:
            raise Unauthenticated("the token's issuer is not trusted", reason="UNTRUSTED_ISSUER")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in idp.algorithms:
            raise Unauthenticated(
                "the token's algorithm is not allowed", reason="ALGORITHM_NOT_ALLOWED"
            )
        if "crit" in header:
            raise Unauthenticated(
                "critical header extensions are refused", reason="TOKEN_MALFORMED"
            )
        if not isinstance(kid, str):
            raise Unauthenticated("the token's signing key is unknown", reason="UNKNOWN_KEY")
        key = await self._jwks[idp.issuer].key(kid)
        if key is None:
            raise Unauthenticated("the token's signing key is unknown", reason="UNKNOWN_KEY")
        if not key_fits(alg, key):
            raise Unauthenticated(
                "the key does not fit the algorithm", reason="ALGORITHM_NOT_ALLOWED"
            )
        try:
            claims = jwt.decode(
                token,
                key.material,
                algorithms=[alg],
                audience=idp.audience,
                issuer=idp.issuer,
                leeway=idp.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the IdP token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                "the IdP token is not valid yet", reason="TOKEN_NOT_YET_VALID"
            ) from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                "the IdP token is for another audience", reason="AUDIENCE_MISMATCH"
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                "the IdP token's signature is invalid", reason="SIGNATURE_INVALID"
            ) from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("the IdP token is invalid", reason="TOKEN_INVALID") from None
        valid_until = float(claims["exp"]) + idp.leeway  # PyJWT checked it is a number
        principal = replace(_principal(idp, claims), valid_until=valid_until)
        return _Verified(principal, valid_until, self._jwks[idp.issuer], kid, key)


def _principal(idp: IdpSettings, claims: dict[str, Any]) -> UserPrincipal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("the IdP token has no subject", reason="TOKEN_INVALID")
    user_id = idp.subject_prefix + subject
    if len(user_id) > MAX_USER_ID_LENGTH or not user_id.isprintable():
        raise Unauthenticated(
            "the IdP token's subject is not a user id here "
            f"(printable, at most {MAX_USER_ID_LENGTH} characters)",
            reason="TOKEN_INVALID",
        )
    raw = claims.get(idp.scope_claim, "")
    texts = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    grantable: list[Scope] = []
    for text in texts:
        if not isinstance(text, str):
            continue
        try:
            grantable.append(Scope.parse(text))
        except ScopeSyntaxError:
            log.debug("ignoring an IdP scope that is not in agentid's grammar")
    auth_time = claims.get("auth_time")
    acr = claims.get("acr")
    return UserPrincipal(
        user_id=user_id,
        issuer=idp.issuer,
        grantable=ScopeSet(tuple(grantable)),
        auth_time=auth_time
        if isinstance(auth_time, int) and not isinstance(auth_time, bool)
        else None,
        acr=acr if isinstance(acr, str) else None,
        clock_leeway=idp.leeway,
    )

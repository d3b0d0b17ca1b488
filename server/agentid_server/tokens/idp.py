"""User authentication: IdP tokens from the trusted `[[idp]]`s, verified against their JWKS.

The JWKS comes from a file, a URL, or the URL the issuer's discovery document names (OpenID
Connect Discovery 1.0: its `issuer` must be the configured one, exactly). It is cached, and is
fetched again when a token names a `kid` we do not know (at most once per `jwks_min_refresh`,
so unknown kids cannot hammer the IdP) and once it is `jwks_max_age` old, so a key the IdP
removed stops being trusted. While the IdP cannot be reached, the keys last loaded stay in use,
and a fetch is tried again every `jwks_min_refresh`. With discovery, each fetch reads the
discovery document first, then the JWKS it names; a document naming another issuer is refused
like an unreachable one (the last keys stay), except at start, where it stops the start (see
`IdpVerifier.load`). URLs are https (plain http only on loopback), redirects included.
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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from http.client import HTTPMessage
from typing import IO, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agentid_server.config import ConfigError, IdpSettings, is_loopback
from agentid_server.domain.errors import Unauthenticated
from agentid_server.domain.model import UserPrincipal
from agentid_server.tokens import idp_claims
from agentid_server.tokens.agent_tokens import cached_bytes

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1 << 20
MAX_DISCOVERY_BYTES = 256 * 1024
DISCOVERY_PATH = "/.well-known/openid-configuration"
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
        discovery_issuer: str = "",
    ) -> None:
        self._file, self._url = source_file, source_url
        # With discovery_issuer (and no file or URL): the JWKS URL comes from its discovery
        # document, read again before each JWKS fetch.
        self._discovery_issuer = discovery_issuer
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

    async def refresh(self, *, strict: bool = False) -> None:
        """Loads the keys again; on failure the last ones stay in use and it is logged. With
        ``strict``, a discovery document refused for what it says (not for being unreachable)
        raises DiscoveryRefused instead."""
        started = self._tried_at = self._monotonic()
        try:
            document = await asyncio.to_thread(self._read)
            self._keys = parse_jwks(document)
            self._loaded_at = started
        except DiscoveryRefused as exc:
            log.warning("refused the discovery document of %s: %s", self._owner, exc)
            if strict:
                raise
        except (OSError, ValueError) as exc:
            # Keep serving with the keys we have; the next call after jwks_min_refresh tries again.
            source = self._file or _without_secrets(self._url or self._discovery_issuer)
            log.warning(
                "could not load %s JWKS from %s: %s", self._owner, source, type(exc).__name__
            )

    def _read(self) -> Any:
        if self._file:
            with open(self._file, "rb") as handle:
                raw = handle.read(MAX_JWKS_BYTES + 1)
            if len(raw) > MAX_JWKS_BYTES:
                raise ValueError("the JWKS document is too large")
            return json.loads(raw)
        url = self._url or jwks_uri_of(
            _fetch_json(self._discovery_issuer.rstrip("/") + DISCOVERY_PATH, MAX_DISCOVERY_BYTES),
            self._discovery_issuer,
        )
        return _fetch_json(url, MAX_JWKS_BYTES)


class DiscoveryRefused(ValueError):
    """A discovery document that answered, and does not fit: another issuer, no usable
    `jwks_uri`. The message is safe to log (nothing of the document but its issuer)."""


def jwks_uri_of(document: Any, issuer: str) -> str:
    """The `jwks_uri` of ``issuer``'s discovery document, which must name that very issuer
    (OpenID Connect Discovery 1.0 section 4.3), or DiscoveryRefused."""
    if not isinstance(document, dict):
        raise DiscoveryRefused("the discovery document is not a JSON object")
    named = document.get("issuer")
    if named != issuer:
        shown = repr(named)[:200] if isinstance(named, str) else "none"
        raise DiscoveryRefused(f"it names the issuer {shown}, not {issuer!r}")
    uri = document.get("jwks_uri")
    if not isinstance(uri, str) or not https_or_loopback(uri):
        raise DiscoveryRefused("its jwks_uri is missing or not https (http only on loopback)")
    return uri


def https_or_loopback(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return bool(parts.hostname)
    host = parts.hostname or ""
    return parts.scheme == "http" and is_loopback(f"{host}:0")


class _HttpsRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to https (plain http only on loopback)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not https_or_loopback(newurl):
            raise urllib.error.HTTPError(newurl, code, "redirect to plain http", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpsRedirects)


def _fetch_json(url: str, limit: int) -> Any:
    """GETs a JSON document of at most ``limit`` bytes (OSError or ValueError otherwise)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with _OPENER.open(request, timeout=FETCH_TIMEOUT) as response:
        raw = response.read(limit + 1)
    if len(raw) > limit:
        raise ValueError("the document is too large")
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
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # Every issuer a token may name (Entra's: one per tenant), with its IdP and its keys:
        # one JWKS per IdP from a file or URL, one per issuer from discovery.
        self._idps: dict[str, IdpSettings] = {}
        self._jwks: dict[str, JwksCache] = {}
        self._where: dict[JwksCache, tuple[int, IdpSettings]] = {}
        for index, idp in enumerate(idps):
            shared = None
            for issuer in idp.issuers:
                cache = shared or JwksCache(
                    idp.jwks_file,
                    idp.jwks_url,
                    idp.jwks_min_refresh,
                    idp.jwks_max_age,
                    monotonic=monotonic,
                    owner=f"IdP {issuer}",
                    discovery_issuer=issuer if idp.discovery else "",
                )
                shared = None if idp.discovery else cache
                self._idps[issuer], self._jwks[issuer] = idp, cache
                self._where[cache] = (index, idp)
        self._max_token_bytes = max_token_bytes
        self._verified: dict[str, _Verified] = {}
        self._cache_size = max(1, cache_size)
        self._cache_bytes = cache_bytes
        self._bytes = 0

    async def load(self, source: str = "<config>") -> None:
        """Loads every JWKS once at start. An IdP that cannot be reached is logged and tried
        again later (its users are refused meanwhile); a discovery document that answers and
        names another issuer, or no usable jwks_uri, is a configuration mistake no retry
        mends: ConfigError naming that [[idp]] (of ``source``), and the server does not start."""

        async def one(cache: JwksCache) -> None:
            try:
                await cache.refresh(strict=True)
            except DiscoveryRefused as refused:
                index, _ = self._where[cache]
                raise ConfigError(
                    source, f"idp[{index}].issuer", f"its discovery document: {refused}"
                ) from None

        await asyncio.gather(*(one(cache) for cache in self._where))

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
        if idp is None or not isinstance(issuer, str):
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
        jwks = self._jwks[issuer]
        key = await jwks.key(kid)
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
                issuer=issuer,
                leeway=idp.leeway,
                options={"require": ["exp", "iss", "aud"]},
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
        principal = replace(idp_claims.principal(idp, issuer, claims), valid_until=valid_until)
        return _Verified(principal, valid_until, jwks, kid, key)

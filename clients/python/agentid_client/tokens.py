"""Agent tokens for services that verify them themselves: the claims, verified against agentid's
JWKS (cached; fetched again when a token names a key the cache lacks, and when the cache is old),
and, with a RevocationWatcher, a local "is this token good" without a Check. RFC 7638
thumbprints for ``jkt``.

    verifier = TokenVerifier(issuer="https://agentid.example", keys=client,
                             audience="https://api.example", watcher=watcher)
    claims = await verifier.verify(token)        # TokenRejected(reason) when it is not good
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import jwt

if TYPE_CHECKING:
    from agentid_client._client import AgentIdClient
    from agentid_client._revocations import RevocationWatcher

TokenProblem = Literal[
    "TOKEN_MALFORMED",
    "SIGNATURE_INVALID",
    "TOKEN_EXPIRED",
    "TOKEN_NOT_YET_VALID",
    "AUDIENCE_MISMATCH",
    "SESSION_REVOKED",
]
# What agentid signs agent tokens with (its signing keys are Ed25519 or P-256); never none/HS*.
ALGORITHMS = frozenset({"EdDSA", "ES256"})
# The header types agentid issues (`tokens.typ`): api.md's agent+jwt, or RFC 9068's at+jwt.
TOKEN_TYPES = frozenset({"agent+jwt", "at+jwt"})
MAX_TOKEN_BYTES = 16 * 1024  # a token longer than this is refused before it is parsed
MAX_JWKS_KEYS = 64  # a key set with more keys than this is refused, not cached
_REQUIRED = ["iss", "sub", "act", "jti", "sn", "iat", "nbf", "exp", "scope"]
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


class TokenRejected(Exception):
    """A token that is not good; ``reason`` says why, in the names of Check's Reason (without
    ``REASON_``). The message never quotes the token."""

    def __init__(self, reason: TokenProblem, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: TokenProblem = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Actor:
    """The actor chain: this agent (``sub``, its session ``sid``), and for a sub-agent its
    parent's actor in ``act``."""

    sub: str
    sid: str
    act: Actor | None = None


@dataclass(frozen=True, slots=True)
class AgentClaims:
    """An agent token's claims (api.md "Agent tokens"). ``sub`` is the delegating user,
    ``act.sub`` the agent, ``jti`` the session id, ``sn`` its serial in the revocation set."""

    iss: str
    sub: str
    act: Actor
    scopes: tuple[str, ...]
    jti: str
    sn: int
    iat: int
    nbf: int
    exp: int
    aud: tuple[str, ...] | None = None  # None: any audience
    task: str | None = None
    parent: str | None = None
    jkt: str | None = None  # cnf.jkt: the token is bound to this key (DPoP)
    payload: Mapping[str, Any] = field(default_factory=dict)  # every claim as carried

    @property
    def agent_id(self) -> str:
        return self.act.sub

    @property
    def session_id(self) -> str:
        return self.jti


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding: Delegate's
    ``jkt``. ValueError for a key type or member it cannot hash."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError("unsupported key type")
    try:
        required = {name: jwk[name] for name in members}
    except KeyError as exc:
        raise ValueError(f"the JWK lacks {exc.args[0]!r}") from None
    if not all(isinstance(v, str) for v in required.values()):
        raise ValueError("JWK members must be strings")
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def parse_jwks(jwks: str | bytes | Mapping[str, Any]) -> jwt.PyJWKSet:
    """A JWK Set (GetJwks' ``jwks_json``, or a ``jwks_uri`` document) as PyJWT keys. Refuses
    anything but a set of at most MAX_JWKS_KEYS public keys (ValueError)."""
    document = json.loads(jwks) if isinstance(jwks, str | bytes) else jwks
    keys = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError("not a JWK Set: no keys")
    if len(keys) > MAX_JWKS_KEYS:
        raise ValueError(f"a JWK Set of at most {MAX_JWKS_KEYS} keys was expected")
    for key in keys:
        if not isinstance(key, Mapping) or "d" in key:
            raise ValueError("a JWK Set of public keys was expected")
    try:
        return jwt.PyJWKSet(keys)
    except jwt.PyJWKSetError as exc:
        raise ValueError(f"not a usable JWK Set: {exc}") from None


KeyFetch = Callable[[], Awaitable[jwt.PyJWKSet]]


def keys_from_client(client: AgentIdClient) -> KeyFetch:
    """The keys GetJwks answers."""

    async def fetch() -> jwt.PyJWKSet:
        return await client.jwk_set()

    return fetch


def keys_from_url(jwks_uri: str, *, timeout: float = 10.0) -> KeyFetch:
    """The keys agentid's HTTP door publishes (its metadata's ``jwks_uri``), fetched by PyJWT's
    client in a worker thread so the event loop keeps serving."""
    fetcher = jwt.PyJWKClient(jwks_uri, cache_jwk_set=False, cache_keys=False, timeout=timeout)

    async def fetch() -> jwt.PyJWKSet:
        try:
            document = await asyncio.to_thread(fetcher.fetch_data)
        except jwt.PyJWKClientConnectionError as exc:
            raise ConnectionError(f"the JWKS at {jwks_uri} could not be fetched: {exc}") from None
        return parse_jwks(document)

    return fetch


class TokenVerifier:
    """Verifies agent tokens locally: the signature against agentid's keys, ``typ``, ``iss``,
    the times, the audience and, with a watcher, revocation.

    ``keys``: an AgentIdClient (GetJwks), the HTTP door's ``jwks_uri``, or a KeyFetch. Keys are
    cached: fetched again when a token names a ``kid`` the cache lacks (at most once per
    ``refetch_cooldown`` seconds, so made-up kids do not become a flood of fetches) and when
    the cache is ``max_key_age`` seconds old (a retired key stops verifying then). A failed
    fetch raises its error (the token is neither good nor bad: refuse the request).

    ``audience``: this service's. A token with ``aud`` must list it; a token with ``aud`` is
    refused when no audience is given (it was meant for particular services).

    ``watcher``: with one, a revoked session's token is SESSION_REVOKED, and WatcherNotReady /
    WatcherStopped are raised through (the revocation state is unknown: refuse the token).

    ``nbf_leeway``: how far ahead of this clock a token's ``nbf`` may be (agentid's
    ``tokens.nbf_leeway``, 5 s); ``exp`` gets none, as in agentid. ``clock``: seconds since the
    epoch (tests)."""

    def __init__(
        self,
        issuer: str,
        keys: AgentIdClient | str | KeyFetch,
        *,
        audience: str | None = None,
        watcher: RevocationWatcher | None = None,
        nbf_leeway: float = 5.0,
        refetch_cooldown: float = 30.0,
        max_key_age: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer:
            raise ValueError("issuer is required")
        self._issuer = issuer
        if isinstance(keys, str):
            self._fetch = keys_from_url(keys)
        elif callable(keys):
            self._fetch = keys
        else:
            self._fetch = keys_from_client(keys)
        self._audience = audience
        self._watcher = watcher
        self._nbf_leeway = nbf_leeway
        self._cooldown = refetch_cooldown
        self._max_age = max_key_age
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = float("-inf")  # when the keys were last fetched (monotonic)
        self._attempted = float("-inf")  # when a fetch was last begun
        self._fetching: asyncio.Future[None] | None = None

    async def verify(self, token: str) -> AgentClaims:
        """The token's claims if it is good; TokenRejected (with its reason) if not."""
        header = _header(token)
        key = await self._key(header)
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                options={
                    "require": _REQUIRED,
                    # The times and the audience are checked below, on this verifier's clock;
                    # a token without aud is for anyone.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                },
            )
        except jwt.InvalidIssuerError:
            raise TokenRejected("TOKEN_MALFORMED", "issued by someone else") from None
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            raise TokenRejected("SIGNATURE_INVALID", "the signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected("TOKEN_MALFORMED", f"no {exc.claim} claim") from None
        except jwt.InvalidTokenError:
            raise TokenRejected("TOKEN_MALFORMED", "not a well-formed agent token") from None
        claims = _claims(payload)
        now = self._clock()
        if now >= claims.exp:
            raise TokenRejected("TOKEN_EXPIRED", "the token has expired")
        if claims.nbf > now + self._nbf_leeway:
            raise TokenRejected("TOKEN_NOT_YET_VALID", "the token is not valid yet")
        if claims.aud is not None and (self._audience is None or self._audience not in claims.aud):
            raise TokenRejected("AUDIENCE_MISMATCH", "the token is for other audiences")
        if self._watcher is not None and self._watcher.is_revoked(claims.sn):
            raise TokenRejected("SESSION_REVOKED", f"session {claims.jti} is revoked")
        return claims

    async def _key(self, header: Mapping[str, Any]) -> jwt.PyJWK:
        kid = header["kid"]
        now = time.monotonic()
        stale = now - self._fetched >= self._max_age
        if not self._keys or (
            (stale or kid not in self._keys) and now - self._attempted >= self._cooldown
        ):
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise TokenRejected("SIGNATURE_INVALID", "unknown signing key")
        if key.algorithm_name not in ALGORITHMS or header["alg"] != key.algorithm_name:
            raise TokenRejected("SIGNATURE_INVALID", "the algorithm is not the key's")
        return key

    async def _refresh(self) -> None:
        """Fetches the keys once for every caller waiting on them (single flight)."""
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch_keys())
            self._fetching.add_done_callback(self._fetched_keys)
        await asyncio.shield(self._fetching)

    def _fetched_keys(self, done: asyncio.Future[None]) -> None:
        self._fetching = None
        if not done.cancelled():
            done.exception()  # retrieved here: each waiter gets it raised too

    async def _fetch_keys(self) -> None:
        self._attempted = time.monotonic()
        key_set = await self._fetch()  # a failure keeps the keys held
        self._fetched = time.monotonic()
        self._keys = {key.key_id: key for key in key_set.keys if key.key_id}


def _header(token: str) -> dict[str, Any]:
    """The JWS header, read before any key is looked up: a compact JWS of bounded size whose
    header names a ``kid``, an ``alg`` and one of agentid's token types."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise TokenRejected("TOKEN_MALFORMED", "not a well-formed compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise TokenRejected("TOKEN_MALFORMED", "not a well-formed compact JWS") from None
    if header.get("typ") not in TOKEN_TYPES:
        raise TokenRejected("TOKEN_MALFORMED", "not an agent token (typ)")
    if "crit" in header:
        raise TokenRejected("TOKEN_MALFORMED", "critical header extensions are refused")
    if not isinstance(header.get("kid"), str) or not isinstance(header.get("alg"), str):
        raise TokenRejected("TOKEN_MALFORMED", "the kid or alg header is missing")
    if header["alg"] not in ALGORITHMS:
        raise TokenRejected("SIGNATURE_INVALID", "the algorithm is not one agentid signs with")
    return header


def _actor(value: Any, depth: int = 0) -> Actor:
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("sub"), str)
        or not isinstance(value.get("sid"), str)
        or depth > 32
    ):
        raise TokenRejected("TOKEN_MALFORMED", "no act claim")
    parent = value.get("act")
    return Actor(value["sub"], value["sid"], None if parent is None else _actor(parent, depth + 1))


def _claims(payload: dict[str, Any]) -> AgentClaims:
    def text(name: str) -> str:
        value = payload.get(name)
        if not isinstance(value, str):
            raise TokenRejected("TOKEN_MALFORMED", f"no {name} claim")
        return value

    def integer(name: str) -> int:
        value = payload.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TokenRejected("TOKEN_MALFORMED", f"no {name} claim")
        return value

    aud = payload.get("aud")
    if aud is not None:
        aud = (aud,) if isinstance(aud, str) else aud
        if not isinstance(aud, list | tuple) or not all(isinstance(a, str) for a in aud):
            raise TokenRejected("TOKEN_MALFORMED", "the aud claim is not strings")
        aud = tuple(aud)
    cnf = payload.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, Mapping) else None
    task, parent = payload.get("task"), payload.get("parent")
    return AgentClaims(
        iss=text("iss"),
        sub=text("sub"),
        act=_actor(payload.get("act")),
        scopes=tuple(s for s in text("scope").split(" ") if s),
        jti=text("jti"),
        sn=integer("sn"),
        iat=integer("iat"),
        nbf=integer("nbf"),
        exp=integer("exp"),
        aud=aud,
        task=task if isinstance(task, str) else None,
        parent=parent if isinstance(parent, str) else None,
        jkt=jkt if isinstance(jkt, str) else None,
        payload=payload,
    )

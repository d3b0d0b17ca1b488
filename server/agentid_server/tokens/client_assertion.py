"""Agents' client assertions (RFC 7523 §2.2, OAuth's `private_key_jwt`): how an agent with keys
proves, at each Delegate (or token exchange) for it, that the caller holds one of them.

An assertion is a JWT the agent signs with `iss` = `sub` = its id, an `aud` naming us (the
issuer, or the token endpoint's URL over HTTP), an `exp` at most five minutes ahead and a `jti`
accepted once. The agent's keys are its JWKS (`[[agents]] jwks_file` / `jwks_url`), cached and
read again like an IdP's (`JwksCache`): an unknown `kid` triggers a re-read, at most once per
`AGENT_JWKS_MIN_REFRESH`. Only RS256, PS256, ES256 and EdDSA verify, as the agent's key says;
`none` and HMAC never do, so a public key cannot be used as an HMAC secret.

Times are this server's clock, with ``LEEWAY`` (10 s) each way for the agent's clock: an `exp`
up to 10 s past, an `nbf` or `iat` up to 10 s ahead, an `exp` up to 310 s ahead are accepted.

Spent `jti`s are remembered for the longest an assertion can verify, per agent, in a bounded
cache (full, it refuses new assertions rather than forget live ones, which could then be
replayed) and, with several replicas (PostgreSQL), in the store, so a `jti` one replica accepted
is refused by all."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from agentid_server.domain.errors import ResourceExhausted
from agentid_server.domain.model import ProofUse
from agentid_server.domain.ports import AssertionRejected, Clock
from agentid_server.tokens.idp import IdpKey, key_fits

ASSERTION_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
# `typ` values an assertion may carry (none is usual); other typed JWTs (our agent tokens'
# agent+jwt, DPoP proofs' dpop+jwt) are never client assertions.
ASSERTION_TYPES = ("JWT", "client-authentication+jwt")
MAX_ASSERTION_BYTES = 8192  # an RSA-4096 assertion is about 1.2 KB
MAX_LIFETIME = 300.0  # `exp` at most this far ahead (http.md: five minutes)
LEEWAY = 10.0  # for the agent's clock, each way
MAX_JTI_LENGTH = 128
AGENT_JWKS_MIN_REFRESH = 30.0  # an unknown kid re-reads the agent's JWKS at most this often
AGENT_JWKS_MAX_AGE = 600.0  # and it is read again this often, so a removed key stops verifying
REPLAY_CACHE_BYTES = 64 << 20
REPLAY_BYTES_PER_AGENT = 8 << 20
# What one remembered jti costs beyond its characters (as DPoP's: a dict slot, the key tuple,
# the strings' headers, the value tuple and its float).
ENTRY_BYTES = 320
# Every assertion still verifiable when remembered is no longer verifiable this long after.
REMEMBER_FOR = MAX_LIFETIME + 2 * LEEWAY
_BAD_JTI = f"has a jti that is not 1 to {MAX_JTI_LENGTH} printable characters"
_LEDGER_PREFIX = "ca:"  # spent_proofs.jkt of an assertion: never a DPoP thumbprint (no ':')


class KeySource(Protocol):
    """One agent's keys by kid (a JwksCache, or keys given inline)."""

    async def key(self, kid: str) -> IdpKey | None: ...

    async def refresh(self) -> None: ...


class AssertionLedger(Protocol):
    """The store's record of spent jtis, shared by the replicas (storage.proofs)."""

    async def claim(self, use: ProofUse) -> bool:
        """Records the use; False when it was recorded already."""
        ...


def claimed_client(assertion: str) -> str | None:
    """The agent an assertion says it is from (its `sub`), read unverified: RFC 7521 section
    4.2 lets a client authenticated by an assertion leave `client_id` out, so the token
    endpoint learns from this which agent's keys to verify it with (which then checks iss and
    sub again, signed). None when it names none."""
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) and subject else None


def _rejected(problem: str) -> AssertionRejected:
    return AssertionRejected(f"the client assertion {problem}")


class SpentAssertions:
    """The jtis accepted here, per agent, until no assertion carrying them can verify again.

    Entries are remembered for ``REMEMBER_FOR`` from their acceptance, so they expire in the
    order they came in. At most ``cache_bytes`` in all and ``bytes_per_agent`` per agent: an
    agent filling its share refuses only its own assertions."""

    def __init__(
        self, cache_bytes: int = REPLAY_CACHE_BYTES, bytes_per_agent: int = REPLAY_BYTES_PER_AGENT
    ) -> None:
        self._seen: dict[tuple[str, str], float] = {}  # (agent id, jti) -> forget after
        self._capacity = cache_bytes
        self._per_agent_capacity = min(bytes_per_agent, cache_bytes)
        self._bytes = 0
        self._per_agent: dict[str, int] = {}

    def spend(self, agent_id: str, jti: str, now: float) -> float:
        """Remembers the jti; until when. AssertionRejected when it was spent already,
        ResourceExhausted when there is no room for it."""
        self._forget_expired(now)
        key = (agent_id, jti)
        if key in self._seen:
            raise _rejected("was already used (its jti is spent)")
        cost = ENTRY_BYTES + len(agent_id) + len(jti)
        if self._per_agent.get(agent_id, 0) + cost > self._per_agent_capacity:
            raise _full(f"too many client assertions of agent {agent_id!r} at once")
        if self._bytes + cost > self._capacity:
            raise _full("too many client assertions at once")
        until = now + REMEMBER_FOR
        self._seen[key] = until
        self._bytes += cost
        self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + cost
        return until

    def _forget_expired(self, now: float) -> None:
        seen = self._seen
        while seen:
            first = next(iter(seen))
            if seen[first] > now:
                break
            del seen[first]
            agent_id, jti = first
            cost = ENTRY_BYTES + len(agent_id) + len(jti)
            self._bytes -= cost
            left = self._per_agent[agent_id] - cost
            if left:
                self._per_agent[agent_id] = left
            else:
                del self._per_agent[agent_id]


def _full(problem: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"{problem}: retry with a new assertion shortly",
        reason="ASSERTION_REPLAY_CACHE_FULL",
        retry_after=REMEMBER_FOR,
    )


class ClientAssertionVerifier:
    """The domain's ActorAuthenticator: the agents' JWKS by agent id, the replay cache, and the
    store's ledger when replicas share one."""

    def __init__(
        self,
        jwks: Mapping[str, KeySource],
        clock: Clock,
        *,
        ledger: AssertionLedger | None = None,
        spent: SpentAssertions | None = None,
    ) -> None:
        """``jwks``: each agent's keys, read as they are at each call (the registry's
        AgentKeys keeps them current)."""
        self._jwks = jwks
        self._clock = clock
        self._ledger = ledger
        self._spent = spent or SpentAssertions()

    def has_keys(self, agent_id: str) -> bool:
        return agent_id in self._jwks

    async def load(self) -> None:
        """Reads every agent's JWKS once at start."""
        await asyncio.gather(*(cache.refresh() for cache in self._jwks.values()))

    async def verify(self, agent_id: str, assertion: str, audiences: Sequence[str]) -> None:
        jwks = self._jwks.get(agent_id)
        if jwks is None:
            raise _rejected("names an agent without keys")
        alg, kid = _header(assertion)
        key = await jwks.key(kid)
        if key is None:
            raise _rejected("is signed with a key not in the agent's JWKS (unknown kid)")
        if not key_fits(alg, key):
            raise _rejected("names an algorithm its key is not for")
        claims = _decode(assertion, alg, key, agent_id, audiences)
        now = self._clock.now()
        _check_times(claims, now)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti.isprintable() or not 0 < len(jti) <= MAX_JTI_LENGTH:
            raise _rejected(_BAD_JTI)
        until = self._spent.spend(agent_id, jti, now)
        if self._ledger is not None:
            use = ProofUse(_ledger_key(agent_id), jti, until, agent_id)
            if not await self._ledger.claim(use):
                raise _rejected("was already used (its jti is spent)")


def _header(assertion: str) -> tuple[str, str]:
    """The assertion's alg and kid, refused when the header is not one we verify."""
    if len(assertion) > MAX_ASSERTION_BYTES:
        raise _rejected(f"is larger than {MAX_ASSERTION_BYTES} bytes")
    if not assertion.isascii():
        raise _rejected("is not a compact JWS")
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.InvalidTokenError:
        raise _rejected("is not a compact JWS") from None
    alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
    if alg not in ASSERTION_ALGORITHMS:
        raise _rejected(f"must be signed with {', '.join(ASSERTION_ALGORITHMS)}")
    if typ is not None and typ not in ASSERTION_TYPES:
        raise _rejected("has a typ of another kind of token")
    if "crit" in header:
        raise _rejected("has critical header extensions, which are refused")
    if not isinstance(kid, str) or not kid:
        raise _rejected("names no key (kid)")
    return alg, kid


def _decode(
    assertion: str, alg: str, key: IdpKey, agent_id: str, audiences: Sequence[str]
) -> dict[str, Any]:
    """The claims, once signature, iss, sub and aud are right; times are ours to check."""
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            key.material,
            algorithms=[alg],
            audience=list(audiences),
            issuer=agent_id,
            subject=agent_id,
            options={
                "require": ["iss", "sub", "aud", "exp", "jti"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise _rejected("has an invalid signature") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _rejected(f"lacks the {exc.claim!r} claim") from None
    except jwt.InvalidAudienceError:
        raise _rejected(f"is not for this audience (aud must name {audiences[0]})") from None
    except jwt.InvalidIssuerError:
        raise _rejected("has another issuer than the agent (iss must be its id)") from None
    except InvalidSubjectError:
        raise _rejected("has another subject than the agent (sub must be its id)") from None
    except InvalidJTIError:
        raise _rejected(_BAD_JTI) from None
    except jwt.InvalidTokenError:
        raise _rejected("does not verify") from None
    return claims


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    exp, nbf, iat = claims["exp"], claims.get("nbf"), claims.get("iat")
    if not _number(exp):
        raise _rejected("has an exp that is not a number")
    if exp <= now - LEEWAY:
        raise _rejected("has expired")
    if exp > now + MAX_LIFETIME + LEEWAY:
        raise _rejected(f"expires more than {MAX_LIFETIME:g} s ahead")
    for name, value in (("nbf", nbf), ("iat", iat)):
        if value is None:
            continue
        if not _number(value):
            raise _rejected(f"has an {name} that is not a number")
        if value > now + LEEWAY:
            raise _rejected(f"is not valid yet ({name} is in the future)")


def _ledger_key(agent_id: str) -> str:
    """The agent's key in spent_proofs (64 characters at most, whatever the id's length)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(agent_id.encode()).digest()).rstrip(b"=")
    return _LEDGER_PREFIX + digest.decode("ascii")

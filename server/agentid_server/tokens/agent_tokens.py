"""Agent tokens: issuing (compact JWS, typ agent+jwt or, by config, at+jwt) and verification with a
bounded cache keyed by the exact token string, so a signature is verified once per token, not once
per Check."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, cast

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from nacl.exceptions import BadSignatureError

from agentid_server.domain.model import AgentClaims, Reason
from agentid_server.domain.ports import TokenRejected
from agentid_server.domain.revocation import SERIAL_SPACE
from agentid_server.domain.scopes import ScopeSet, ScopeSyntaxError
from agentid_server.tokens.keys import KeyRing, SigningKey

AGENT_TOKEN_TYPE = "agent+jwt"  # noqa: S105 - a media type, not a secret
# RFC 9068 §2.1: the header typ a generic JWT access token validator requires (tokens.typ).
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
# Every typ we issue is accepted whatever this replica issues: during a change of tokens.typ,
# replicas with the old and the new value verify each other's tokens.
TOKEN_TYPES = frozenset({AGENT_TOKEN_TYPE, ACCESS_TOKEN_TYPE})
_REQUIRED = ["iss", "sub", "act", "jti", "sn", "iat", "nbf", "exp", "scope"]


class AgentTokenIssuer:
    """Signs agent token claims with the key due at their ``iat``. The header's ``typ`` is
    api.md's agent+jwt, or RFC 9068's at+jwt (``tokens.typ``) for resource servers that validate
    agent tokens with a generic JWT access token validator."""

    def __init__(self, keys: KeyRing, typ: str = AGENT_TOKEN_TYPE) -> None:
        if typ not in TOKEN_TYPES:
            raise ValueError(f"typ must be one of {', '.join(sorted(TOKEN_TYPES))}")
        self._keys = keys
        self._typ = typ

    def issue(self, claims: dict[str, Any]) -> str:
        """Signed with the key whose time has come at the token's ``iat``."""
        return sign_jwt(self._keys, claims, self._typ)


def sign_jwt(keys: KeyRing, claims: dict[str, Any], typ: str) -> str:
    """A compact JWS of ``claims``, signed with our key whose time has come at their ``iat``,
    its header naming the key (``kid``) and the type (``typ``: every JWT we sign carries one,
    so no kind is taken for another: agent tokens, Security Event Tokens)."""
    key = keys.signing_key(claims["iat"])
    if key.private_key is None:
        raise ValueError("the active signing key has no private half")
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": typ}
    )


DEFAULT_CACHE_BYTES = 256 << 20


def cached_bytes(token: str, scopes: int) -> int:
    """What remembering a verified token costs, over-estimated from measurements (the token as
    the key; its claims, parsed scopes and strings about two more copies; each parsed scope
    about 500 bytes of objects): the cache is bounded by this, not only by a count of tokens,
    whose size the caller chooses."""
    return 1024 + 3 * len(token) + 512 * scopes


class AgentTokenVerifier:
    """Verifies agent tokens against our own public keys; caches verified claims per token, at
    most ``cache_size`` tokens and ``cache_bytes`` of them (as ``cached_bytes`` counts)."""

    def __init__(
        self, issuer: str, keys: KeyRing, cache_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self._issuer = issuer
        self._keys = keys
        self._cache: dict[str, AgentClaims] = {}
        self._cache_size = max(1, cache_size)
        self._cache_bytes = cache_bytes
        self._bytes = 0

    def verify(self, token: str) -> AgentClaims:
        cache = self._cache
        claims = cache.pop(token, None)
        if claims is None:
            claims = self._verify_signature_and_shape(token)
            cost = cached_bytes(token, len(claims.scopes.scopes))
            if cost > self._cache_bytes:
                return claims  # larger than the whole cache: verified, not remembered
            while cache and (
                len(cache) >= self._cache_size or self._bytes + cost > self._cache_bytes
            ):
                oldest = next(iter(cache))  # least recently used first: dicts keep order
                self._bytes -= cached_bytes(oldest, len(cache.pop(oldest).scopes.scopes))
            self._bytes += cost
        cache[token] = claims  # (re)inserted last: the most recently used
        return claims

    def forget_keys(self, kids: frozenset[str]) -> int:
        """Drops the verified tokens signed by these keys (withdrawn: they must stop verifying
        now, not when they leave the cache); returns how many. Reads each cached token's header:
        a rare, emergency cost, kept off the hot path."""
        cache = self._cache
        signed = [token for token in cache if _kid_of(token) in kids]
        for token in signed:
            self._bytes -= cached_bytes(token, len(cache.pop(token).scopes.scopes))
        return len(signed)

    def _verify_signature_and_shape(self, token: str) -> AgentClaims:
        """The cold path: one signature verification (_signature_valid), nothing else costly.

        Done by hand rather than through PyJWT, which costs twice as much per token here; every
        check PyJWT would make for these tokens is made: strict base64url, JSON objects, `typ`,
        no `crit`, a known `kid`, the key's own algorithm, the signature, `iss`, required claims.
        """
        parts = token.split(".")
        if len(parts) != 3 or not all(_canonical_b64url(p) for p in parts):
            raise TokenRejected(Reason.TOKEN_MALFORMED, "not a well-formed compact JWS")
        header_part, payload_part, signature_part = parts
        header = json_object(header_part)
        if header is None:
            raise TokenRejected(Reason.TOKEN_MALFORMED, "not a well-formed compact JWS")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ not in TOKEN_TYPES:  # a list would not even hash
            raise TokenRejected(Reason.TOKEN_MALFORMED, "not an agent token (typ)")
        if "crit" in header:
            raise TokenRejected(Reason.TOKEN_MALFORMED, "critical header extensions are refused")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenRejected(Reason.TOKEN_MALFORMED, "the kid header is missing or not a string")
        key = self._keys.get(kid)
        if key is None:
            raise TokenRejected(Reason.SIGNATURE_INVALID, "unknown signing key")
        if header.get("alg") != key.alg:  # the key fixes the algorithm, never the header
            raise TokenRejected(Reason.SIGNATURE_INVALID, "algorithm not allowed for this key")
        signing_input = f"{header_part}.{payload_part}".encode("ascii")
        try:
            signature = _b64decode(signature_part)
        except ValueError:
            raise TokenRejected(Reason.SIGNATURE_INVALID, "bad signature") from None
        if not _signature_valid(key, signature, signing_input):
            raise TokenRejected(Reason.SIGNATURE_INVALID, "bad signature")
        payload = json_object(payload_part)
        if payload is None:
            raise TokenRejected(Reason.TOKEN_MALFORMED, "the payload is not a JSON object")
        missing = [claim for claim in _REQUIRED if claim not in payload]
        if missing:
            raise TokenRejected(Reason.TOKEN_MALFORMED, f"claims missing: {' '.join(missing)}")
        if payload["iss"] != self._issuer:
            raise TokenRejected(Reason.TOKEN_MALFORMED, "issued by someone else")
        return claims_from_payload(payload)


def _kid_of(token: str) -> str | None:
    """The kid of a token verified already (so well-formed)."""
    header = json_object(token.split(".", 1)[0])
    kid = header.get("kid") if header is not None else None
    return kid if isinstance(kid, str) else None


def _signature_valid(key: SigningKey, signature: bytes, signing_input: bytes) -> bool:
    # Ed25519 through libsodium (PyNaCl): the same check at half the CPU of `cryptography`'s
    # on the machines measured (docs/benchmarks.md), and it is the whole of a cold Check's
    # own cost.
    verifier = key.ed25519_verifier
    if verifier is None:
        return _es256_valid(key.public_key, signature, signing_input)
    try:
        verifier.verify(signing_input, signature)
    except (BadSignatureError, ValueError, TypeError):  # ValueError: not 64 bytes
        return False
    return True


_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_UNUSED_BITS = (0, 0, 0b1111, 0b11)  # by length % 4: the last character's bits past the data


def _canonical_b64url(part: str) -> bool:
    """Unpadded base64url in its one canonical form: the alphabet only, a possible length, and
    the last character's unused bits zero. Otherwise 16 (or 4) spellings of one signature would
    all verify, which PyJWT refuses (as a malformed token)."""
    if not _B64URL.fullmatch(part):
        return False
    rest = len(part) % 4
    if rest == 1:
        return False
    return not rest or not _B64URL_ALPHABET.index(part[-1]) & _UNUSED_BITS[rest]


def _b64decode(part: str) -> bytes:
    """Strict base64url (the alphabet is checked by the caller); ValueError when the length is
    impossible."""
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def json_object(part: str) -> dict[str, Any] | None:
    """A base64url JOSE part decoded as a JSON object; None when it is not one."""
    try:
        value = json.loads(_b64decode(part))
    except (ValueError, RecursionError):  # binascii.Error, JSON and UTF-8 errors are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _es256_valid(public: Any, signature: bytes, signing_input: bytes) -> bool:
    """ES256: the JWS signature is r || s, 32 bytes each."""
    if len(signature) != 64:
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        public.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


SHARED_SCOPE_CLAIM = 1024  # longer scope claims are parsed for their token alone


@lru_cache(maxsize=4096)
def _shared_scope_set(scope: str) -> ScopeSet:
    """Parsed and compiled once per distinct scope claim (sessions of one kind share theirs)."""
    return ScopeSet.parse(scope.split())


def _scope_set(scope: str) -> ScopeSet:
    # Only short claims are shared: 4096 long ones (64 scopes of 512 characters each) would
    # hold half a gigabyte outside the byte-bounded token cache.
    if len(scope) <= SHARED_SCOPE_CLAIM:
        return _shared_scope_set(scope)
    return ScopeSet.parse(scope.split())


def claims_from_payload(payload: Mapping[str, Any]) -> AgentClaims:
    """Checks the claim shapes of api.md and builds AgentClaims; TOKEN_MALFORMED otherwise."""
    act = payload.get("act")
    sn = payload.get("sn")
    times = [payload.get(k) for k in ("iat", "nbf", "exp")]
    scope = payload.get("scope")
    if not (
        isinstance(payload.get("sub"), str)
        and payload["sub"]
        and isinstance(act, dict)
        and isinstance(act.get("sub"), str)
        and act.get("sid") == payload.get("jti")
        and isinstance(payload.get("jti"), str)
        and isinstance(sn, int)
        and not isinstance(sn, bool)
        and 0 <= sn < SERIAL_SPACE
        and all(isinstance(t, int) and not isinstance(t, bool) for t in times)
        and isinstance(scope, str)
        # RFC 9068's client_id names the acting agent, as act.sub does (older tokens lack it).
        and payload.get("client_id", act.get("sub")) == act.get("sub")
    ):
        raise TokenRejected(Reason.TOKEN_MALFORMED, "claims do not have the agent token shape")
    try:
        scopes = _scope_set(scope)
    except ScopeSyntaxError:
        raise TokenRejected(Reason.TOKEN_MALFORMED, "the scope claim is invalid") from None
    audiences: frozenset[str] | None = None
    if "aud" in payload:
        aud = payload["aud"]
        values = [aud] if isinstance(aud, str) else aud
        if not isinstance(values, list) or not all(isinstance(a, str) for a in values):
            raise TokenRejected(Reason.TOKEN_MALFORMED, "the aud claim is invalid")
        audiences = frozenset(values)
    cnf = payload.get("cnf")
    jkt = cnf.get("jkt", "") if isinstance(cnf, dict) else ""
    parent = payload.get("parent", "")
    task = payload.get("task", "")
    if not isinstance(jkt, str) or not isinstance(parent, str) or not isinstance(task, str):
        raise TokenRejected(Reason.TOKEN_MALFORMED, "claims do not have the agent token shape")
    iat, nbf, exp = (cast(int, t) for t in times)  # type-checked above
    return AgentClaims(
        session_id=payload["jti"],
        user_id=payload["sub"],
        agent_id=act["sub"],
        serial=sn,
        issued_at=iat,
        not_before=nbf,
        expires_at=exp,
        scopes=scopes,
        audiences=audiences,
        act=act,
        parent_session_id=parent,
        task=task,
        jkt=jkt,
    )

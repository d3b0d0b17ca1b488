"""DPoP (RFC 9449): proofs an agent makes with its own key (for agentid's gRPC calls,
AgentIdClient's ``proof_key``, its token endpoint, and the MCP servers it calls); what makes a
proof good for a request (``check_proof``: one rule, which agentid's own verifier uses too); and,
for a service that verifies key-bound tokens itself (the MCP guard), ``ProofVerifier``: that rule
with a bounded replay cache."""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import get_default_algorithms

from agentid_client.tokens import jwk_thumbprint

ProofKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PROOF_TYPE = "dpop+jwt"
# The algorithms a proof may be signed with (what agentid accepts; ``dpop_proof`` makes EdDSA
# and ES256 ones).
PROOF_ALGORITHMS = ("EdDSA", "ES256", "RS256", "PS256")
MAX_PROOF_BYTES = 4096
MAX_JTI_LENGTH = 128  # a UUID is 36 characters; longer ones would only fill a replay cache
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def proof_algorithm(key: ProofKey) -> str:
    """The JWS algorithm of a proof key: EdDSA for Ed25519, ES256 for P-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("a proof key is an Ed25519 or a P-256 private key")


def public_jwk(key: ProofKey) -> dict[str, Any]:
    """The public half of a proof key as a JWK (what a proof's header carries, and what
    ``jwk_thumbprint`` hashes into a token's ``jkt``)."""
    algorithm = get_default_algorithms()[proof_algorithm(key)]
    jwk: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk


def token_hash(token: str) -> str:
    """A proof's ``ath``: base64url of the SHA-256 of the access token it goes with."""
    digest = hashlib.sha256(token.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def dpop_proof(key: ProofKey, method: str, url: str, token: str | None = None) -> str:
    """A fresh proof of ``key`` for one HTTP request: ``htm`` the method, ``htu`` the URL
    without its query and fragment (RFC 9449 section 4.2), ``ath`` the token's hash when the
    request carries one. Each proof is good once: make one per request."""
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex,
        "htm": method.upper(),
        "htu": proof_uri(url),
        "iat": int(time.time()),
    }
    if token is not None:
        claims["ath"] = token_hash(token)
    header = {"typ": "dpop+jwt", "jwk": public_jwk(key)}
    return jwt.encode(claims, key, algorithm=proof_algorithm(key), headers=header)


def proof_uri(url: str) -> str:
    """A URL as a proof's ``htu`` carries it and as a verifier compares it: no query, no
    fragment; scheme and host in lower case, the scheme's default port dropped, an empty path
    "/". ValueError when it is not an absolute http(s) URL."""
    parts = urlsplit(url)
    port = parts.port  # ValueError for a port that is not one
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        raise ValueError("not an absolute http(s) URL")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


class ProofRejected(Exception):
    """A proof that is not good for this request; the message says why (never the proof)."""


def normalized_uri(uri: str) -> str | None:
    """The URI as RFC 9449 (section 4.3) compares a proof's htu: query and fragment dropped,
    then RFC 3986's syntax-based and scheme-based normalisation (scheme and host in lower case,
    the scheme's default port dropped, percent-encodings in upper case and unreserved ones
    decoded, dot segments removed, an empty path made "/"). None when it is not an absolute URI."""
    if "\\" in uri or not uri.isprintable():  # parsers disagree on these: refused, not guessed
        return None
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None:
        return None  # userinfo has no place in a request's URI
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if not scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    return f"{scheme}://{netloc}{normalized_path(parts.path)}"


def normalized_path(path: str) -> str:
    """A URI's path as ``normalized_uri`` leaves it."""

    def percent(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    segments: list[str] = []
    for segment in _PERCENT.sub(percent, path).split("/")[1:]:  # RFC 3986 5.2.4, absolute path
        if segment == "..":
            if segments:
                segments.pop()
        elif segment != ".":
            segments.append(segment)
    if path.endswith(("/.", "/..")):
        segments.append("")
    return "/" + "/".join(segments)


def _same_target(htu: str, uri: str, path_only: bool) -> bool:
    if not path_only:
        expected = normalized_uri(uri)
        return expected is not None and normalized_uri(htu) == expected
    try:
        return normalized_path(urlsplit(htu).path) == uri
    except ValueError:
        return False


def check_proof(
    proof: str,
    *,
    jkt: str,
    method: str,
    uri: str,
    access_token: str | None,
    now: float,
    max_age: float,
    path_only: bool = False,
) -> str:
    """The proof's ``jti`` when ``proof`` is good for this request: a ``dpop+jwt`` JWS signed by
    the public key its header carries (one of PROOF_ALGORITHMS), that key's RFC 7638 thumbprint
    equal to the token's ``jkt``, ``htm`` = ``method``, ``htu`` = ``uri`` (RFC 9449's
    normalisation; with ``path_only``, ``uri`` is a path and only the htu's path is compared),
    ``ath`` = the hash of ``access_token`` (None: a proof sent to a token endpoint, which
    presents no access token), ``iat`` within ``max_age`` seconds of ``now`` either way.
    ProofRejected otherwise. Whether it was used before is the caller's to know."""
    if not proof:
        raise ProofRejected("the token is bound to a key: a DPoP proof is required")
    if len(proof) > MAX_PROOF_BYTES:
        raise ProofRejected("the DPoP proof is too large")
    try:
        header = jwt.get_unverified_header(proof)
    except jwt.InvalidTokenError:
        raise ProofRejected("the DPoP proof is not a well-formed JWS") from None
    jwk, alg = header.get("jwk"), header.get("alg")
    if header.get("typ") != PROOF_TYPE or alg not in PROOF_ALGORITHMS or not isinstance(jwk, dict):
        raise ProofRejected("the DPoP proof header is not acceptable")
    if "d" in jwk or "p" in jwk:
        raise ProofRejected("the DPoP proof carries a private key")
    try:
        if jwk_thumbprint(jwk) != jkt:
            raise ProofRejected("the DPoP proof key is not the key the token is bound to")
        key = jwt.PyJWK(jwk, algorithm=alg).key
        claims: dict[str, Any] = jwt.decode(
            proof,
            key,
            algorithms=[alg],
            # iat is compared below, on the caller's clock, max_age either way.
            options={"require": ["jti", "htm", "htu", "iat"], "verify_iat": False},
        )
    except (ValueError, TypeError, jwt.PyJWKError, jwt.InvalidTokenError):
        raise ProofRejected("the DPoP proof does not verify") from None
    if not method or claims.get("htm") != method.upper():
        raise ProofRejected("the DPoP proof is for another method")
    htu = claims.get("htu")
    if not isinstance(htu, str) or not _same_target(htu, uri, path_only):
        raise ProofRejected("the DPoP proof is for another URI")
    if access_token is not None and claims.get("ath") != token_hash(access_token):
        raise ProofRejected("the DPoP proof is not bound to this token (ath)")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float) or abs(now - iat) > max_age:
        raise ProofRejected("the DPoP proof is stale or from the future")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
        raise ProofRejected(f"the DPoP proof's jti must be 1 to {MAX_JTI_LENGTH} characters")
    return jti


class ProofVerifier:
    """Verifies DPoP proofs for a key-bound token (the signature by the key in its header,
    ``typ``, ``alg``, the key's thumbprint against the token's ``cnf.jkt``, ``htm``, ``htu``,
    ``ath``, freshness) and spends each proof's ``jti`` once: a replayed proof is refused while
    it is fresh enough to verify.

    Bounded: at most ``max_proofs`` spent proofs are remembered, ``max_proofs_per_user`` of them
    for the agents of one user (the token's ``sub``), each until it is too old to verify (2 x
    ``max_age`` seconds after it was spent). Full, new proofs are refused ("retry shortly")
    until old ones age out; a live one is never forgotten early (it could be replayed then)."""

    def __init__(
        self,
        *,
        max_age: float = 60.0,
        max_proofs: int = 50_000,
        max_proofs_per_user: int = 5_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_age = max_age
        self._capacity = max_proofs
        self._per_user = min(max_proofs_per_user, max_proofs)
        self._clock = clock
        # (jkt, jti) -> (when it may be forgotten, its user); in insertion order, which is the
        # order they may be forgotten in (the clock permitting).
        self._spent: dict[tuple[str, str], tuple[float, str]] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._spent)

    def verify(
        self, proof: str, *, jkt: str, method: str, url: str, access_token: str, user: str
    ) -> None:
        """Returns when ``proof`` is good for this request (``method`` and ``url``) with
        ``access_token``, bound to ``jkt``, and was not used before: it is spent then. Raises
        ProofRejected otherwise. ``user``: whose agents' share it counts on."""
        now = self._clock()
        jti = check_proof(
            proof,
            jkt=jkt,
            method=method,
            uri=url,
            access_token=access_token,
            now=now,
            max_age=self._max_age,
        )
        self._spend((jkt, jti), user, now)

    def _spend(self, key: tuple[str, str], user: str, now: float) -> None:
        spent = self._spent
        while spent:
            first = next(iter(spent))
            until, owner = spent[first]
            if until > now:
                break
            del spent[first]
            self._forget(owner)
        if key in spent:
            raise ProofRejected("the DPoP proof was used already")
        if self._users.get(user, 0) >= self._per_user:
            raise ProofRejected("too many DPoP proofs of this user's agents at once; retry shortly")
        if len(spent) >= self._capacity:
            raise ProofRejected("too many DPoP proofs at once; retry shortly with a new proof")
        # iat may be max_age ahead, and max_age old at most: a proof verifies for 2 x max_age.
        spent[key] = (now + 2 * self._max_age, user)
        self._users[user] = self._users.get(user, 0) + 1

    def _forget(self, user: str) -> None:
        left = self._users.get(user, 1) - 1
        if left > 0:
            self._users[user] = left
        else:
            self._users.pop(user, None)

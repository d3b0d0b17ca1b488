"""DPoP proofs (RFC 9449) for agent tokens bound to the agent's own key (`cnf.jkt`)."""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

import jwt

from agentid_server.domain.model import ProofUse, Reason
from agentid_server.domain.ports import PROOF_ALREADY_USED, TokenRejected
from agentid_server.tokens.jwk import b64url, thumbprint

PROOF_TYPE = "dpop+jwt"
PROOF_ALGORITHMS = ("EdDSA", "ES256", "RS256", "PS256")
MAX_PROOF_BYTES = 4096


def _fail(message: str) -> TokenRejected:
    return TokenRejected(Reason.PROOF_OF_POSSESSION_FAILED, message)


_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


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
    return f"{scheme}://{netloc}{_normalized_path(parts.path)}"


def _normalized_path(path: str) -> str:
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
        return _normalized_path(urlsplit(htu).path) == uri
    except ValueError:
        return False


def proof_thumbprint(proof: str) -> str:
    """The RFC 7638 thumbprint of the key a DPoP proof's header carries, unverified: the key a
    token asked for with this proof will be bound to, once ``DpopVerifier.verify`` accepts the
    proof for that thumbprint."""
    if not proof or len(proof) > MAX_PROOF_BYTES:
        raise _fail("the DPoP proof is missing or too large")
    try:
        jwk = jwt.get_unverified_header(proof).get("jwk")
        if not isinstance(jwk, dict):
            raise _fail("the DPoP proof header carries no jwk")
        return thumbprint(jwk)
    except (jwt.InvalidTokenError, ValueError, KeyError, TypeError):
        raise _fail("the DPoP proof is not a well-formed JWS") from None


REPLAY_CACHE_BYTES = 64 << 20
REPLAY_BYTES_PER_USER = 8 << 20
MAX_JTI_LENGTH = 128  # a UUID is 36 characters; longer ones would only fill the replay cache
# What one remembered proof costs beyond its jti's characters (measured: a dict slot, the key
# tuple, the jti string's header, the value tuple and its float, the key's thumbprint).
ENTRY_BYTES = 320


class DpopVerifier:
    """Verifies proofs (key thumbprint, signature, htm, htu, ath, freshness) and spends each once.

    Spent proofs are remembered until they are too old to verify again, in at most
    ``cache_bytes``, of which the agents of one user (the token's `sub`) may hold
    ``bytes_per_user``: keys and agents cost nothing to make, users do, so one user's agents
    filling the cache refuse their own proofs, never another user's. Full, it refuses new proofs
    rather than forget live ones (which could then be replayed)."""

    def __init__(
        self,
        max_age: float = 60.0,
        cache_bytes: int = REPLAY_CACHE_BYTES,
        bytes_per_user: int = REPLAY_BYTES_PER_USER,
    ) -> None:
        self._max_age = max_age
        # (jkt, jti) -> (when it may be forgotten, its owner); in the order they expire.
        self._seen: dict[tuple[str, str], tuple[float, str]] = {}
        self._capacity = cache_bytes
        self._per_user_capacity = min(bytes_per_user, cache_bytes)
        self._bytes = 0
        self._per_user: dict[str, int] = {}

    def verify(
        self,
        proof: str,
        *,
        jkt: str,
        method: str,
        uri: str,
        token: str | None,
        now: float,
        path_only: bool = False,
        owner: str = "",
    ) -> ProofUse:
        """``path_only``: ``uri`` is a path, and only the path of the proof's htu must equal it
        (agentid's own methods, reached under whatever host a deployment gives it). ``token``
        None: a proof sent to a token endpoint to bind the token it asks for (RFC 9449 section
        5), which presents no access token, so no `ath` is compared. Nothing is remembered
        here: ``spend`` the use once the call may go on."""
        if not proof:
            raise _fail("the token is bound to a key: a DPoP proof is required")
        if len(proof) > MAX_PROOF_BYTES:
            raise _fail("the DPoP proof is too large")
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.InvalidTokenError:
            raise _fail("the DPoP proof is not a well-formed JWS") from None
        jwk = header.get("jwk")
        alg = header.get("alg")
        if (
            header.get("typ") != PROOF_TYPE
            or alg not in PROOF_ALGORITHMS
            or not isinstance(jwk, dict)
        ):
            raise _fail("the DPoP proof header is not acceptable")
        if "d" in jwk or "p" in jwk:
            raise _fail("the DPoP proof carries a private key")
        try:
            if thumbprint(jwk) != jkt:
                raise _fail("the DPoP proof key is not the key the token is bound to")
            key = jwt.PyJWK(jwk, algorithm=alg).key
            claims: dict[str, Any] = jwt.decode(
                proof, key, algorithms=[alg], options={"require": ["jti", "htm", "htu", "iat"]}
            )
        except (ValueError, jwt.PyJWKError, jwt.InvalidTokenError):
            raise _fail("the DPoP proof does not verify") from None
        if claims.get("htm") != method or not method:
            raise _fail("the DPoP proof is for another method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or not _same_target(htu, uri, path_only):
            raise _fail("the DPoP proof is for another URI")
        if token is not None:
            expected_ath = b64url(hashlib.sha256(token.encode("ascii", "replace")).digest())
            if claims.get("ath") != expected_ath:
                raise _fail("the DPoP proof is not bound to this token (ath)")
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or abs(now - iat) > self._max_age:
            raise _fail("the DPoP proof is stale or from the future")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise _fail(f"the DPoP proof's jti must be 1 to {MAX_JTI_LENGTH} characters")
        spent = self._seen.get((jkt, jti))
        if spent is not None and spent[0] > now:
            raise _fail(PROOF_ALREADY_USED)
        # iat may be max_age ahead, and max_age old at most: it verifies for 2 x max_age.
        return ProofUse(jkt, jti, now + 2 * self._max_age, owner)

    def spend(self, use: ProofUse, now: float) -> None:
        """Remembers the use, so the proof is refused from now on; TokenRejected when it was
        spent already or there is no room for it."""
        key = (use.jkt, use.jti)
        seen = self._seen
        earlier = seen.get(key)
        if earlier is not None and earlier[0] > now:
            raise _fail(PROOF_ALREADY_USED)
        if earlier is not None:  # an expired entry of the same proof: re-added last
            del seen[key]
            self._forget(key, earlier[1])
        # Entries go in in the order they expire: the expired ones are at the front.
        while seen:
            first = next(iter(seen))
            until, owner = seen[first]
            if until > now:
                break
            del seen[first]
            self._forget(first, owner)
        cost = ENTRY_BYTES + len(use.jti)
        if self._per_user.get(use.owner, 0) + cost > self._per_user_capacity:
            raise _fail("too many DPoP proofs of this user's agents at once; retry shortly")
        if self._bytes + cost > self._capacity:
            # Full of proofs that could still be replayed: forgetting one would let it be. The
            # proof is refused instead (fail closed) until entries expire.
            raise _fail("too many DPoP proofs at once; retry with a new proof shortly")
        seen[key] = (use.until, use.owner)
        self._bytes += cost
        self._per_user[use.owner] = self._per_user.get(use.owner, 0) + cost

    def _forget(self, key: tuple[str, str], owner: str) -> None:
        cost = ENTRY_BYTES + len(key[1])
        self._bytes -= cost
        left = self._per_user[owner] - cost
        if left:
            self._per_user[owner] = left
        else:
            del self._per_user[owner]

"""DPoP proofs (RFC 9449) for agent tokens bound to the agent's own key (`cnf.jkt`)."""

from __future__ import annotations

import jwt
from agentid_client.dpop import (
    MAX_PROOF_BYTES,
    PROOF_ALGORITHMS,
    ProofRejected,
    check_proof,
)

from agentid_server.domain.model import ProofUse, Reason
from agentid_server.domain.ports import PROOF_ALREADY_USED, TokenRejected
from agentid_server.tokens.jwk import thumbprint

__all__ = ["PROOF_ALGORITHMS", "DpopVerifier", "proof_thumbprint"]


def _fail(message: str) -> TokenRejected:
    return TokenRejected(Reason.PROOF_OF_POSSESSION_FAILED, message)


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
        try:  # the rule is the client package's, for agentid and the services alike
            jti = check_proof(
                proof,
                jkt=jkt,
                method=method,
                uri=uri,
                access_token=token,
                now=now,
                max_age=self._max_age,
                path_only=path_only,
            )
        except ProofRejected as rejected:
            raise _fail(str(rejected)) from None
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

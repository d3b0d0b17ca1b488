"""Caller authentication: turns the bearer credential of a call into a Principal.

* a JWT with `typ: agent+jwt` is one of our agent tokens (signature, times, revocation, and a
  DPoP proof in the `dpop` metadata when the token is bound to a key), and so is one with
  `typ: at+jwt` (tokens.typ) whose `iss` is ours: IdPs issue at+jwt access tokens too;
* any other JWT is a user's IdP token (a trusted `[[idp]]`);
* anything else is a service API key, known only by its SHA-256;
* no credential at all, over mTLS: the service its client certificate names (`cert_identity`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from agentid_server.domain.check import check_token_times
from agentid_server.domain.errors import Unauthenticated
from agentid_server.domain.model import AgentPrincipal, Principal, ServicePrincipal
from agentid_server.domain.ports import (
    AgentTokenVerifier,
    Clock,
    ProofLedger,
    ProofVerifier,
    TokenRejected,
)
from agentid_server.domain.revocation import RevocationSet
from agentid_server.tokens.agent_tokens import ACCESS_TOKEN_TYPE, AGENT_TOKEN_TYPE, json_object
from agentid_server.tokens.idp import IdpVerifier

MAX_API_KEY_LENGTH = 4096  # longer credentials are tokens, never hashed as keys


def api_key_digest(key: str) -> str:
    """The hex SHA-256 under which a service API key is configured."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _jwt_type(credential: str) -> str | None:
    """The `typ` of a JWT-shaped credential's header ("" when unreadable), or None when the
    credential is not JWT-shaped at all."""
    if credential.count(".") != 2:
        return None
    head = credential.partition(".")[0]
    if len(head) > 2048:
        return ""
    header = json_object(head)
    typ = header.get("typ", "") if header is not None else ""
    return typ if isinstance(typ, str) else ""


def _issued_by(credential: str, issuer: str) -> bool:
    """Whether a JWT-shaped credential's (unverified) payload names ``issuer``: only which
    verifier to ask is decided by it, and that verifier checks the signature and `iss`."""
    payload = credential.split(".")[1]
    if len(payload) > 1 << 20:  # not ours: tokens.max_token_bytes is at most 1 MiB
        return False
    claims = json_object(payload)
    return claims is not None and claims.get("iss") == issuer


def _refused(rejected: TokenRejected) -> Unauthenticated:
    return Unauthenticated(f"agent token refused: {rejected.message}", reason=rejected.reason.name)


class CallerAuthenticator:
    def __init__(
        self,
        *,
        services: Iterable[tuple[str, ServicePrincipal]],
        certified: Mapping[str, ServicePrincipal] | None = None,
        users: IdpVerifier,
        agents: AgentTokenVerifier,
        proofs: ProofVerifier,
        revocations: RevocationSet,
        clock: Clock,
        proof_ledger: ProofLedger | None = None,
        nbf_leeway: float = 0.0,
        agent_issuer: str = "",
    ) -> None:
        """``proof_ledger``: where DPoP proofs are spent when several servers share the store;
        ``nbf_leeway``: how far ahead of this clock an agent token's `nbf` may be;
        ``agent_issuer``: our tokens.issuer, which tells our at+jwt tokens from an IdP's."""
        self._nbf_leeway = nbf_leeway
        self._agent_issuer = agent_issuer
        self._services = dict(services)
        self._certified = dict(certified or {})
        self._known_keys: dict[str, ServicePrincipal] = {}
        self._users = users
        self._agents = agents
        self._proofs = proofs
        self._ledger = proof_ledger
        self._revocations = revocations
        self._clock = clock

    async def authenticate(
        self,
        credential: str | None,
        peer_identities: Iterable[bytes] | None = None,
        *,
        proof: str = "",
        method: str = "",
    ) -> Principal:
        """``peer_identities``: the verified client certificate's identities (mTLS), if any. A
        bearer credential, when sent, decides; a certificate alone identifies a service.
        ``proof`` is the call's DPoP proof and ``method`` the gRPC method path it must name."""
        if not credential:
            if peer_identities:
                return self._certified_service(peer_identities)
            raise Unauthenticated(
                "missing credential: send 'authorization: Bearer <credential>'",
                reason="CREDENTIAL_MISSING",
            )
        # An API key is whatever its service was given (dots included): looked up first, by the
        # keys that matched before, then by digest; anything else JWT-shaped is a token.
        service = self.service(credential)
        if service is not None:
            return service
        typ = _jwt_type(credential)
        if typ == AGENT_TOKEN_TYPE or (
            typ == ACCESS_TOKEN_TYPE
            and self._agent_issuer
            and _issued_by(credential, self._agent_issuer)
        ):
            return await self._agent(credential, proof, method)
        if typ is not None:
            return await self._users.verify(credential)
        raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")

    async def _agent(self, token: str, proof: str, method: str) -> AgentPrincipal:
        """A bound token (cnf.jkt) is the agent's only with a proof of its key, as in Check:
        htm POST (gRPC runs on HTTP POST) and htu whose path is the method's path."""
        now = self._clock.now()
        try:
            claims = self._agents.verify(token)
            check_token_times(claims, now, self._nbf_leeway)
            if claims.serial in self._revocations:  # before its proof is remembered or spent
                raise Unauthenticated(
                    "the agent session has been revoked", reason="SESSION_REVOKED"
                )
            use = None
            if claims.jkt:
                use = self._proofs.verify(
                    proof, jkt=claims.jkt, method="POST", uri=method, token=token, now=now,
                    path_only=True, owner=claims.user_id,
                )  # fmt: skip
        except TokenRejected as rejected:
            raise _refused(rejected) from None
        return AgentPrincipal(claims, use)

    async def spend_proof(self, principal: Principal) -> None:
        """Spends the call's DPoP proof, if its caller presented one, once the method policy
        allowed the call: a call refused earlier leaves nothing remembered, so refused calls
        cannot fill the replay cache (nor the shared ledger)."""
        if not isinstance(principal, AgentPrincipal) or principal.proof is None:
            return
        try:
            self._proofs.spend(principal.proof, self._clock.now())
            if self._ledger is not None:
                await self._ledger.spend(principal.proof)
        except TokenRejected as rejected:
            raise _refused(rejected) from None

    def _certified_service(self, identities: Iterable[bytes]) -> ServicePrincipal:
        for identity in identities:
            principal = self._certified.get(identity.decode("utf-8", "replace"))
            if principal is not None:
                return principal
        raise Unauthenticated(
            "the client certificate names no configured service; send"
            " 'authorization: Bearer <credential>'",
            reason="CERTIFICATE_UNKNOWN",
        )

    def service(self, key: str) -> ServicePrincipal | None:
        """The service whose API key this is, or None (also the HTTP door's callers: a key and
        nothing else, never a token)."""
        principal = self._known_keys.get(key)
        if principal is not None or len(key) > MAX_API_KEY_LENGTH:
            return principal
        # Looked up by digest: only the SHA-256 of each key is configured. Keys that matched are
        # remembered (a handful, one per service), so each call need not hash its key again.
        principal = self._services.get(api_key_digest(key))
        if principal is not None and len(self._known_keys) < len(self._services):
            self._known_keys[key] = principal
        return principal

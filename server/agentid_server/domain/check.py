"""Check: may this agent token do this action on this resource? The per-action hot path.

Everything here is in memory: the verified-token cache (in the verifier), the revocation bitmap,
precompiled scope matchers. The only await is the audit append, which group-commits.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, NamedTuple

from agentid_server.domain.errors import InvalidArgument
from agentid_server.domain.model import (
    ActorKind,
    AgentClaims,
    AuditEvent,
    Decision,
    EventType,
    Reason,
    ServicePrincipal,
)
from agentid_server.domain.ports import (
    PROOF_ALREADY_USED,
    AgentTokenVerifier,
    AuditLog,
    Clock,
    ProofLedger,
    ProofUse,
    ProofVerifier,
    SequenceWaiter,
    TokenRejected,
)
from agentid_server.domain.revocation import RevocationSet
from agentid_server.domain.risk import RiskRules
from agentid_server.domain.scopes import parse_concrete
from agentid_server.domain.stepup import StepUpStore, binding_for


# A Check's input and outcome are NamedTuples, immutable like frozen dataclasses but about a
# third of their cost to build (a frozen dataclass sets each field through object.__setattr__):
# every Check builds one of each.
class CheckInput(NamedTuple):
    token: str  # a secret: kept out of the repr, which may reach a log
    action: str
    resource: str
    context: Mapping[str, Any] | None = None
    pop_proof: str = ""  # a secret too
    pop_method: str = ""
    pop_uri: str = ""
    min_revocation_sequence: int = 0
    consistency_wait: float = 0.0  # how long min_revocation_sequence may be waited for

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}"
            for name, value in zip(self._fields, self, strict=True)
            if name not in _SECRET_INPUTS
        )
        return f"CheckInput({shown})"


_SECRET_INPUTS = frozenset(("token", "pop_proof"))


class CheckOutcome(NamedTuple):
    decision: Decision
    reason: Reason
    message: str
    decision_id: int
    claims: AgentClaims | None = None
    matched_scope: str = ""
    risk_rule: str = ""
    step_up_id: str = ""
    revocation_sequence: int = 0


class Checker:
    """Decides Checks and records every decision in the audit trail before answering."""

    def __init__(
        self,
        *,
        verifier: AgentTokenVerifier,
        proofs: ProofVerifier,
        revocations: RevocationSet,
        consistency: SequenceWaiter,
        risks: RiskRules,
        step_ups: StepUpStore,
        audit: AuditLog,
        clock: Clock,
        max_token_bytes: int,
        proof_ledger: ProofLedger | None = None,
        nbf_leeway: float = 0.0,
        disabled_agents: Container[str] = frozenset(),
    ) -> None:
        """``proof_ledger``: where DPoP proofs are spent when several servers share the store
        (each server's ``proofs`` remembers only what it saw itself). ``nbf_leeway``: how far
        ahead of this clock a token's `nbf` may be (`tokens.nbf_leeway`). ``disabled_agents``:
        the registry's disabled agents, kept current by it; their tokens are denied as revoked
        (DisableAgent revokes them too; this holds even if it failed part-way)."""
        self._disabled_agents = disabled_agents
        self._nbf_leeway = nbf_leeway
        self._verifier = verifier
        self._proofs = proofs
        self._ledger = proof_ledger
        self._revocations = revocations
        self._consistency = consistency
        self._risks = risks
        self._any_risks = len(risks) > 0  # the rules are fixed at start
        self._step_ups = step_ups
        self._audit = audit
        self._clock = clock
        self._max_token_bytes = max_token_bytes

    async def check(self, caller: ServicePrincipal, request: CheckInput) -> CheckOutcome:
        action, resource = _parse_request(request)
        if request.min_revocation_sequence > self._revocations.applied_sequence:
            await self._consistency.await_sequence(
                request.min_revocation_sequence, request.consistency_wait
            )
        now = self._clock.now()
        applied = self._revocations.applied_sequence
        claims: AgentClaims | None = None
        matched = rule = ""
        proof: ProofUse | None = None
        try:
            claims = self._verified(request.token)
            decision, reason, message, matched, proof = self._decide(
                claims, caller, request, action, resource, now
            )
            if proof is not None:  # spent once decided: a decision used it
                self._proofs.spend(proof, now)
            if decision is Decision.ALLOW and self._any_risks:
                rule = (
                    self._risks.first_firing(
                        action, request.action, request.resource, request.context
                    )
                    or ""
                )
        except TokenRejected as rejected:
            decision, reason, message = Decision.DENY, rejected.reason, rejected.message
            matched, proof = "", None

        def event(decision: Decision, reason: Reason, step_up_id: str = "") -> AuditEvent:
            return AuditEvent(
                time=now,
                event_type=EventType.CHECK,
                actor_kind=ActorKind.SERVICE,
                actor_id=caller.name,
                session_id=claims.session_id if claims else "",
                user_id=claims.user_id if claims else "",
                scopes=claims.scopes.texts if claims else (),
                agent_id=claims.agent_id if claims else "",
                action=request.action,
                resource=request.resource,
                decision=decision,
                reason=reason,
                parent_session_id=claims.parent_session_id if claims else "",
                step_up_id=step_up_id,
                context=request.context,
            )

        # Several servers share the store: a proof is spent there, once for all of them.
        ledger = self._ledger
        if ledger is not None and proof is not None and rule:  # the step-up settles on its own
            try:
                await ledger.spend(proof)
            except TokenRejected as rejected:
                decision, reason, message = Decision.DENY, rejected.reason, rejected.message
                matched = rule = ""
            proof = None  # spent
        step_up_id = ""
        if rule and claims is not None:
            binding = binding_for(
                claims.session_id, request.action, request.resource, request.context
            )
            settled = await self._step_ups.settle(binding, now, event)
            decision, reason, step_up_id = settled.decision, settled.reason, settled.step_up_id
            message = _STEP_UP_MESSAGES[reason].format(rule=rule)
            decision_id = settled.decision_id
        elif ledger is not None and proof is not None:  # spent with the decision's record
            spent, decision_id = await ledger.spend_and_record(
                proof, event(decision, reason), event(Decision.DENY, _PROOF_REUSED)
            )
            if not spent:
                decision, reason, message = Decision.DENY, _PROOF_REUSED, PROOF_ALREADY_USED
                matched = ""
        else:
            decision_id = await self._audit.append(event(decision, reason))
        return CheckOutcome(
            decision=decision,
            reason=reason,
            message=message,
            decision_id=decision_id,
            claims=claims,
            matched_scope=matched,
            risk_rule=rule,
            # api.md: "the approval consumed, if any". A denial's step-up is in its record only.
            step_up_id=step_up_id if reason is Reason.STEP_UP_APPROVED else "",
            revocation_sequence=applied,
        )

    def introspect(self, caller: ServicePrincipal, token: str) -> AgentClaims | None:
        """The claims of a token currently valid for ``caller`` (RFC 7662 introspection), or
        None: the rules of a Check up to its action (size, signature, times, the revocation
        set, the caller's audience), without a proof (no action is asked) or an audit record
        (no decision is made: the same answer a service verifying with the JWKS gets)."""
        claims = self.live_claims(token)
        if claims is None or _audience_mismatch(claims, caller):
            return None
        return claims

    def live_claims(self, token: str) -> AgentClaims | None:
        """The claims of one of our agent tokens that is live now (its size, signature and
        times as a Check reads them, not revoked), else None: what introspection and the OAuth
        revocation endpoint start from."""
        try:
            claims = self._verified(token)
            check_token_times(claims, self._clock.now(), self._nbf_leeway)
        except TokenRejected:
            return None
        if claims.serial in self._revocations or claims.agent_id in self._disabled_agents:
            return None
        return claims

    def _verified(self, token: str) -> AgentClaims:
        if len(token) > self._max_token_bytes:
            raise TokenRejected(
                Reason.TOKEN_MALFORMED, f"the token is larger than {self._max_token_bytes} bytes"
            )
        return self._verifier.verify(token)

    def _decide(
        self,
        claims: AgentClaims,
        caller: ServicePrincipal,
        request: CheckInput,
        action: tuple[str, ...],
        resource: tuple[str, ...],
        now: float,
    ) -> tuple[Decision, Reason, str, str, ProofUse | None]:
        """The decision, its reason, message and matching scope, and the proof it used."""
        check_token_times(claims, now, self._nbf_leeway)
        if claims.serial in self._revocations:
            return Decision.DENY, Reason.SESSION_REVOKED, "the session has been revoked", "", None
        if claims.agent_id in self._disabled_agents:
            return Decision.DENY, Reason.SESSION_REVOKED, "the agent is disabled", "", None
        proof = None
        if claims.jkt:
            proof = self._proofs.verify(
                request.pop_proof,
                jkt=claims.jkt,
                method=request.pop_method,
                uri=request.pop_uri,
                token=request.token,
                now=now,
                owner=claims.user_id,
            )
        if _audience_mismatch(claims, caller):
            return (
                Decision.DENY,
                Reason.AUDIENCE_MISMATCH,
                f"the token is not meant for audience {caller.audience!r}",
                "",
                proof,
            )
        scope = claims.scopes.first_match(action, resource)
        if scope is None:
            return (
                Decision.DENY,
                Reason.SCOPE_NOT_GRANTED,
                "no granted scope allows this action on this resource",
                "",
                proof,
            )
        return Decision.ALLOW, Reason.GRANTED, f"allowed by scope {scope.text}", scope.text, proof


_PROOF_REUSED = Reason.PROOF_OF_POSSESSION_FAILED


def _audience_mismatch(claims: AgentClaims, caller: ServicePrincipal) -> bool:
    return claims.audiences is not None and caller.audience not in claims.audiences


_STEP_UP_MESSAGES = {
    Reason.HIGH_RISK: "risk rule {rule} requires the user's approval: request a step-up",
    Reason.STEP_UP_APPROVED: "allowed once by the user's approval (risk rule {rule})",
    Reason.STEP_UP_DENIED: "the user denied this action (risk rule {rule})",
}


def check_token_times(claims: AgentClaims, now: float, nbf_leeway: float = 0.0) -> None:
    """`exp` with no leeway, on every use (cached or not); `nbf` with ``nbf_leeway``, so a
    replica whose clock is a little behind the issuer's accepts a token issued this instant
    (iat equals nbf in every token we issue)."""
    if now >= claims.expires_at:
        raise TokenRejected(Reason.TOKEN_EXPIRED, "the token has expired")
    if now + nbf_leeway < claims.not_before:
        raise TokenRejected(Reason.TOKEN_NOT_YET_VALID, "the token is not valid yet")


def _parse_request(request: CheckInput) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not request.token:
        raise InvalidArgument.field("token", "required")
    return parse_concrete(request.action, request.resource)

"""Step-up to the human: one-time approvals for high-risk actions.

PENDING -> APPROVED | DENIED | EXPIRED; APPROVED -> CONSUMED by exactly one Check. A step-up is
bound to (session, action, resource, SHA-256 of the RFC 8785 canonical JSON of the context). The
user approves with a fresh login at their IdP (RFC 9470): an `auth_time` no older than
`step_up.max_auth_age`, and an `acr` from `step_up.accepted_acr` when that is set.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import rfc8785
from ulid import ULID

from agentid_server.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from agentid_server.domain.fanout import Hub, Resync
from agentid_server.domain.model import (
    ActorKind,
    AgentPrincipal,
    AuditEvent,
    Decision,
    EventType,
    Reason,
    UserPrincipal,
    unreadable,
)
from agentid_server.domain.ports import Clock
from agentid_server.domain.risk import RiskRules
from agentid_server.domain.scopes import parse_concrete

STEP_UP_ID = re.compile(r"stp_[0-9A-HJKMNP-TV-Z]{26}")
MAX_BINDING_MESSAGE = 1024
MAX_COMMENT = 1024


class StepUpState(enum.IntEnum):
    UNSPECIFIED = 0
    PENDING = 1
    APPROVED = 2
    DENIED = 3
    EXPIRED = 4
    CONSUMED = 5


@dataclass(frozen=True, slots=True)
class Binding:
    session_id: str
    action: str
    resource: str
    context_digest: str


@dataclass(frozen=True, slots=True)
class StepUp:
    id: str
    session_id: str
    user_id: str
    agent_id: str
    action: str
    resource: str
    context: Mapping[str, Any] | None
    context_digest: str
    binding_message: str
    state: StepUpState
    created_at: float
    expires_at: int
    resolved_at: int | None = None
    risk_rule: str = ""
    comment: str = ""
    scopes: tuple[str, ...] = ()  # the session's, for the audit records of its steps
    parent_session_id: str = ""

    def event(
        self,
        time: float,
        event_type: EventType,
        actor_kind: ActorKind,
        actor_id: str,
        detail: str,
        decision: Decision = Decision.UNSPECIFIED,
    ) -> AuditEvent:
        """The audit record of a step in this step-up's life (requested, resolved)."""
        return AuditEvent(
            time=time,
            event_type=event_type,
            actor_kind=actor_kind,
            actor_id=actor_id,
            session_id=self.session_id,
            user_id=self.user_id,
            scopes=self.scopes,
            agent_id=self.agent_id,
            action=self.action,
            resource=self.resource,
            decision=decision,
            parent_session_id=self.parent_session_id,
            step_up_id=self.id,
            context=self.context,
            detail=detail,
        )

    def seen_at(self, now: float) -> StepUp:
        """As of ``now``: a PENDING or APPROVED step-up past its expiry is EXPIRED."""
        if self.state in (StepUpState.PENDING, StepUpState.APPROVED) and now >= self.expires_at:
            return replace(self, state=StepUpState.EXPIRED)
        return self


@dataclass(frozen=True, slots=True)
class StepUpPolicy:
    pending_ttl: int
    approval_ttl: int
    max_auth_age: int
    accepted_acr: tuple[str, ...]
    max_context_bytes: int = 16 * 1024
    # PENDING step-ups of one agent session at once: each is a row, an audit record and a line
    # in its user's inbox, so an agent cannot bury the one that matters.
    max_pending_per_session: int = 20


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the step-ups of a binding make of a Check on which a risk rule fired."""

    decision: Decision
    reason: Reason
    step_up_id: str
    decision_id: int


def canonical_context(context: Mapping[str, Any] | None) -> bytes:
    """RFC 8785 (JCS) canonical JSON of the context ({} when absent)."""
    return bytes(rfc8785.dumps(dict(context or {})))


def binding_for(
    session_id: str, action: str, resource: str, context: Mapping[str, Any] | None
) -> Binding:
    digest = hashlib.sha256(canonical_context(context)).hexdigest()
    return Binding(session_id, action, resource, digest)


def validate_step_up_id(value: str) -> None:
    if not STEP_UP_ID.fullmatch(value):
        raise InvalidArgument.field("step_up_id", "not a step-up id (stp_ followed by a ULID)")


class StepUpStore(Protocol):
    async def request(
        self, candidate: StepUp, event: AuditEvent, now: float, max_pending: int
    ) -> StepUp | None:
        """The PENDING step-up of the candidate's binding if one is live, else the candidate,
        inserted with its audit record; None (nothing written) when its session has
        ``max_pending`` live PENDING step-ups already."""
        ...

    async def get(self, step_up_id: str) -> StepUp | None: ...

    async def resolve(
        self,
        step_up_id: str,
        state: StepUpState,
        comment: str,
        now: float,
        expires_at: int,
        event: Callable[[StepUp], AuditEvent],
    ) -> StepUp | None:
        """PENDING (and live) -> ``state``, with its audit record; None when it was not PENDING."""
        ...  # fmt: skip

    async def settle(
        self, binding: Binding, now: float, event: Callable[[Decision, Reason, str], AuditEvent]
    ) -> Settlement:
        """Decides a risky Check by the newest step-up of its binding and records it: an APPROVED
        one is consumed (a conditional update: once only), a DENIED one denies."""
        ...

    async def pending_for_user(self, user_id: str, now: float) -> list[StepUp]: ...

    async def for_session(self, session_id: str) -> list[StepUp]: ...

    async def expire_due(self, now: float) -> list[StepUp]:
        """Marks PENDING and APPROVED step-ups past their expiry EXPIRED; returns them."""
        ...


StepUpHub = Hub[StepUp]


class StepUps:
    """StepUp, ResolveStepUp and WatchStepUps."""

    def __init__(
        self,
        *,
        store: StepUpStore,
        risks: RiskRules,
        policy: StepUpPolicy,
        hub: StepUpHub,
        clock: Clock,
    ) -> None:
        self._store = store
        self._risks = risks
        self._policy = policy
        self._hub = hub
        self._clock = clock

    async def request(
        self,
        agent: AgentPrincipal,
        *,
        action: str,
        resource: str,
        context: Mapping[str, Any] | None,
        binding_message: str,
    ) -> StepUp:
        claims = agent.claims
        action_segments, resource_segments = parse_concrete(action, resource)
        if len(binding_message) > MAX_BINDING_MESSAGE:
            raise InvalidArgument.field(
                "binding_message", f"at most {MAX_BINDING_MESSAGE} characters"
            )
        if (problem := unreadable(binding_message)) is not None:
            raise InvalidArgument.field("binding_message", problem)
        if len(canonical_context(context)) > self._policy.max_context_bytes:
            raise InvalidArgument.field(
                "context", f"larger than {self._policy.max_context_bytes} bytes as canonical JSON"
            )
        if claims.scopes.first_match(action_segments, resource_segments) is None:
            raise PermissionDenied(
                "the session's scopes do not allow this action on this resource",
                reason="SCOPE_NOT_GRANTED",
            )
        now = self._clock.now()
        rule = self._risks.first_firing(action_segments, action, resource, context) or ""
        binding = binding_for(claims.session_id, action, resource, context)
        candidate = StepUp(
            id=f"stp_{ULID()}",
            session_id=claims.session_id,
            user_id=claims.user_id,
            agent_id=claims.agent_id,
            action=action,
            resource=resource,
            context=dict(context) if context is not None else None,
            context_digest=binding.context_digest,
            binding_message=binding_message,
            state=StepUpState.PENDING,
            created_at=now,
            expires_at=int(now + self._policy.pending_ttl),
            risk_rule=rule,
            scopes=claims.scopes.texts,
            parent_session_id=claims.parent_session_id,
        )
        event = candidate.event(
            now, EventType.STEP_UP_REQUESTED, ActorKind.AGENT, claims.session_id, binding_message
        )
        limit = self._policy.max_pending_per_session
        step_up = await self._store.request(candidate, event, now, limit)
        if step_up is None:
            raise ResourceExhausted(
                f"this agent session has {limit} step-ups waiting for its user already, the most"
                " allowed (step_up.max_pending_per_session); wait for one to be resolved or to"
                " expire",
                reason="TOO_MANY_PENDING_STEP_UPS",
                metadata={"limit": str(limit)},
            )
        return step_up

    async def resolve(
        self, user: UserPrincipal, *, step_up_id: str, approve: bool, comment: str
    ) -> StepUp:
        validate_step_up_id(step_up_id)
        if len(comment) > MAX_COMMENT:
            raise InvalidArgument.field("comment", f"at most {MAX_COMMENT} characters")
        if (problem := unreadable(comment)) is not None:
            raise InvalidArgument.field("comment", problem)
        step_up = await self._store.get(step_up_id)
        if step_up is None:
            raise NotFound(f"no step-up {step_up_id}", reason="STEP_UP_NOT_FOUND")
        if step_up.user_id != user.user_id:  # who the caller is comes before how fresh
            raise PermissionDenied(
                "only the user who delegated the session may resolve its step-ups",
                reason="NOT_YOUR_STEP_UP",
            )
        now = self._clock.now()
        self._require_fresh_login(user, now)
        state = StepUpState.APPROVED if approve else StepUpState.DENIED

        def event(resolved: StepUp) -> AuditEvent:
            decision = Decision.ALLOW if approve else Decision.DENY
            return resolved.event(
                now, EventType.STEP_UP_RESOLVED, ActorKind.USER, user.user_id, comment, decision
            )

        resolved = await self._store.resolve(
            step_up_id, state, comment, now, int(now + self._policy.approval_ttl), event
        )
        if resolved is None:
            current = (await self._store.get(step_up_id) or step_up).seen_at(now)
            raise FailedPrecondition(
                f"the step-up is {current.state.name}, not PENDING",
                reason="STEP_UP_NOT_PENDING",
                metadata={"state": current.state.name},
            )
        return resolved

    def _require_fresh_login(self, user: UserPrincipal, now: float) -> None:
        policy = self._policy
        age = None if user.auth_time is None else now - user.auth_time
        # A login in the future (beyond the IdP's clock leeway) is no evidence of a fresh one.
        future = age is not None and age < -user.clock_leeway
        fresh = age is not None and not future and age <= policy.max_auth_age
        acr_ok = not policy.accepted_acr or user.acr in policy.accepted_acr
        if not (fresh and acr_ok):
            raise Unauthenticated(
                "the IdP token's auth_time lies in the future: log in at your identity provider"
                if future
                else "approving needs a fresh login at your identity provider",
                reason="INSUFFICIENT_USER_AUTHENTICATION",
                metadata={
                    "max_age": str(policy.max_auth_age),
                    "acr_values": " ".join(policy.accepted_acr),
                },
            )

    async def watch(
        self, caller: UserPrincipal | AgentPrincipal, step_up_id: str, current_only: bool
    ) -> AsyncGenerator[StepUp, None]:
        """The caller's step-ups (a user's pending inbox, an agent's own), or one of them: the
        current state first, then every change, pushed as it happens."""
        wants = self._filter(caller, step_up_id)
        if step_up_id:
            validate_step_up_id(step_up_id)
            found = await self._store.get(step_up_id)
            if found is None:
                raise NotFound(f"no step-up {step_up_id}", reason="STEP_UP_NOT_FOUND")
            if not self._filter(caller, "")(found):
                raise PermissionDenied("this step-up is not yours", reason="NOT_YOUR_STEP_UP")
        # Subscribed before reading: no change falls in between.
        subscription = self._hub.subscribe(wants, keys=(_watcher_key(caller),))
        try:
            now = self._clock.now()
            if step_up_id:
                current = [s for s in [await self._store.get(step_up_id)] if s is not None]
            elif isinstance(caller, UserPrincipal):
                current = await self._store.pending_for_user(caller.user_id, now)
            else:
                current = await self._store.for_session(caller.claims.session_id)
            sent: dict[str, tuple[StepUpState, int | None]] = {}
            for step_up in current:
                step_up = step_up.seen_at(now)
                sent[step_up.id] = (step_up.state, step_up.resolved_at)
                yield step_up
            if current_only:
                return
            while (change := await subscription.next()) is not None:
                if isinstance(change, Resync):
                    continue  # (step-up watchers never resync: they are ended when too slow)
                if sent.get(change.id) != (change.state, change.resolved_at):
                    sent[change.id] = (change.state, change.resolved_at)
                    yield change
        finally:
            self._hub.unsubscribe(subscription)

    @staticmethod
    def _filter(
        caller: UserPrincipal | AgentPrincipal, step_up_id: str
    ) -> Callable[[StepUp], bool]:
        if isinstance(caller, UserPrincipal):
            owner = caller.user_id
            return lambda s: s.user_id == owner and (not step_up_id or s.id == step_up_id)
        session = caller.claims.session_id
        return lambda s: s.session_id == session and (not step_up_id or s.id == step_up_id)


def _watcher_key(caller: UserPrincipal | AgentPrincipal) -> tuple[str, str]:
    if isinstance(caller, UserPrincipal):
        return ("user", caller.user_id)
    return ("session", caller.claims.session_id)


def step_up_keys(step_up: StepUp) -> tuple[tuple[str, str], ...]:
    """The watchers a change of ``step_up`` may reach: its user's and its session's."""
    return (("user", step_up.user_id), ("session", step_up.session_id))

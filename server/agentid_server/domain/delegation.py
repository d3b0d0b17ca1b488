"""Delegate: a user hands a new agent session a subset of their scopes; an agent holding
`agentid.delegate` hands a sub-agent a subset of its own. Never wider, never longer-lived."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ulid import ULID

from agentid_server.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from agentid_server.domain.model import (
    ActorKind,
    AgentClaims,
    AgentKind,
    AgentPrincipal,
    AuditEvent,
    EventType,
    SessionRecord,
    UserPrincipal,
    unreadable,
)
from agentid_server.domain.ports import (
    ActorAuthenticator,
    AgentTokenIssuer,
    AssertionRejected,
    AuditLog,
    Clock,
    SessionStore,
)
from agentid_server.domain.ratelimit import Rate, TokenBuckets
from agentid_server.domain.revocation import serial_bit
from agentid_server.domain.scopes import Scope, ScopeSet, ScopeSyntaxError

DELEGATE_ACTION = "agentid.delegate"
MAX_SCOPES_PER_REQUEST = 64
MAX_TASK_LENGTH = 1024
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 256
_JKT = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url SHA-256, unpadded
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    default: int
    minimum: int
    maximum: int


NO_LIMIT = Rate(per_minute=0, burst=1)


@dataclass(frozen=True, slots=True)
class DelegationLimits:
    """What one Delegate may produce: a token no verifier would refuse for its size
    (`server.max_token_bytes`), and at most ``max_depth`` delegations from the user to the new
    session (`tokens.max_delegation_depth`: the user's own delegation is 1, a sub-agent adds 1)."""

    max_token_bytes: int = 8192
    max_depth: int = 5
    # Delegates a minute, and at once: by one user (every Delegate on their behalf, their
    # agents' included), and by one agent session (its sub-agents). 0 a minute: no limit.
    per_user: Rate = NO_LIMIT
    per_agent: Rate = NO_LIMIT


@dataclass(frozen=True, slots=True)
class DelegateInput:
    agent_id: str
    scopes: Sequence[str]
    ttl_seconds: int | None
    task: str
    audiences: Sequence[str]
    jkt: str
    # The agent's client assertion (RFC 7523), required when it has keys; kept out of reprs.
    actor_token: str = field(default="", repr=False)
    # The audiences the assertion may name (the HTTP token endpoint adds its URL); empty: the
    # issuer alone, as over gRPC.
    actor_audiences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delegation:
    session: SessionRecord
    token: str = field(repr=False)  # a secret: kept out of any repr that reaches a log


class AgentKinds(Protocol):
    """The registry as Delegate reads it (in memory, never the store per call)."""

    def get(self, agent_id: str, /) -> AgentKind | None: ...


def new_session_id() -> str:
    return f"ses_{ULID()}"


class Delegator:
    """Validates, narrows and records delegations, and issues the agent token."""

    def __init__(
        self,
        *,
        issuer: str,
        agents: AgentKinds,
        ttl: TtlPolicy,
        sessions: SessionStore,
        tokens: AgentTokenIssuer,
        audit: AuditLog,
        clock: Clock,
        limits: DelegationLimits | None = None,
        actors: ActorAuthenticator | None = None,
    ) -> None:
        """``actors``: authenticates agents that have keys; None when no agent has any."""
        self._actors = actors
        self._limits = limits or DelegationLimits()
        self._by_user = TokenBuckets(self._limits.per_user)
        self._by_agent = TokenBuckets(self._limits.per_agent)
        self._issuer = issuer
        self._agents = agents
        self._ttl = ttl
        self._sessions = sessions
        self._tokens = tokens
        self._audit = audit
        self._clock = clock

    async def delegate(
        self, delegator: UserPrincipal | AgentPrincipal, request: DelegateInput
    ) -> Delegation:
        requested = _validate(request)
        agent = self._agents.get(request.agent_id)
        if agent is None:
            raise NotFound(
                f"agent {request.agent_id!r} is not registered",
                reason="AGENT_NOT_REGISTERED",
                metadata={"agent_id": request.agent_id},
            )
        if agent.disabled:
            raise FailedPrecondition(
                f"agent {request.agent_id!r} is disabled",
                reason="AGENT_DISABLED",
                metadata={"agent_id": request.agent_id},
            )
        # Before anything is charged or spent: a refused request costs no rate, serial or
        # signature.
        await self.authenticate_actor(
            request.agent_id, request.actor_token, request.actor_audiences
        )
        parent = delegator.claims if isinstance(delegator, AgentPrincipal) else None
        holder = _holder_scopes(delegator)
        if parent is not None:
            _require_depth(parent, self._limits.max_depth)
        _require_covered(holder, requested, "SCOPE_ESCALATION", "the delegator holds")
        _require_covered(
            agent.max_scopes, requested, "AGENT_SCOPE_EXCEEDED", f"agent {agent.id!r} may hold"
        )
        audiences = _narrow_audiences(parent, tuple(dict.fromkeys(request.audiences)))
        jkt = _narrow_binding(parent, request.jkt)

        now = int(self._clock.now())
        ttl = self._granted_ttl(request.ttl_seconds, agent, parent, now)
        user_id = parent.user_id if parent else _user_id(delegator)
        # Refused over the rate before a serial is spent or a token signed; charged only once the
        # token is known to be usable, so a refused request costs the caller nothing.
        self._admit(user_id, parent, self._clock.now(), charge=False)
        session = SessionRecord(
            id=new_session_id(),
            serial=await self._sessions.allocate_serial(),
            user_id=user_id,
            agent_id=agent.id,
            scopes=tuple(s.text for s in requested),
            audiences=audiences,
            task=request.task,
            jkt=jkt,
            created_at=now,
            expires_at=now + ttl,
            parent_id=parent.session_id if parent else "",
        )
        token = self._tokens.issue(self._claims(session, parent))
        _require_usable_size(token, self._limits.max_token_bytes)
        self._admit(user_id, parent, self._clock.now())  # again: others took some meanwhile
        actor_kind, actor_id = (
            (ActorKind.AGENT, parent.session_id) if parent else (ActorKind.USER, user_id)
        )
        await self._audit.append(
            AuditEvent(
                time=self._clock.now(),
                event_type=EventType.DELEGATE,
                actor_kind=actor_kind,
                actor_id=actor_id,
                session_id=session.id,
                user_id=user_id,
                scopes=session.scopes,
                agent_id=agent.id,
                action=DELEGATE_ACTION,
                parent_session_id=session.parent_id,
                detail=request.task,
            ),
            new_session=session,
        )
        return Delegation(session=session, token=token)

    async def authenticate_actor(
        self, agent_id: str, assertion: str, audiences: tuple[str, ...] = ()
    ) -> None:
        """An agent with keys acts only with its own fresh client assertion (RFC 7523
        private_key_jwt), so a stolen user token alone cannot mint sessions for it, nor a
        leaked agent token revoke others' at the OAuth revocation endpoint. An agent without
        keys is a public client: its id alone names it. ``audiences``: what the assertion's
        `aud` may name; empty, the issuer. PERMISSION_DENIED / ACTOR_UNAUTHENTICATED."""
        if self._actors is None or not self._actors.has_keys(agent_id):
            return
        if not assertion:
            raise _actor_unauthenticated(
                agent_id, "it has keys: actor_token must carry its client assertion"
            )
        try:
            await self._actors.verify(agent_id, assertion, audiences or (self._issuer,))
        except AssertionRejected as exc:
            raise _actor_unauthenticated(agent_id, str(exc)) from None

    def _admit(
        self, user_id: str, parent: AgentClaims | None, now: float, *, charge: bool = True
    ) -> None:
        """Takes a token of the user's bucket and, for a sub-agent, of the delegating
        session's; RESOURCE_EXHAUSTED / RATE_LIMITED, naming the bound, when either is empty
        (then neither is taken). ``charge=False`` only asks."""
        waits = [(self._by_user.wait(user_id, now), "delegate_per_user", self._by_user)]
        if parent is not None:
            agent_wait = self._by_agent.wait(parent.session_id, now)
            waits.append((agent_wait, "delegate_per_agent", self._by_agent))
        wait, bound, buckets = max(waits, key=lambda w: w[0])
        if wait > 0:
            rate = buckets.rate
            raise ResourceExhausted(
                f"too many Delegate calls: at most {rate.burst} at once and {rate.per_minute:g}"
                f" a minute {'per user' if bound == 'delegate_per_user' else 'per agent session'}"
                f" (tokens.{bound}_per_minute, tokens.{bound}_burst); retry in {wait:.1f}s",
                reason="RATE_LIMITED",
                metadata={
                    "limit": f"tokens.{bound}_per_minute",
                    "per_minute": f"{rate.per_minute:g}",
                    "burst": str(rate.burst),
                },
                retry_after=wait,
            )
        if not charge:
            return
        self._by_user.take(user_id, now)
        if parent is not None:
            self._by_agent.take(parent.session_id, now)

    def _granted_ttl(
        self, requested: int | None, agent: AgentKind, parent: AgentClaims | None, now: int
    ) -> int:
        ttl = requested if requested else self._ttl.default
        ttl = max(self._ttl.minimum, min(ttl, self._ttl.maximum, agent.max_ttl))
        if parent is not None:
            ttl = min(ttl, parent.expires_at - now)  # a child never outlives its parent
        if ttl <= 0:
            raise PermissionDenied("the delegating session has expired", reason="SESSION_EXPIRED")
        return ttl

    def _claims(self, session: SessionRecord, parent: AgentClaims | None) -> dict[str, Any]:
        act: dict[str, Any] = {"sub": session.agent_id, "sid": session.id}
        if parent is not None:
            act["act"] = dict(parent.act)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": session.user_id,
            "act": act,
            "client_id": session.agent_id,  # RFC 9068 §2.2: the acting agent, as act.sub
            "scope": " ".join(session.scopes),
            "jti": session.id,
            "sn": serial_bit(session.serial),
            "iat": session.created_at,
            "nbf": session.created_at,
            "exp": session.expires_at,
        }
        if session.audiences:
            claims["aud"] = list(session.audiences)
        if session.task:
            claims["task"] = session.task
        if session.parent_id:
            claims["parent"] = session.parent_id
        if session.jkt:
            claims["cnf"] = {"jkt": session.jkt}
        return claims


def _validate(request: DelegateInput) -> list[Scope]:
    violations: list[FieldViolation] = []
    if not request.agent_id:
        violations.append(FieldViolation("agent_id", "required"))
    elif not _AGENT_ID.fullmatch(request.agent_id):
        violations.append(FieldViolation("agent_id", "not a valid agent id"))
    requested: list[Scope] = []
    if not request.scopes:
        violations.append(FieldViolation("scopes", "at least one scope is required"))
    elif len(request.scopes) > MAX_SCOPES_PER_REQUEST:
        violations.append(FieldViolation("scopes", f"at most {MAX_SCOPES_PER_REQUEST} scopes"))
    else:
        seen: set[str] = set()
        for index, text in enumerate(request.scopes):
            try:
                scope = Scope.parse(text)
            except ScopeSyntaxError as exc:
                violations.append(FieldViolation(f"scopes[{index}]", str(exc)))
                continue
            if scope.text not in seen:  # granted = requested, deduplicated, in request order
                seen.add(scope.text)
                requested.append(scope)
    if request.ttl_seconds is not None and request.ttl_seconds < 0:
        violations.append(FieldViolation("ttl", "must not be negative"))
    if len(request.task) > MAX_TASK_LENGTH:
        violations.append(FieldViolation("task", f"at most {MAX_TASK_LENGTH} characters"))
    elif (problem := unreadable(request.task)) is not None:
        violations.append(FieldViolation("task", problem))
    if len(request.audiences) > MAX_AUDIENCES:
        violations.append(FieldViolation("audiences", f"at most {MAX_AUDIENCES} audiences"))
    for index, audience in enumerate(request.audiences):
        if not audience or len(audience) > MAX_AUDIENCE_LENGTH or not audience.isprintable():
            violations.append(FieldViolation(f"audiences[{index}]", "not a valid audience"))
    if request.jkt and not _JKT.fullmatch(request.jkt):
        violations.append(
            FieldViolation("jkt", "must be an RFC 7638 SHA-256 thumbprint (43 base64url chars)")
        )
    if violations:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in violations), violations=violations
        )
    return requested


def _actor_unauthenticated(agent_id: str, problem: str) -> PermissionDenied:
    return PermissionDenied(
        f"agent {agent_id!r} is not authenticated: {problem}",
        reason="ACTOR_UNAUTHENTICATED",
        metadata={"agent_id": agent_id},
    )


def _holder_scopes(delegator: UserPrincipal | AgentPrincipal) -> ScopeSet:
    if isinstance(delegator, UserPrincipal):
        return delegator.grantable
    claims = delegator.claims
    if not claims.scopes.allows_action(DELEGATE_ACTION):
        raise PermissionDenied(
            f"this agent session does not hold {DELEGATE_ACTION}",
            reason="DELEGATION_NOT_GRANTED",
        )
    return claims.scopes


def delegation_depth(claims: AgentClaims) -> int:
    """How many delegations lead from the user to this session: its nested `act` levels."""
    depth, act = 1, claims.act.get("act")
    while isinstance(act, Mapping):  # the parent's act, nested in this one's
        depth += 1
        act = act.get("act")
    return depth


def _require_depth(parent: AgentClaims, max_depth: int) -> None:
    depth = delegation_depth(parent) + 1
    if depth > max_depth:
        raise FailedPrecondition(
            f"a sub-agent of this session would be {depth} delegations from the user;"
            f" at most {max_depth} are allowed (tokens.max_delegation_depth)",
            reason="DELEGATION_TOO_DEEP",
            metadata={"max_delegation_depth": str(max_depth)},
        )


def _require_usable_size(token: str, max_bytes: int) -> None:
    """A token larger than every verifier takes (Check refuses it unread) is never handed out."""
    if len(token) > max_bytes:
        problem = (
            f"the agent token would be {len(token)} bytes, over server.max_token_bytes"
            f" ({max_bytes}): request fewer or shorter scopes, audiences or task"
        )
        raise InvalidArgument(
            problem,
            violations=[FieldViolation("request", problem)],
            reason="TOKEN_TOO_LARGE",
            metadata={"max_token_bytes": str(max_bytes), "token_bytes": str(len(token))},
        )


def _require_covered(holder: ScopeSet, requested: list[Scope], reason: str, whose: str) -> None:
    missing = holder.uncovered(requested)
    if missing:
        names = " ".join(s.text for s in missing)
        raise PermissionDenied(
            f"requested scopes not covered by what {whose}: {names}",
            reason=reason,
            metadata={"scopes": names},
        )


def _narrow_binding(parent: AgentClaims | None, requested: str) -> str:
    """A sub-agent of a key-bound session is bound to the same key: otherwise a stolen bound
    token, useless for Check without the key, could mint an unbound (or self-bound) child."""
    if parent is None or not parent.jkt:
        return requested
    if requested and requested != parent.jkt:
        raise PermissionDenied(
            "a sub-agent of a key-bound session must be bound to the same key",
            reason="KEY_BINDING_ESCALATION",
            metadata={"field": "jkt"},
        )
    return parent.jkt


def _narrow_audiences(parent: AgentClaims | None, requested: tuple[str, ...]) -> tuple[str, ...]:
    if parent is None or parent.audiences is None:
        return requested
    if not requested:
        return tuple(sorted(parent.audiences))
    wider = [a for a in requested if a not in parent.audiences]
    if wider:
        raise PermissionDenied(
            f"audiences not allowed to the parent session: {' '.join(wider)}",
            reason="AUDIENCE_ESCALATION",
            metadata={"audiences": " ".join(wider)},
        )
    return requested


def _user_id(delegator: UserPrincipal | AgentPrincipal) -> str:
    if isinstance(delegator, UserPrincipal):
        return delegator.user_id
    return delegator.claims.user_id

"""AgentIdentityService: each method translates proto -> domain call -> proto, nothing more.
Callers are already authenticated and authorised (handlers.py) and arrive as ``principal``."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import Any, TypeVar

import grpc
from agentid.v1 import agentid_pb2 as pb
from google.protobuf import timestamp_pb2

from agentid_server.api.agent_methods import AgentMethods
from agentid_server.api.convert import (
    context_of,
    dict_to_struct,
    microseconds_of,
    timestamp,
    whole_seconds,
)
from agentid_server.domain.agents import AgentAdmin
from agentid_server.domain.audit import Auditor, AuditRecord, AuditRequest
from agentid_server.domain.check import Checker, CheckInput
from agentid_server.domain.delegation import DelegateInput, Delegator
from agentid_server.domain.errors import InvalidArgument
from agentid_server.domain.keys import KeyRetirer
from agentid_server.domain.model import (
    ActorKind,
    AgentPrincipal,
    EventType,
    Principal,
    ServicePrincipal,
    UserPrincipal,
)
from agentid_server.domain.revocation import Revocation, Snapshot
from agentid_server.domain.revoking import Revoker
from agentid_server.domain.sessions import ListedSession, ListSessionsInput, SessionLister
from agentid_server.domain.stepup import StepUp, StepUps

Context = grpc.aio.ServicerContext[Any, Any]
CONSISTENCY_MARGIN = 0.05  # seconds kept back from the deadline to answer in time


def step_up_message(step_up: StepUp) -> pb.StepUp:
    message = pb.StepUp(
        id=step_up.id,
        session_id=step_up.session_id,
        user_id=step_up.user_id,
        agent_id=step_up.agent_id,
        action=step_up.action,
        resource=step_up.resource,
        context=dict_to_struct(step_up.context),
        binding_message=step_up.binding_message,
        state=pb.StepUpState.ValueType(step_up.state),
        created_at=timestamp(step_up.created_at),
        expires_at=timestamp(step_up.expires_at),
        risk_rule=step_up.risk_rule,
        comment=step_up.comment,
    )
    if step_up.resolved_at is not None:
        message.resolved_at.CopyFrom(timestamp(step_up.resolved_at))
    return message


E = TypeVar("E", bound=enum.IntEnum)


def _enum(cls: type[E], value: int, field: str) -> E:
    try:
        return cls(value)
    except ValueError:
        raise InvalidArgument.field(field, f"unknown value {value}") from None


def audit_record_message(record: AuditRecord) -> pb.AuditRecord:
    return pb.AuditRecord(
        id=record.id,
        time=timestamp_pb2.Timestamp(
            seconds=record.time_us // 1_000_000, nanos=record.time_us % 1_000_000 * 1000
        ),
        event_type=pb.EventType.ValueType(record.event_type),
        session_id=record.session_id,
        user_id=record.user_id,
        scopes=record.scopes,
        agent_id=record.agent_id,
        actor_kind=pb.ActorKind.ValueType(record.actor_kind),
        actor_id=record.actor_id,
        action=record.action,
        resource=record.resource,
        decision=pb.Decision.ValueType(record.decision),
        reason=pb.Reason.ValueType(record.reason),
        parent_session_id=record.parent_session_id,
        step_up_id=record.step_up_id,
        context=dict_to_struct(record.context),
        detail=record.detail,
        prev_hash=record.prev_hash,
        hash=record.hash,
        chain_id=record.chain_id,
    )


def revocation_event(revocation: Revocation) -> pb.RevocationEvent:
    return pb.RevocationEvent(
        sequence=revocation.sequence,
        session_id=revocation.session_id,
        serial=revocation.serial,
        user_id=revocation.user_id,
        reason=revocation.reason,
        revoked_at=timestamp(revocation.revoked_at),
        expires_at=timestamp(revocation.expires_at),
    )


def session_message(listed: ListedSession, now: float) -> pb.Session:
    session = listed.record
    message = pb.Session(
        session_id=session.id,
        agent_id=session.agent_id,
        user_id=session.user_id,
        parent_session_id=session.parent_id,
        scopes=session.scopes,
        audiences=session.audiences,
        task=session.task,
        create_time=timestamp(session.created_at),
        expire_time=timestamp(session.expires_at),
        revoke_reason=listed.revoke_reason,
        serial=session.serial,
        jkt=session.jkt,
        state=pb.SessionState.ValueType(listed.state(now)),
    )
    if listed.revoked_at is not None:
        message.revoke_time.CopyFrom(timestamp(listed.revoked_at))
    return message


@lru_cache(maxsize=4096)
def watched_event_bytes(revocation: Revocation) -> bytes:
    """A live revocation as every watcher's stream sends it, built and serialized once for all of
    them (the stream's serializer passes bytes through)."""
    return pb.WatchRevocationsResponse(event=revocation_event(revocation)).SerializeToString()


class AgentIdentityServicer(AgentMethods):
    def __init__(
        self,
        *,
        agents: AgentAdmin,
        delegator: Delegator,
        checker: Checker,
        revoker: Revoker,
        step_ups: StepUps,
        auditor: Auditor,
        sessions: SessionLister,
        keys: KeyRetirer,
        jwks: Callable[[], str],
        max_consistency_wait: float,
        max_context_bytes: int,
        on_decision: Callable[[str, str, str], None] | None = None,
    ) -> None:
        """``on_decision``: told each Check's decision, reason and session id (telemetry)."""
        self._agents = agents
        self._delegator = delegator
        self._on_decision = on_decision
        self._checker = checker
        self._revoker = revoker
        self._step_ups = step_ups
        self._auditor = auditor
        self._sessions = sessions
        self._keys = keys
        self._jwks = jwks
        self._max_wait = max_consistency_wait
        self._max_context_bytes = max_context_bytes

    async def Delegate(
        self, request: pb.DelegateRequest, context: Context, principal: Principal
    ) -> pb.DelegateResponse:
        assert isinstance(principal, UserPrincipal | AgentPrincipal)  # the method policy ensures it
        ttl = whole_seconds(request, "ttl", "ttl")
        result = await self._delegator.delegate(
            principal,
            DelegateInput(
                agent_id=request.agent_id,
                scopes=list(request.scopes),
                ttl_seconds=ttl,
                task=request.task,
                audiences=list(request.audiences),
                jkt=request.jkt,
                actor_token=request.actor_token,
            ),
        )
        session = result.session
        return pb.DelegateResponse(
            session_id=session.id,
            token=result.token,
            expires_at=timestamp(session.expires_at),
            scopes=session.scopes,
            user_id=session.user_id,
            parent_session_id=session.parent_id,
            serial=session.serial,
        )

    async def Check(
        self, request: pb.CheckRequest, context: Context, principal: Principal
    ) -> pb.CheckResponse:
        assert isinstance(principal, ServicePrincipal)
        outcome = await self._checker.check(
            principal,
            CheckInput(
                token=request.token,
                action=request.action,
                resource=request.resource,
                context=context_of(request, self._max_context_bytes),
                pop_proof=request.pop_proof,
                pop_method=request.pop_method,
                pop_uri=request.pop_uri,
                min_revocation_sequence=request.min_revocation_sequence,
                consistency_wait=(
                    self._consistency_wait(context) if request.min_revocation_sequence else 0.0
                ),
            ),
        )
        claims = outcome.claims
        if self._on_decision is not None:
            self._on_decision(
                outcome.decision.name, outcome.reason.name, claims.session_id if claims else ""
            )
        return pb.CheckResponse(
            decision=pb.Decision.ValueType(outcome.decision),
            reason=pb.Reason.ValueType(outcome.reason),
            message=outcome.message,
            decision_id=str(outcome.decision_id),
            session_id=claims.session_id if claims else "",
            user_id=claims.user_id if claims else "",
            agent_id=claims.agent_id if claims else "",
            matched_scope=outcome.matched_scope,
            risk_rule=outcome.risk_rule,
            step_up_id=outcome.step_up_id,
            revocation_sequence=outcome.revocation_sequence,
        )

    async def GetJwks(
        self, request: pb.GetJwksRequest, context: Context, principal: Principal | None
    ) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=self._jwks())

    async def StepUp(
        self, request: pb.StepUpRequest, context: Context, principal: Principal
    ) -> pb.StepUpResponse:
        assert isinstance(principal, AgentPrincipal)
        step_up = await self._step_ups.request(
            principal,
            action=request.action,
            resource=request.resource,
            context=context_of(request, self._max_context_bytes),
            binding_message=request.binding_message,
        )
        return pb.StepUpResponse(step_up=step_up_message(step_up))

    async def ResolveStepUp(
        self, request: pb.ResolveStepUpRequest, context: Context, principal: Principal
    ) -> pb.ResolveStepUpResponse:
        assert isinstance(principal, UserPrincipal)
        step_up = await self._step_ups.resolve(
            principal,
            step_up_id=request.step_up_id,
            approve=request.approve,
            comment=request.comment,
        )
        return pb.ResolveStepUpResponse(step_up=step_up_message(step_up))

    def _consistency_wait(self, context: Context) -> float:
        """max_consistency_wait, or less so the answer still beats the call's deadline."""
        remaining: float | None = context.time_remaining()  # None: the call has no deadline
        if remaining is None:
            return self._max_wait
        return max(0.0, min(self._max_wait, remaining - CONSISTENCY_MARGIN))

    async def Revoke(
        self, request: pb.RevokeRequest, context: Context, principal: Principal
    ) -> pb.RevokeResponse:
        outcome = await self._revoker.revoke(
            principal,
            session_id=request.session_id,
            user_id=request.user_id,
            agent_id=request.agent_id,
            reason=request.reason,
        )
        return pb.RevokeResponse(
            session_ids=outcome.session_ids, revocation_sequence=outcome.sequence
        )

    async def RetireSigningKey(
        self, request: pb.RetireSigningKeyRequest, context: Context, principal: Principal
    ) -> pb.RetireSigningKeyResponse:
        assert isinstance(principal, ServicePrincipal)  # the method policy ensures it
        retired = await self._keys.retire(principal, request.kid, request.reason)
        return pb.RetireSigningKeyResponse(
            retired_kid=retired.retired_kid, signing_kid=retired.signing_kid
        )

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context, principal: Principal
    ) -> pb.ListSessionsResponse:
        page = await self._sessions.list(
            principal,
            ListSessionsInput(
                user_id=request.user_id,
                agent_id=request.agent_id,
                include_ended=request.include_ended,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        return pb.ListSessionsResponse(
            sessions=[session_message(listed, page.now) for listed in page.sessions],
            next_page_token=page.next_page_token,
        )

    async def VerifyAudit(
        self, request: pb.VerifyAuditRequest, context: Context, principal: Principal
    ) -> pb.VerifyAuditResponse:
        result = await self._auditor.verify(
            request.from_id, request.to_id, list(request.checkpoints), request.checkpoint_now
        )
        return pb.VerifyAuditResponse(
            ok=result.ok,
            verified=result.verified,
            first_bad_id=result.first_bad_id,
            head_hash=result.head_hash,
            checkpoints=[checkpoint.text() for checkpoint in result.checkpoints],
            problem=pb.AuditProblem.ValueType(result.problem),
            detail=result.detail,
        )

    async def WatchStepUps(
        self, request: pb.WatchStepUpsRequest, context: Context, principal: Principal
    ) -> AsyncIterator[pb.WatchStepUpsResponse]:
        assert isinstance(principal, UserPrincipal | AgentPrincipal)
        async for step_up in self._step_ups.watch(
            principal, request.step_up_id, request.current_only
        ):
            yield pb.WatchStepUpsResponse(step_up=step_up_message(step_up))

    async def WatchRevocations(
        self, request: pb.WatchRevocationsRequest, context: Context, principal: Principal
    ) -> AsyncIterator[pb.WatchRevocationsResponse | bytes]:
        async for item in self._revoker.watch(request.after_sequence):
            if isinstance(item, Snapshot):
                yield pb.WatchRevocationsResponse(
                    snapshot=pb.RevocationSnapshot(
                        sequence=item.sequence,
                        revoked_serials=item.revoked_serials,
                        count=item.count,
                    )
                )
            else:
                yield watched_event_bytes(item)

    async def Audit(
        self, request: pb.AuditRequest, context: Context, principal: Principal
    ) -> AsyncIterator[pb.AuditResponse]:
        query = AuditRequest(
            session_id=request.session_id,
            include_descendants=request.include_descendants,
            user_id=request.user_id,
            actor_kind=_enum(ActorKind, request.actor_kind, "actor_kind"),
            event_types=tuple(_enum(EventType, t, "event_types") for t in request.event_types),
            since_us=microseconds_of(request, "since"),
            until_us=microseconds_of(request, "until"),
            after_id=request.after_id,
            limit=request.limit,
            follow=request.follow,
        )
        async for record in self._auditor.records(principal, query):
            yield pb.AuditResponse(record=audit_record_message(record))

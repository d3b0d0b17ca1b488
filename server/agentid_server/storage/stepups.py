"""Step-ups in the database. Every write is a journal job, so a state change and its audit record
commit together; watchers hear of each change after the commit."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.model import AuditEvent, Decision, Reason
from agentid_server.domain.stepup import Binding, Settlement, StepUp, StepUpState
from agentid_server.storage import tables
from agentid_server.storage.database import read_all
from agentid_server.storage.journal import JobResult, Journal
from agentid_server.storage.notify import notify_step_ups

OnChange = Callable[[list[StepUp]], None]
_LIVE = (int(StepUpState.PENDING), int(StepUpState.APPROVED))


class StepUpRepository:
    def __init__(self, engine: AsyncEngine, journal: Journal, on_change: OnChange) -> None:
        self._engine = engine
        self._journal = journal
        self._on_change = on_change

    def _changed(
        self, connection: Connection, step_ups: list[StepUp]
    ) -> Callable[[list[int]], None] | None:
        """In the job: the other replicas are told (at the commit); after it, this one's
        watchers."""
        if not step_ups:
            return None
        notify_step_ups(connection, [s.id for s in step_ups])
        return lambda _ids: self._on_change(step_ups)

    async def request(
        self, candidate: StepUp, event: AuditEvent, now: float, max_pending: int
    ) -> StepUp | None:
        def job(connection: Connection) -> JobResult[StepUp | None]:
            s = tables.step_ups
            live = (s.c.state == int(StepUpState.PENDING), s.c.expires_at > now)
            pending = connection.execute(
                _binding_query(_binding(candidate)).where(*live).limit(1)
            ).first()
            if pending is not None:
                return JobResult(step_up_record(pending))
            # The session's live PENDING ones (the binding index leads with session_id).
            held = connection.execute(
                select(func.count()).select_from(
                    select(s.c.id)
                    .where(s.c.session_id == candidate.session_id, *live)
                    .limit(max_pending)
                    .subquery()
                )
            ).scalar_one()
            if held >= max_pending:
                return JobResult(None)
            connection.execute(s.insert().values(**_row(candidate)))
            return JobResult(candidate, [event], self._changed(connection, [candidate]))

        return await self._journal.run(job)

    async def get(self, step_up_id: str) -> StepUp | None:
        s = tables.step_ups
        rows = await read_all(self._engine, select(s).where(s.c.id == step_up_id))
        return step_up_record(rows[0]) if rows else None

    async def resolve(
        self,
        step_up_id: str,
        state: StepUpState,
        comment: str,
        now: float,
        expires_at: int,
        event: Callable[[StepUp], AuditEvent],
    ) -> StepUp | None:
        def job(connection: Connection) -> JobResult[StepUp | None]:
            s = tables.step_ups
            row = connection.execute(
                update(s)
                .where(
                    s.c.id == step_up_id,
                    s.c.state == int(StepUpState.PENDING),
                    s.c.expires_at > now,
                )
                .values(
                    state=int(state), comment=comment, resolved_at=int(now), expires_at=expires_at
                )
                .returning(*s.c)
            ).first()
            if row is None:
                return JobResult(None)
            resolved = step_up_record(row)
            return JobResult(resolved, [event(resolved)], self._changed(connection, [resolved]))

        return await self._journal.run(job)

    async def settle(
        self, binding: Binding, now: float, event: Callable[[Decision, Reason, str], AuditEvent]
    ) -> Settlement:
        def job(connection: Connection) -> JobResult[tuple[Decision, Reason, str]]:
            s = tables.step_ups
            newest = connection.execute(_binding_query(binding).limit(1)).first()
            step_up = step_up_record(newest).seen_at(now) if newest is not None else None
            outcome: tuple[Decision, Reason, str] = (
                Decision.STEP_UP_REQUIRED,
                Reason.HIGH_RISK,
                "",
            )
            changed: list[StepUp] = []
            if step_up is not None and step_up.state is StepUpState.APPROVED:
                consumed = connection.execute(
                    update(s)
                    .where(s.c.id == step_up.id, s.c.state == int(StepUpState.APPROVED))
                    .values(state=int(StepUpState.CONSUMED))
                ).rowcount
                if consumed == 1:  # the conditional update: one Check, once, across replicas
                    outcome = (Decision.ALLOW, Reason.STEP_UP_APPROVED, step_up.id)
                    changed.append(_with_state(step_up, StepUpState.CONSUMED))
            elif (
                step_up is not None
                and step_up.state is StepUpState.DENIED
                and now < step_up.expires_at  # a denial holds until its expires_at
            ):
                outcome = (Decision.DENY, Reason.STEP_UP_DENIED, step_up.id)
            return JobResult(outcome, [event(*outcome)], self._changed(connection, changed))

        (decision, reason, step_up_id), ids = await self._journal.run_recorded(job)
        return Settlement(decision, reason, step_up_id, ids[0])

    async def get_many(self, step_up_ids: Sequence[str]) -> list[StepUp]:
        s = tables.step_ups
        rows = await read_all(self._engine, select(s).where(s.c.id.in_(list(step_up_ids))))
        return [step_up_record(row) for row in rows]

    async def pending_for_user(self, user_id: str, now: float) -> list[StepUp]:
        s = tables.step_ups
        statement = (
            select(s)
            .where(
                s.c.user_id == user_id, s.c.state == int(StepUpState.PENDING), s.c.expires_at > now
            )
            .order_by(s.c.created_at_us)
        )
        return [step_up_record(row) for row in await read_all(self._engine, statement)]

    async def for_session(self, session_id: str) -> list[StepUp]:
        s = tables.step_ups
        statement = select(s).where(s.c.session_id == session_id).order_by(s.c.created_at_us)
        return [step_up_record(row) for row in await read_all(self._engine, statement)]

    async def expire_due(self, now: float) -> list[StepUp]:
        def job(connection: Connection) -> JobResult[list[StepUp]]:
            # expires_at holds whole seconds: <= floor(now) is <= now
            expired = _expire(connection, _EXPIRE_DUE, {"now": math.floor(now)})
            return JobResult(expired, [], self._changed(connection, expired))

        return await self._journal.run(job)


def expire_for_sessions(connection: Connection, session_ids: Sequence[str]) -> list[StepUp]:
    """In a revocation's transaction: the sessions' pending and approved step-ups expire."""
    return _expire(connection, _EXPIRE_FOR_SESSIONS, {"ids": list(session_ids)})


def _expire(connection: Connection, statement: Any, params: dict[str, Any]) -> list[StepUp]:
    """Marks the live step-ups ``statement`` selects EXPIRED; returns them as changed (a row
    consumed meanwhile by another replica is not matched, so never announced as expired)."""
    return [step_up_record(row) for row in connection.execute(statement, params)]


def _expiring(which: ColumnElement[bool]) -> Any:
    """UPDATE … SET state = EXPIRED of the pending and approved step-ups ``which`` selects,
    returning them; built once (every Revoke and every housekeeping pass runs one)."""
    s = tables.step_ups
    return (
        update(s)
        .where(which, s.c.state.in_(_LIVE))
        .values(state=int(StepUpState.EXPIRED))
        .returning(*s.c)
    )


_EXPIRE_FOR_SESSIONS = _expiring(tables.step_ups.c.session_id.in_(bindparam("ids", expanding=True)))
_EXPIRE_DUE = _expiring(tables.step_ups.c.expires_at <= bindparam("now"))


def _binding(step_up: StepUp) -> Binding:
    return Binding(step_up.session_id, step_up.action, step_up.resource, step_up.context_digest)


def _binding_query(binding: Binding) -> Select[Any]:
    s = tables.step_ups
    return (
        select(s)
        .where(
            s.c.session_id == binding.session_id,
            s.c.action == binding.action,
            s.c.resource == binding.resource,
            s.c.context_digest == binding.context_digest,
        )
        .order_by(s.c.created_at_us.desc())
    )


def _row(step_up: StepUp) -> dict[str, Any]:
    return {
        "id": step_up.id,
        "session_id": step_up.session_id,
        "user_id": step_up.user_id,
        "agent_id": step_up.agent_id,
        "action": step_up.action,
        "resource": step_up.resource,
        "context": dict(step_up.context) if step_up.context is not None else None,
        "context_digest": step_up.context_digest,
        "binding_message": step_up.binding_message,
        "state": int(step_up.state),
        "risk_rule": step_up.risk_rule,
        "comment": step_up.comment,
        "created_at_us": int(step_up.created_at * 1_000_000),
        "expires_at": step_up.expires_at,
        "resolved_at": step_up.resolved_at,
        "scopes": json.dumps(list(step_up.scopes)),
        "parent_session_id": step_up.parent_session_id,
    }


def step_up_record(row: Any) -> StepUp:
    """A step_ups row as the domain's step-up."""
    return StepUp(
        id=row.id,
        session_id=row.session_id,
        user_id=row.user_id,
        agent_id=row.agent_id,
        action=row.action,
        resource=row.resource,
        context=row.context,
        context_digest=row.context_digest,
        binding_message=row.binding_message,
        state=StepUpState(row.state),
        created_at=row.created_at_us / 1_000_000,
        expires_at=row.expires_at,
        resolved_at=row.resolved_at,
        risk_rule=row.risk_rule,
        comment=row.comment,
        scopes=tuple(json.loads(row.scopes)),
        parent_session_id=row.parent_session_id,
    )


def _with_state(step_up: StepUp, state: StepUpState) -> StepUp:
    return replace(step_up, state=state)

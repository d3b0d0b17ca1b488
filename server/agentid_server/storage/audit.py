"""Reading the audit trail: the two questions (by session, by user), and chain verification."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Select, and_, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.audit import AuditQuery, AuditRecord, Verification
from agentid_server.domain.model import ActorKind, Decision, EventType, Reason
from agentid_server.storage import tables
from agentid_server.storage.audit_chain import GENESIS, canonical_bytes, link
from agentid_server.storage.database import read_all
from agentid_server.storage.lineage import session_subtree
from agentid_server.storage.rows import AUDIT_COLUMNS
from agentid_server.storage.visibility import horizon

VERIFY_PAGE = 5000


class AuditRepository:
    def __init__(self, engine: AsyncEngine, *, wait_for_writers: float = 5.0) -> None:
        """``wait_for_writers``: on PostgreSQL, how long a read may wait for the records other
        writers are committing below the newest visible id (visibility.horizon)."""
        self._engine = engine
        self._wait = wait_for_writers

    async def query(self, query: AuditQuery) -> list[AuditRecord]:
        statement = self.statement(query, await horizon(self._engine, self._wait))
        return [record_from_row(row) for row in await read_all(self._engine, statement)]

    @staticmethod
    def statement(query: AuditQuery, top: int | None) -> Select[Any]:
        """The SELECT answering ``query``, up to id ``top`` when one is given."""
        a = tables.audit_records
        conditions = [a.c.id > query.after_id]
        if top is not None:
            conditions.append(a.c.id <= top)
        if query.session_ids:
            sessions = list(query.session_ids)
            conditions.append(
                or_(
                    a.c.session_id.in_(sessions),
                    and_(
                        # A literal: PostgreSQL's generic plans see the partial index's condition.
                        a.c.event_type == literal_column(str(int(EventType.DELEGATE))),
                        a.c.parent_session_id.in_(sessions),
                    ),
                )
            )
        if query.user_id:
            conditions.append(a.c.user_id == query.user_id)
        if query.actor_kind:
            conditions.append(a.c.actor_kind == int(query.actor_kind))
        if query.event_types:
            conditions.append(a.c.event_type.in_(sorted(int(t) for t in query.event_types)))
        if query.since_us is not None:
            conditions.append(a.c.time_us >= query.since_us)
        if query.until_us is not None:
            conditions.append(a.c.time_us < query.until_us)
        if query.newest:  # the last `limit`, handed back in id order
            last = select(a).where(*conditions).order_by(a.c.id.desc()).limit(query.limit)
            tail = last.subquery()
            return select(tail).order_by(tail.c.id)
        return select(a).where(*conditions).order_by(a.c.id).limit(query.limit)

    async def subtree(self, session_id: str) -> list[str]:
        rows = await read_all(self._engine, session_subtree(session_id))
        return [row[0] for row in rows] or [session_id]

    async def session_user(self, session_id: str) -> str | None:
        s = tables.sessions
        rows = await read_all(self._engine, select(s.c.user_id).where(s.c.id == session_id))
        return str(rows[0][0]) if rows else None

    async def verify(self, from_id: int, to_id: int) -> Verification:
        """Recomputes each record's hash from its stored values and its chain predecessor."""
        a = tables.audit_records
        top = await horizon(self._engine, self._wait)
        if top is not None:
            to_id = min(to_id, top) if to_id else top
            if to_id < max(from_id, 1):  # nothing committed in the range yet
                return Verification(True, 0, 0, b"")
        heads: dict[str, bytes] = {}
        verified = 0
        head_hash = b""
        cursor = max(from_id, 1) - 1
        while True:
            page_query = select(a).where(a.c.id > cursor).order_by(a.c.id).limit(VERIFY_PAGE)
            if to_id:
                page_query = page_query.where(a.c.id <= to_id)
            page = await read_all(self._engine, page_query)
            for row in page:
                if row.chain_id not in heads:
                    heads[row.chain_id] = await self._predecessor_hash(row.chain_id, row.id)
                prev = bytes(row.prev_hash or b"")
                values = [getattr(row, column) for column in AUDIT_COLUMNS]
                expected = link(prev, canonical_bytes(row.id, row.chain_id, values))
                if prev != heads[row.chain_id] or bytes(row.hash or b"") != expected:
                    return Verification(False, verified, row.id, head_hash)
                heads[row.chain_id] = expected
                head_hash = expected
                verified += 1
                cursor = row.id
            if len(page) < VERIFY_PAGE:
                return Verification(True, verified, 0, head_hash)

    async def _predecessor_hash(self, chain_id: str, record_id: int) -> bytes:
        a = tables.audit_records
        statement = (
            select(a.c.hash)
            .where(a.c.chain_id == chain_id, a.c.id < record_id)
            .order_by(a.c.id.desc())
            .limit(1)
        )
        rows = await read_all(self._engine, statement)
        return bytes(rows[0][0]) if rows else GENESIS


def record_from_row(row: Any) -> AuditRecord:
    """From a table row, or from the journal's sealed tuple (same column order; the JSON
    columns are text in both, as hashed)."""
    (record_id, time_us, event_type, session_id, user_id, scopes, agent_id, actor_kind, actor_id,
     action, resource, decision, reason, parent, step_up_id, context, detail, chain_id, prev_hash,
     digest) = row  # fmt: skip
    return AuditRecord(
        id=record_id,
        time_us=time_us,
        event_type=EventType(event_type),
        session_id=session_id,
        user_id=user_id,
        scopes=tuple(json.loads(scopes)),
        agent_id=agent_id,
        actor_kind=ActorKind(actor_kind),
        actor_id=actor_id,
        action=action,
        resource=resource,
        decision=Decision(decision),
        reason=Reason(reason),
        parent_session_id=parent or "",
        step_up_id=step_up_id,
        context=json.loads(context) if context is not None else None,
        detail=detail,
        chain_id=chain_id,
        prev_hash=bytes(prev_hash or b""),
        hash=bytes(digest or b""),
    )

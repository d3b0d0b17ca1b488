"""Reading the audit trail: the two questions (by session, by user), and chain verification."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from sqlalchemy import Select, and_, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.audit import AuditQuery, AuditRecord, Verification
from agentid_server.domain.checkpoint import AuditProblem, Checkpoint
from agentid_server.domain.model import ActorKind, Decision, EventType, Reason
from agentid_server.storage import tables
from agentid_server.storage.audit_chain import GENESIS, canonical_bytes, link
from agentid_server.storage.checkpoints import COLUMNS as CHECKPOINT_COLUMNS
from agentid_server.storage.checkpoints import CheckpointKey
from agentid_server.storage.checkpoints import from_row as checkpoint_from_row
from agentid_server.storage.database import read_all
from agentid_server.storage.lineage import session_subtree
from agentid_server.storage.rows import AUDIT_COLUMNS
from agentid_server.storage.visibility import horizon

VERIFY_PAGE = 5000


class AuditRepository:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        wait_for_writers: float = 5.0,
        checkpoint_key: CheckpointKey | None = None,
    ) -> None:
        """``wait_for_writers``: on PostgreSQL, how long a read may wait for the records other
        writers are committing below the newest visible id (visibility.horizon).
        ``checkpoint_key`` checks checkpoints' signatures (without it every one fails)."""
        self._engine = engine
        self._wait = wait_for_writers
        self._checkpoint_key = checkpoint_key

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

    async def verify(
        self, from_id: int, to_id: int, kept: tuple[Checkpoint, ...] = ()
    ) -> Verification:
        """Recomputes each record's hash from its stored values and its chain predecessor, and
        checks every stored checkpoint of the range and every ``kept`` one (whatever the range):
        signed with our key, its record present with that hash."""
        a = tables.audit_records
        top = await horizon(self._engine, self._wait)
        if top is None:  # SQLite: its one writer commits in id order
            top = await self._newest_id()
        to_id = min(to_id, top) if to_id else top
        newest: dict[str, Checkpoint] = {}
        for checkpoint in kept:
            problem = await self._check(checkpoint, None)
            if problem is not None:
                return problem
            _keep_newest(newest, checkpoint)
        if to_id < max(from_id, 1):  # nothing committed in the range yet
            return Verification(True, 0, 0, b"", checkpoints=_ordered(newest))
        heads: dict[str, bytes] = {}
        verified = 0
        head_hash = b""
        cursor = max(from_id, 1) - 1
        while True:
            page_query = (
                select(a)
                .where(a.c.id > cursor, a.c.id <= to_id)
                .order_by(a.c.id)
                .limit(VERIFY_PAGE)
            )
            page = await read_all(self._engine, page_query)
            seen: dict[int, tuple[str, bytes]] = {}
            start = cursor
            for row in page:
                if row.chain_id not in heads:
                    heads[row.chain_id] = await self._predecessor_hash(row.chain_id, row.id)
                prev = bytes(row.prev_hash or b"")
                values = [getattr(row, column) for column in AUDIT_COLUMNS]
                expected = link(prev, canonical_bytes(row.id, row.chain_id, values))
                if prev != heads[row.chain_id] or bytes(row.hash or b"") != expected:
                    return Verification(
                        False,
                        verified,
                        row.id,
                        head_hash,
                        AuditProblem.BROKEN_LINK,
                        f"record {row.id} (chain {row.chain_id}) does not match its hash or does"
                        " not link to its predecessor",
                    )
                heads[row.chain_id] = expected
                head_hash = expected
                verified += 1
                cursor = row.id
                seen[row.id] = (row.chain_id, expected)
            last_page = len(page) < VERIFY_PAGE
            # The stored checkpoints of the ids this page covers; the last page covers up to the
            # range's end: a checkpoint beyond the last record left is a truncation.
            for checkpoint in await self._stored(start, to_id if last_page else cursor):
                problem = await self._check(checkpoint, seen)
                if problem is not None:
                    return replace(problem, verified=verified, head_hash=head_hash)
                _keep_newest(newest, checkpoint)
            if last_page:
                return Verification(True, verified, 0, head_hash, checkpoints=_ordered(newest))

    async def _stored(self, after: int, until: int) -> list[Checkpoint]:
        """The stored checkpoints of the records in (after, until]."""
        c = tables.audit_checkpoints
        statement = (
            select(*(c.c[name] for name in CHECKPOINT_COLUMNS))
            .where(c.c.record_id > after, c.c.record_id <= until)
            .order_by(c.c.record_id)
        )
        return [checkpoint_from_row(row) for row in await read_all(self._engine, statement)]

    async def _newest_id(self) -> int:
        """SQLite: the newest record id, or a checkpoint's above it (its records were removed),
        read in one statement (one snapshot: a checkpoint commits with its records)."""
        a, c = tables.audit_records, tables.audit_checkpoints
        statement = select(
            select(func.max(a.c.id)).scalar_subquery(),
            select(func.max(c.c.record_id)).scalar_subquery(),
        )
        rows = await read_all(self._engine, statement)
        return max(int(value or 0) for value in tuple(rows[0]))

    async def _check(
        self, checkpoint: Checkpoint, seen: dict[int, tuple[str, bytes]] | None
    ) -> Verification | None:
        """A failed verification when the checkpoint is not ours or its record is not as it
        says; ``seen``: the records just verified (else the record is read)."""
        where = f"the checkpoint of chain {checkpoint.chain_id} at record {checkpoint.record_id}"
        problem = (
            "no key checks checkpoints here"
            if self._checkpoint_key is None
            else self._checkpoint_key.problem(checkpoint)
        )
        if problem is not None:
            return _failed(checkpoint, AuditProblem.CHECKPOINT_FORGED, f"{where} {problem}")
        if seen is not None:
            record = seen.get(checkpoint.record_id)
        else:
            a = tables.audit_records
            rows = await read_all(
                self._engine,
                select(a.c.chain_id, a.c.hash).where(a.c.id == checkpoint.record_id),
            )
            found = tuple(rows[0]) if rows else None
            record = (str(found[0]), bytes(found[1] or b"")) if found else None
        if record is None:
            return _failed(
                checkpoint,
                AuditProblem.CHECKPOINT_RECORD_MISSING,
                f"record {checkpoint.record_id} is missing: {where} covers it (the chain was"
                " truncated or the record removed)",
            )
        if record != (checkpoint.chain_id, checkpoint.hash):
            return _failed(
                checkpoint,
                AuditProblem.CHECKPOINT_MISMATCH,
                f"record {checkpoint.record_id} is not the one {where} signed (the chain was"
                " changed and re-linked)",
            )
        return None

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


def _failed(checkpoint: Checkpoint, problem: AuditProblem, detail: str) -> Verification:
    return Verification(False, 0, checkpoint.record_id, b"", problem, detail)


def _keep_newest(newest: dict[str, Checkpoint], checkpoint: Checkpoint) -> None:
    known = newest.get(checkpoint.chain_id)
    if known is None or known.record_id < checkpoint.record_id:
        newest[checkpoint.chain_id] = checkpoint


def _ordered(newest: dict[str, Checkpoint]) -> tuple[Checkpoint, ...]:
    return tuple(sorted(newest.values(), key=lambda c: c.chain_id))


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

"""The audit writer: one task group-commits concurrent records in a single transaction and resolves
each caller's future only after the commit, so every answered decision is on disk without paying a
commit per record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agentid_server.domain.errors import Unavailable
from agentid_server.domain.model import AuditEvent, SessionRecord
from agentid_server.storage import tables
from agentid_server.storage.repositories import session_row

log = logging.getLogger(__name__)

_Pending = tuple[dict[str, Any], dict[str, object] | None, "asyncio.Future[int]"]


def audit_row(event: AuditEvent) -> dict[str, Any]:
    return {
        "time_us": int(event.time * 1_000_000),
        "event_type": int(event.event_type),
        "session_id": event.session_id,
        "user_id": event.user_id,
        "scopes": list(event.scopes),
        "agent_id": event.agent_id,
        "actor_kind": int(event.actor_kind),
        "actor_id": event.actor_id,
        "action": event.action,
        "resource": event.resource,
        "decision": int(event.decision),
        "reason": int(event.reason),
        "parent_session_id": event.parent_session_id,
        "step_up_id": event.step_up_id,
        "context": dict(event.context) if isinstance(event.context, Mapping) else None,
        "detail": event.detail,
    }


class AuditWriter:
    """Implements the domain's AuditLog port with group commit."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int, append_timeout: float = 5.0) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._timeout = append_timeout
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # SQLite: this writer is the only one inserting audit records (one process per database
        # file), so it numbers them itself; a multi-row INSERT ... RETURNING with guaranteed
        # order degrades to a statement per row there. PostgreSQL batches RETURNING well and may
        # have several replicas writing, so it takes ids from the table's sequence.
        self._numbered_here = engine.dialect.name == "sqlite"
        self._next_id: int | None = None
        self._insert_numbered = tables.audit_records.insert()
        self._insert_returning = tables.audit_records.insert().returning(
            tables.audit_records.c.id, sort_by_parameter_order=True
        )
        self.healthy = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Writes what is queued, then ends the writer."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def append(self, event: AuditEvent, *, new_session: SessionRecord | None = None) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(
            (audit_row(event), session_row(new_session) if new_session else None, future)
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            raise Unavailable(
                "the audit store did not take the record in time", reason="AUDIT_UNAVAILABLE"
            ) from None

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _insert(self, connection: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
        if not self._numbered_here:
            result = await connection.execute(self._insert_returning, rows)
            return [int(i) for i in result.scalars().all()]
        if self._next_id is None:
            top = await connection.execute(select(func.max(tables.audit_records.c.id)))
            self._next_id = int(top.scalar() or 0) + 1
        first = self._next_id
        for offset, row in enumerate(rows):
            row["id"] = first + offset
        await connection.execute(self._insert_numbered, rows)
        return list(range(first, first + len(rows)))

    async def _write(self, batch: list[_Pending]) -> None:
        sessions = [s for _, s, _ in batch if s is not None]
        rows = [row for row, _, _ in batch]
        try:
            async with self._engine.begin() as connection:
                if sessions:
                    await connection.execute(tables.sessions.insert(), sessions)
                ids = await self._insert(connection, rows)
        except (SQLAlchemyError, OSError) as exc:
            self._next_id = None
            self.healthy = False
            log.error("audit batch of %d records failed: %s", len(batch), type(exc).__name__)
            error = Unavailable("the audit store is unavailable", reason="AUDIT_UNAVAILABLE")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        if self._numbered_here:
            self._next_id = ids[-1] + 1
        self.healthy = True
        for (_, _, future), record_id in zip(batch, ids, strict=True):
            if not future.done():
                future.set_result(record_id)

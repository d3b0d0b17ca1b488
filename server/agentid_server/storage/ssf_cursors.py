"""Shared Signals out: each receiver's cursor (the last revocation sequence delivered to it, or
given up on), written through the journal, and the lease that lets one replica deliver to it.

* SQLite: one server per database file (writer_lock), so the lease is always held.
* PostgreSQL: a session advisory lock per receiver on a connection of its own
  (writer_lock.advisory_lock): the replica that holds it delivers; the others try again every
  poll interval, so when the holder stops or dies (its connection, and the lock, go with it)
  another takes over from the durable cursor.
"""

from __future__ import annotations

import contextlib
import hashlib

from sqlalchemy import Connection, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agentid_server.storage import tables
from agentid_server.storage.journal import JobResult, Journal
from agentid_server.storage.writer_lock import advisory_lock


def receiver_key(audience: str) -> str:
    """The cursor's key: the SHA-256 (hex) of the receiver's audience."""
    return hashlib.sha256(audience.encode()).hexdigest()


class Lease:
    """The right to deliver to one receiver, held until ``release``."""

    def __init__(self, connection: AsyncConnection | None) -> None:
        self._connection = connection

    async def held(self) -> bool:
        """Whether the lease still holds (PostgreSQL: its connection still answers)."""
        if self._connection is None:
            return True
        try:
            await self._connection.execute(text("SELECT 1"))
            await self._connection.commit()
        except (SQLAlchemyError, OSError):
            return False
        return True

    async def release(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(SQLAlchemyError, OSError):
                await connection.close()  # the lock goes with the session


class SignalCursors:
    """The ``ssf_cursors`` table and the receivers' leases."""

    def __init__(self, engine: AsyncEngine, journal: Journal, *, shared: bool) -> None:
        """``shared``: several replicas may use this database (PostgreSQL)."""
        self._engine = engine
        self._journal = journal
        self._shared = shared

    async def lease(self, audience: str) -> Lease | None:
        """The receiver's lease, or None while another replica holds it."""
        if not self._shared:
            return Lease(None)
        label = b"agentid.ssf-receiver:" + receiver_key(audience).encode()
        claimed = await advisory_lock(self._engine, label)
        return None if claimed is None else Lease(claimed[0])

    async def load(self, audience: str, start: int, now: int) -> int:
        """The receiver's cursor; a receiver seen for the first time starts at ``start`` (the
        revocations applied now: history before it is not sent), written at once."""
        key = receiver_key(audience)
        c = tables.ssf_cursors

        def job(connection: Connection) -> JobResult[int]:
            found = connection.execute(select(c.c.sequence).where(c.c.receiver == key)).scalar()
            if found is not None:
                return JobResult(int(found))
            connection.execute(
                c.insert().values(receiver=key, audience=audience, sequence=start, updated_at=now)
            )
            return JobResult(start)

        return await self._journal.run(job)

    async def advance(self, audience: str, sequence: int, now: int) -> None:
        """Moves the receiver's cursor forward to ``sequence`` (never back)."""
        key = receiver_key(audience)
        c = tables.ssf_cursors

        def job(connection: Connection) -> JobResult[None]:
            connection.execute(
                update(c)
                .where(c.c.receiver == key, c.c.sequence < sequence)
                .values(sequence=sequence, updated_at=now)
            )
            return JobResult(None)

        await self._journal.run(job)

"""Repositories: the small storage ports the domain and the composition root use."""

from __future__ import annotations

from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.model import SessionRecord
from agentid_server.domain.revocation import Revocation
from agentid_server.storage import tables
from agentid_server.storage.journal import JobResult, Journal

SESSION_SERIAL = "session_serial"


class SessionRepository:
    """Sessions: reads straight from the database, writes through the journal."""

    def __init__(self, engine: AsyncEngine, journal: Journal) -> None:
        self._engine = engine
        self._journal = journal

    async def allocate_serial(self) -> int:
        """The next session serial: monotonic, never reused (a refused Delegate leaves a gap)."""
        return await self._journal.run(_allocate_serial)

    async def get(self, session_id: str) -> SessionRecord | None:
        s = tables.sessions
        async with self._engine.connect() as connection:
            row = (await connection.execute(select(s).where(s.c.id == session_id))).first()
        if row is None:
            return None
        return SessionRecord(
            id=row.id,
            serial=row.serial,
            user_id=row.user_id,
            agent_id=row.agent_id,
            scopes=tuple(row.scopes),
            audiences=tuple(row.audiences),
            task=row.task,
            jkt=row.jkt,
            created_at=row.created_at,
            expires_at=row.expires_at,
            parent_id=row.parent_id or "",
        )


def _allocate_serial(connection: Connection) -> JobResult[int]:
    counters = tables.counters
    statement = (
        update(counters)
        .where(counters.c.name == SESSION_SERIAL)
        .values(value=counters.c.value + 1)
        .returning(counters.c.value)
    )
    return JobResult(int(connection.execute(statement).scalar_one()))


class RevocationRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def live(self, now: int) -> list[Revocation]:
        """Revocations whose token has not expired yet, in sequence order (the bitmap at start)."""
        r = tables.revocations
        statement = select(r).where(r.c.expires_at > now).order_by(r.c.sequence)
        async with self._engine.connect() as connection:
            rows = (await connection.execute(statement)).all()
        return [
            Revocation(
                sequence=row.sequence,
                session_id=row.session_id,
                serial=row.serial,
                user_id=row.user_id,
                reason=row.reason,
                revoked_at=row.revoked_at,
                expires_at=row.expires_at,
            )
            for row in rows
        ]

    async def last_sequence(self) -> int:
        r = tables.revocations
        async with self._engine.connect() as connection:
            value = (
                await connection.execute(
                    select(r.c.sequence).order_by(r.c.sequence.desc()).limit(1)
                )
            ).scalar()
        return int(value or 0)


class KeyRepository:
    """Signing keys; private halves arrive and leave sealed (encrypted) only."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def all(self) -> list[tuple[str, str, bytes, int, int | None]]:
        k = tables.signing_keys
        async with self._engine.connect() as connection:
            rows = (await connection.execute(select(k).order_by(k.c.created_at))).all()
        return [(r.kid, r.alg, r.sealed_private_key, r.created_at, r.retired_at) for r in rows]

    async def add(self, kid: str, alg: str, sealed: bytes, created_at: int) -> None:
        async with self._engine.begin() as connection:
            await connection.execute(
                tables.signing_keys.insert().values(
                    kid=kid, alg=alg, sealed_private_key=sealed, created_at=created_at
                )
            )

"""Repositories: the small storage ports the domain and the composition root use."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

from sqlalchemy import Connection, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.model import AuditEvent, SessionRecord
from agentid_server.domain.ports import RevokedSlice
from agentid_server.domain.revocation import Revocation
from agentid_server.domain.stepup import StepUp
from agentid_server.storage import revoke_job, tables
from agentid_server.storage.counters import REVOCATION_SEQUENCE, SESSION_SERIAL, bump_counter
from agentid_server.storage.database import read_all
from agentid_server.storage.journal import JobResult, Journal
from agentid_server.storage.notify import notify_step_ups
from agentid_server.storage.rows import session_record as _session
from agentid_server.tokens.keys import SigningKey

SERIAL_BLOCK = 64  # session serials a process reserves at once
# The PostgreSQL advisory lock under which replicas publish signing keys, one at a time.
_KEYS_LOCK = int.from_bytes(
    hashlib.sha256(b"agentid.signing-keys").digest()[:8], "big", signed=True
)


class SessionRepository:
    """Session serials, allocated through the journal (sessions themselves are written with
    their Delegate's audit record; Revoke reads them in its own transaction).

    A process reserves serials a block at a time (one committed counter update per block, like a
    database sequence's cache), so a Delegate usually commits once, not twice, and replicas on
    one PostgreSQL take the counter's row lock once per block instead of once per session."""

    def __init__(self, journal: Journal, block: int = SERIAL_BLOCK) -> None:
        self._journal = journal
        self._block = block
        self._next = self._end = 0  # this process's reserved serials: [next, end)
        self._reserving = asyncio.Lock()

    async def allocate_serial(self) -> int:
        """The next session serial: never reused, increasing within this process. The serials
        of a refused Delegate and what is left of a block at exit are gaps."""
        if self._next >= self._end:
            async with self._reserving:  # one reservation for every caller that ran out
                if self._next >= self._end:
                    last = await self._journal.run(self._reserve)
                    self._next, self._end = last - self._block + 1, last + 1
        serial = self._next
        self._next += 1
        return serial

    def _reserve(self, connection: Connection) -> JobResult[int]:
        return JobResult(bump_counter(connection, SESSION_SERIAL, self._block))


class RevocationRepository:
    """Revocation rows: written by journal jobs, read for the bitmap at start and for history."""

    def __init__(
        self,
        engine: AsyncEngine,
        journal: Journal | None,
        on_step_up_change: Callable[[list[StepUp]], None] | None = None,
    ) -> None:
        """Without a journal the repository only reads (at start, before the journal runs)."""
        self._engine = engine
        self._journal = journal
        self._on_step_up_change = on_step_up_change

    def _writer(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("this repository was built for reading only")
        return self._journal

    async def revoke(
        self,
        *,
        root_session_id: str | None,
        user_id: str | None,
        reason: str,
        now: float,
        agent_id: str | None = None,
        audit: Callable[[SessionRecord, Revocation], AuditEvent],
        on_commit: Callable[[list[Revocation]], None],
        authorize: Callable[[SessionRecord | None, Callable[[], list[str]]], None] | None = None,
        known: Callable[[int, int], bool] | None = None,
        limit: int = 250,
        after_serial: int = 0,
    ) -> RevokedSlice:
        """See the RevocationStore port: live sessions not revoked yet, and revoked ones whose
        revocation was lost (re-applied with a new sequence; their first revoked_at is kept),
        among the next ``limit`` live sessions by serial after ``after_serial``."""

        def lost(row: Any) -> bool:
            if row.recorded is None:
                return True  # its history row is gone while its token is live
            return known is not None and not known(row.serial, row.recorded)

        def job(connection: Connection) -> JobResult[RevokedSlice]:
            examined = revoke_job.targets(
                connection, root_session_id=root_session_id, user_id=user_id, agent_id=agent_id,
                now=now, limit=limit, after_serial=after_serial,
            )  # fmt: skip
            if authorize is not None and root_session_id is not None:  # before any write
                root = revoke_job.root_session(connection, root_session_id, examined)
                authorize(
                    _session(root) if root is not None else None,
                    revoke_job.lineage(connection, root_session_id),
                )
            # Where the next slice starts; None once this one was the last.
            following = examined[-1].serial if len(examined) >= limit else None
            rows = [row for row in examined if row.revoked_at is None or lost(row)]
            if not rows:
                return JobResult(RevokedSlice([], following))
            sessions = [_session(row) for row in rows]
            fresh = [row.id for row in rows if row.revoked_at is None]  # lost ones keep theirs
            # Revoking a session expires its pending and approved step-ups.
            revocations, expired = revoke_job.revoke_sessions(
                connection, sessions, fresh, reason=reason, now=now
            )
            notify_step_ups(connection, [x.id for x in expired])
            events = [audit(x, r) for x, r in zip(sessions, revocations, strict=True)]

            def after_commit(_ids: list[int]) -> None:
                on_commit(revocations)
                if expired and self._on_step_up_change is not None:
                    self._on_step_up_change(expired)

            return JobResult(RevokedSlice(revocations, following), events, after_commit)

        return await self._writer().run(job, lineage=True)

    async def revoked_serials(self, after: int, until: int | None = None) -> list[int]:
        """Serials of the revoked sessions whose token expires in (after, until], or after
        ``after``. Read from the sessions, which keep every revocation (its history rows may be
        pruned): the revocation set at start, and what a clock gone back makes live again."""
        s = tables.sessions
        statement = select(s.c.serial).where(s.c.revoked_at.is_not(None), s.c.expires_at > after)
        if until is not None:
            statement = statement.where(s.c.expires_at <= until)
        return [int(row[0]) for row in await read_all(self._engine, statement)]

    async def events_after(self, sequence: int, limit: int) -> list[Revocation]:
        r = tables.revocations
        statement = select(r).where(r.c.sequence > sequence).order_by(r.c.sequence).limit(limit)
        return [_revocation(row) for row in await read_all(self._engine, statement)]

    async def oldest_sequence(self) -> int | None:
        rows = await read_all(self._engine, select(func.min(tables.revocations.c.sequence)))
        value = rows[0][0] if rows else None
        return None if value is None else int(value)

    async def last_sequence(self) -> int:
        c = tables.counters
        statement = select(c.c.value).where(c.c.name == REVOCATION_SEQUENCE)
        rows = await read_all(self._engine, statement)
        return int(rows[0][0])

    async def prune_history(self, expired_before: int) -> int:
        """Deletes revocation rows of tokens that expired before the given time."""

        def job(connection: Connection) -> JobResult[int]:
            r = tables.revocations
            result = connection.execute(delete(r).where(r.c.expires_at < expired_before))
            return JobResult(int(result.rowcount or 0))

        return await self._writer().run(job)


def _revocation(row: Any) -> Revocation:
    return Revocation(
        sequence=row.sequence,
        session_id=row.session_id,
        serial=row.serial,
        user_id=row.user_id,
        reason=row.reason,
        revoked_at=row.revoked_at,
        expires_at=row.expires_at,
    )


class KeyRepository:
    """Signing keys; private halves arrive and leave sealed (encrypted) only. Replicas on one
    PostgreSQL publish keys one at a time (a transaction advisory lock): a key is added only
    when the newest one is still the one the caller saw, so a rotation happens once for all."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def all(self) -> list[KeyRow]:
        k = tables.signing_keys
        rows = await read_all(self._engine, select(k).order_by(k.c.created_at))
        return [
            KeyRow(r.kid, r.alg, r.sealed_private_key, r.created_at, r.retired_at, r.withdrawn_at)
            for r in rows
        ]

    @staticmethod
    def withdrawal_job(
        kid: str, signing_here: str, replacement: SigningKey, sealed: bytes, event: AuditEvent
    ) -> Callable[[Connection], JobResult[Withdrawal | None]]:
        """Withdraws ``kid`` (RetireSigningKey), with the KEY_RETIRED record, at once; when it
        was the key signing (in the store, or ``signing_here`` on this replica),
        ``replacement`` (of the configured algorithm, created now) is stored to sign from now.
        None: no such key."""
        now = int(event.time)

        def job(connection: Connection) -> JobResult[Withdrawal | None]:
            _lock_keys(connection)
            k = tables.signing_keys
            row = connection.execute(select(k.c.withdrawn_at).where(k.c.kid == kid)).first()
            if row is None:
                return JobResult(None)
            if row.withdrawn_at is not None:
                return JobResult(Withdrawal(withdrawn=False, replaced=False))
            replaced = kid in (signing_here, _signing_in_store(connection, replacement.alg, now))
            if replaced:
                connection.execute(
                    k.insert().values(
                        kid=replacement.kid,
                        alg=replacement.alg,
                        sealed_private_key=sealed,
                        created_at=replacement.created_at,
                    )
                )
            connection.execute(update(k).where(k.c.kid == kid).values(withdrawn_at=now))
            return JobResult(Withdrawal(withdrawn=True, replaced=replaced), [event])

        return job

    @staticmethod
    def rotation_job(
        new: SigningKey, sealed: bytes, retire: SigningKey, event: AuditEvent
    ) -> Callable[[Connection], JobResult[bool]]:
        """Publishes ``new`` (signing from its created_at) and retires ``retire`` then, with
        the KEY_ROTATED record, at once; unless another replica published a newer key since
        ``retire`` was the newest (then nothing: False)."""

        def job(connection: Connection) -> JobResult[bool]:
            if _newest_key(connection, new.alg) != retire.created_at:
                return JobResult(False)
            k = tables.signing_keys
            connection.execute(
                k.insert().values(
                    kid=new.kid, alg=new.alg, sealed_private_key=sealed, created_at=new.created_at
                )
            )
            connection.execute(
                update(k).where(k.c.kid == retire.kid).values(retired_at=new.created_at)
            )
            return JobResult(True, [event])

        return job

    async def add_first(self, key: SigningKey, sealed: bytes) -> bool:
        """Stores the first key of its algorithm, unless a replica starting at the same time
        stored one first (then False)."""
        async with self._engine.begin() as connection:
            stored = await connection.run_sync(lambda c: _newest_key(c, key.alg, live_only=True))
            if stored is not None:
                return False
            await connection.execute(
                tables.signing_keys.insert().values(
                    kid=key.kid, alg=key.alg, sealed_private_key=sealed, created_at=key.created_at
                )
            )
        return True


class Withdrawal(NamedTuple):
    withdrawn: bool  # False: withdrawn before
    replaced: bool  # the replacement was stored (the key was signing)


class KeyRow(NamedTuple):
    kid: str
    alg: str
    sealed: bytes
    created_at: int
    retired_at: int | None
    withdrawn_at: int | None


def _lock_keys(connection: Connection) -> None:
    """The key lock on PostgreSQL, held to the end of the transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _KEYS_LOCK})


def _signing_in_store(connection: Connection, alg: str, now: int) -> str | None:
    """The kid of the key of ``alg`` signing at ``now`` as KeyRing chooses it: the newest one
    due, else (a clock gone back) the oldest; withdrawn keys left out."""
    k = tables.signing_keys
    live = select(k.c.kid).where(k.c.alg == alg, k.c.withdrawn_at.is_(None))
    due = connection.execute(
        live.where(k.c.created_at <= now).order_by(k.c.created_at.desc()).limit(1)
    ).scalar()
    if due is not None:
        return str(due)
    first = connection.execute(live.order_by(k.c.created_at).limit(1)).scalar()
    return None if first is None else str(first)


def _newest_key(connection: Connection, alg: str, *, live_only: bool = False) -> int | None:
    """The created_at of the newest key of ``alg`` not withdrawn (nor retired, with
    ``live_only``), read after taking the key lock on PostgreSQL."""
    _lock_keys(connection)
    k = tables.signing_keys
    query = select(func.max(k.c.created_at)).where(k.c.alg == alg, k.c.withdrawn_at.is_(None))
    if live_only:
        query = query.where(k.c.retired_at.is_(None))
    newest = connection.execute(query).scalar()
    return None if newest is None else int(newest)

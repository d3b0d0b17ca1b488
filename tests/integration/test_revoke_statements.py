"""The statements one Revoke of a session sends to the database, on a journal of its own (nothing
else writes, so the batch is the Revoke alone and the count is exact): what the work needs, in
one transaction (docs/benchmarks.md, session 11); and a batch of Check records' round trips on
PostgreSQL (session 14)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agentid_server.domain.model import ActorKind, AuditEvent, EventType, SessionRecord
from agentid_server.domain.revocation import Revocation
from agentid_server.storage.database import Engines, create_engines, migrate
from agentid_server.storage.journal import Journal
from agentid_server.storage.repositories import RevocationRepository
from sqlalchemy import event

from tests.integration.test_postgres import wipe

POSTGRES_URL = os.environ.get("AGENTID_TEST_POSTGRES_URL", "")
# The tables a Revoke itself reads and writes (the audit record's statements name none of them).
REVOKE_TABLES = re.compile(r"\b(sessions|revocations|step_ups|counters)\b")


def new_session(number: int) -> SessionRecord:
    now = int(time.time())
    return SessionRecord(
        id=f"ses_{number:026d}", serial=number, user_id="alice", agent_id="bot", scopes=("a",),
        audiences=(), task="", jkt="", created_at=now, expires_at=now + 600, parent_id="",
    )  # fmt: skip


def delegated(session: SessionRecord) -> AuditEvent:
    return AuditEvent(
        time=time.time(), event_type=EventType.DELEGATE, actor_kind=ActorKind.USER,
        actor_id=session.user_id, session_id=session.id, user_id=session.user_id,
    )  # fmt: skip


def audited(session: SessionRecord, revocation: Revocation) -> AuditEvent:
    return AuditEvent(
        time=revocation.revoked_at, event_type=EventType.REVOKE, actor_kind=ActorKind.SERVICE,
        actor_id="admin", session_id=session.id, user_id=session.user_id,
    )  # fmt: skip


async def revoke(repository: RevocationRepository, session: SessionRecord) -> list[Revocation]:
    written = await repository.revoke(
        root_session_id=session.id, user_id=None, reason="done", now=time.time(),
        audit=audited, on_commit=lambda _revocations: None,
    )  # fmt: skip
    return written.revocations


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Engines]:
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await migrate(engines.main)
    yield engines
    await engines.dispose()


def first_words(statements: list[str]) -> list[str]:
    return [statement.split(None, 1)[0].upper() for statement in statements]


async def test_a_revoke_on_sqlite_is_eight_statements_in_one_transaction(sqlite: Engines) -> None:
    """BEGIN, the read, one write per table (counter, revocations, sessions, step_ups, the audit
    record), COMMIT: no savepoint, and no commit before the audit record."""
    statements: list[str] = []
    assert sqlite.sqlite_writer is not None

    @event.listens_for(sqlite.sqlite_writer, "connect")
    def _traced(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    journal = Journal(sqlite.main, sqlite.sqlite_writer, max_batch=100, sqlite_inline=True)
    journal.start()
    try:
        repository = RevocationRepository(sqlite.main, journal)
        sessions = [new_session(n) for n in (1, 2)]
        for session in sessions:
            await journal.append(delegated(session), new_session=session)
        await revoke(repository, sessions[0])  # the first batch also reads the chain's head
        statements.clear()
        assert [r.session_id for r in await revoke(repository, sessions[1])] == [sessions[1].id]
        seen = list(statements)
    finally:
        await journal.stop()
    assert first_words(seen) == [
        "BEGIN", "WITH", "UPDATE", "INSERT", "UPDATE", "UPDATE", "INSERT", "COMMIT",
    ]  # fmt: skip
    assert "audit_records" in seen[6]


@pytest.mark.skipif(
    not POSTGRES_URL, reason="set AGENTID_TEST_POSTGRES_URL to a database tests may wipe"
)
async def test_a_revoke_on_postgres_reads_once_and_writes_in_one_statement() -> None:
    """The lineage lock, the subtree read and one statement for every write of the Revoke (the
    audit record's own statements aside), with no savepoint."""
    await wipe(POSTGRES_URL)
    engines = create_engines(POSTGRES_URL)
    await migrate(engines.main)
    statements: list[str] = []

    @event.listens_for(engines.main.sync_engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(" ".join(statement.split()))

    journal = Journal(engines.main, None, max_batch=100)
    journal.start()
    try:
        repository = RevocationRepository(engines.main, journal)
        sessions = [new_session(n) for n in (1, 2)]
        for session in sessions:
            await journal.append(delegated(session), new_session=session)
        await revoke(repository, sessions[0])
        statements.clear()
        assert [r.session_id for r in await revoke(repository, sessions[1])] == [sessions[1].id]
        seen = list(statements)
    finally:
        await journal.stop()
        await engines.dispose()
    revoking = [s for s in seen if REVOKE_TABLES.search(s)]
    assert first_words(revoking) == ["WITH", "WITH"]
    assert "pg_notify('agentid_revocations'" in revoking[1]
    assert not [s for s in seen if s.upper().startswith(("SAVEPOINT", "RELEASE"))]
    assert "pg_advisory_xact_lock(" in seen[0]  # the lineage lock, first


@pytest.mark.skipif(
    not POSTGRES_URL, reason="set AGENTID_TEST_POSTGRES_URL to a database tests may wipe"
)
async def test_a_check_batch_on_postgres_is_two_round_trips_before_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of Check records, once the chain's head is known: the window's lock with the ids,
    then the records committed by their INSERT; the caller is answered; then the lock is let go
    with the NOTIFY. Counted at the driver (docs/benchmarks.md, session 14)."""
    import asyncpg  # type: ignore[import-untyped]

    await wipe(POSTGRES_URL)
    engines = create_engines(POSTGRES_URL)
    await migrate(engines.main)
    events: list[tuple[str, str]] = []

    def traced(method: Any) -> Any:
        async def call(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            result = await method(self, query, *args, **kwargs)
            events.append(("done", " ".join(query.split())))
            return result

        return call

    journal = Journal(engines.main, None, max_batch=100)
    journal.start()
    try:
        session = new_session(1)
        await journal.append(delegated(session), new_session=session)  # reads the chain's head
        for name in ("execute", "fetch", "fetchval", "fetchrow", "executemany"):
            monkeypatch.setattr(asyncpg.Connection, name, traced(getattr(asyncpg.Connection, name)))
        check = AuditEvent(
            time=time.time(), event_type=EventType.CHECK, actor_kind=ActorKind.SERVICE,
            actor_id="svc", session_id=session.id, user_id=session.user_id,
        )  # fmt: skip
        await asyncio.gather(*(journal.append(check) for _ in range(3)))  # one batch
        events.append(("answered", ""))
        for _ in range(100):  # the window is let go after the answer
            if len(events) >= 4:
                break
            await asyncio.sleep(0.01)
    finally:
        await journal.stop()
        await engines.dispose()
    statements = [statement for kind, statement in events if kind == "done"]
    assert [kind for kind, _ in events] == ["done", "done", "answered", "done"], events
    assert statements[0].startswith("SELECT agentid_take_audit_ids(")
    assert statements[1].startswith("INSERT INTO audit_records")
    assert "pg_advisory_unlock_shared(" in statements[2]
    assert "pg_notify('agentid_audit'" in statements[2]

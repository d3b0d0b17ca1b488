"""The two audit questions are answered from their indexes, not by scanning the trail: SQLite's
query plan for each statement the repository sends (the schema from the Alembic migrations)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from agentid_server.domain.audit import AuditQuery
from agentid_server.domain.model import ActorKind
from agentid_server.storage.audit import AuditRepository
from agentid_server.storage.database import create_engines, migrate
from sqlalchemy.dialects import sqlite as sqlite_dialect

SESSION = "ses_01JDQ7Z3X4V5W6Y7Z8A9B0C1D2"


@pytest.fixture
async def database(tmp_path: Path) -> Path:
    path = tmp_path / "plans.db"
    engines = create_engines(f"sqlite+aiosqlite:///{path}")
    await migrate(engines.main)
    await engines.dispose()
    return path


def plan(path: Path, query: AuditQuery) -> str:
    statement = AuditRepository.statement(query, None)
    compiled = statement.compile(
        dialect=sqlite_dialect.dialect(), compile_kwargs={"render_postcompile": True}
    )
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    with sqlite3.connect(path) as db:
        rows = db.execute(f"EXPLAIN QUERY PLAN {compiled}", params).fetchall()
    return "\n".join(str(row[-1]) for row in rows)


def test_what_did_this_session_do_uses_the_session_and_delegation_indexes(database: Path) -> None:
    found = plan(database, AuditQuery(session_ids=(SESSION,)))
    assert "ix_audit_session" in found
    assert "ix_audit_parent" in found  # the partial index of DELEGATE records
    assert "SCAN audit_records" not in found


def test_what_did_this_user_authorise_uses_the_user_index(database: Path) -> None:
    found = plan(database, AuditQuery(user_id="alice", actor_kind=ActorKind.USER))
    assert "ix_audit_user_actor" in found
    assert "SCAN audit_records" not in found

"""The schema the Alembic migrations build is the one the code declares, and a Revoke's slices
are range reads: SQLite's query plans for the statements the repository sends."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from agentid_server.domain.sessions import Cursor, SessionQuery
from agentid_server.storage import tables
from agentid_server.storage.database import create_engines, migrate
from agentid_server.storage.revoke_job import READS
from agentid_server.storage.session_listing import listing_statement
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.dialects import sqlite as sqlite_dialect


@pytest.fixture
async def database(tmp_path: Path) -> Path:
    path = tmp_path / "schema.db"
    engines = create_engines(f"sqlite+aiosqlite:///{path}")
    await migrate(engines.main)
    await engines.dispose()
    return path


def plan(path: Path, statement: Any, params: dict[str, Any]) -> str:
    compiled = statement.compile(dialect=sqlite_dialect.dialect())
    values = [params.get(name, compiled.params[name]) for name in compiled.positiontup or ()]
    with sqlite3.connect(path) as db:
        rows = db.execute(f"EXPLAIN QUERY PLAN {compiled}", values).fetchall()
    return "\n".join(str(row[-1]) for row in rows)


def test_the_migrations_build_the_declared_schema(database: Path) -> None:
    """An index or column declared in tables.py without its migration (or the reverse) would
    exist in tests' and newcomers' databases only one way: none is missing either way."""
    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            differences = compare_metadata(
                # Types aside: 0005 turned the audit's JSON columns into text on PostgreSQL only
                # (SQLite's JSON is text already), so SQLite still names them JSON.
                MigrationContext.configure(connection, opts={"compare_type": False}),
                tables.metadata,
            )
    finally:
        engine.dispose()
    assert differences == []


def test_a_revoke_of_a_user_reads_each_slice_by_serial_without_sorting(database: Path) -> None:
    """Each slice is the next `limit` live sessions of the user by serial: with an index of the
    user's sessions by serial it is a range read; with (user_id, expires_at) only, every slice
    read and sorted all the user's live sessions again (20,000 sessions: 80 slices of all)."""
    params = {"user": "alice", "now": 1_800_000_000, "after": 0, "limit": 250}
    found = plan(database, READS["of_user"], params)
    assert "ix_sessions_user_serial" in found
    assert "TEMP B-TREE" not in found


NOW = 1_800_000_000
AFTER = Cursor(NOW - 60, 1234)
LISTINGS = [
    # (the query, the index it must read by, whether it may sort: only the live sessions)
    (SessionQuery(user_id="alice", now=NOW, after=AFTER), "ix_sessions_user ", True),
    (SessionQuery(user_id="alice", include_ended=True), "ix_sessions_user_created", False),
    (
        SessionQuery(user_id="alice", include_ended=True, after=AFTER),
        "ix_sessions_user_created (user_id=? AND created_at<?)",
        False,
    ),
    (SessionQuery(user_id="alice", agent_id="bot", now=NOW), "ix_sessions_user ", True),
    (
        SessionQuery(user_id="alice", agent_id="bot", include_ended=True, after=AFTER),
        "ix_sessions_user_created (user_id=? AND created_at<?)",
        False,
    ),
    (SessionQuery(agent_id="bot", now=NOW, after=AFTER), "ix_sessions_agent_expires", True),
    (
        SessionQuery(agent_id="bot", include_ended=True, after=AFTER),
        "ix_sessions_agent_created (agent_id=? AND created_at<?)",
        False,
    ),
    (SessionQuery(now=NOW, after=AFTER), "ix_sessions_expires (expires_at>?)", True),
    (
        SessionQuery(include_ended=True, after=AFTER),
        "ix_sessions_created (created_at<?)",
        False,
    ),
]


@pytest.mark.parametrize(("query", "index", "sorts"), LISTINGS)
def test_list_sessions_reads_by_its_index(
    database: Path, query: SessionQuery, index: str, sorts: bool
) -> None:
    """Every session ended or not: a range read backwards from the cursor along (…, created_at,
    serial), no sort, so a page costs a page however long the history. Live sessions only: the
    range of sessions not expired yet of that user or agent, sorted; never a walk through ended
    sessions (none is ever pruned) in created_at order."""
    found = plan(database, listing_statement(query), {})
    assert index in found
    assert ("TEMP B-TREE" in found) == sorts
    assert "SCAN sessions" not in found

"""Audit ids that become visible in order, on PostgreSQL with several replicas writing.

Each replica's journal takes its record ids from one sequence before it commits, so without care
record 101 (replica B) can be committed and read while record 100 (replica A) is still on its
way: a reader paging by ``after_id`` would step past 100 for good, and a chain verified then
would seem to miss a link. So:

* a writer holds a *shared* advisory lock from just before it takes ids until its transaction
  ends (writers never wait for each other); the journal's Check batches hold it at session level
  from the ids until after the commit of their records (TAKE_IDS, CLOSE_WINDOW);
* a reader first takes the same lock *exclusively*, which waits until no writer is between
  taking ids and committing, reads the sequence's last value (the horizon: every id up to it is
  committed or will never be), lets go at once, and then reads only ids up to the horizon.

A writer waits only while a reader holds the lock, for one statement. SQLite needs none of
this: its one writer commits batch after batch, in id order.
"""

from __future__ import annotations

import asyncio
import hashlib

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.errors import Unavailable

AUDIT_CHANNEL = "agentid_audit"  # NOTIFY at each commit of audit records (the followers' cue)
_KEY = int.from_bytes(hashlib.sha256(b"agentid.audit-ids").digest()[:8], "big", signed=True)


def open_id_window(connection: Connection) -> None:
    """In a PostgreSQL write transaction, just before it takes audit ids: readers wait for its
    commit before reading past them. Also tells the other replicas, at the commit, that there
    are new records."""
    connection.execute(
        text("SELECT pg_advisory_xact_lock_shared(:key), pg_notify(:channel, '')"),
        {"key": _KEY, "channel": AUDIT_CHANNEL},
    )


# The journal's Check batches (raw asyncpg, two round trips before the answer): the window's
# shared lock at *session* level and the ids, in one statement (migration 0016); then the records
# in one INSERT, committed in its own transaction; then, once the callers have their answer, the
# lock let go and the other replicas told, in one more statement (its NOTIFY is delivered at its
# commit, after the records'). A reader waits for that release as for a transaction's end.
TAKE_IDS = f"SELECT agentid_take_audit_ids({_KEY}, $1)"
CLOSE_WINDOW = f"SELECT pg_advisory_unlock_shared({_KEY}), pg_notify('{AUDIT_CHANNEL}', '')"


async def horizon(engine: AsyncEngine, wait_for_writers: float) -> int | None:
    """The highest audit id below which every record is committed or will never be; None on
    SQLite (everything it shows is in order). Unavailable when a writer holds its ids longer
    than ``wait_for_writers`` seconds (a store that hangs)."""
    if engine.dialect.name != "postgresql":
        return None

    async def read() -> int:
        async with engine.connect() as connection, connection.begin():
            await connection.execute(
                text("SELECT set_config('lock_timeout', :timeout, true)"),
                {"timeout": f"{max(1, int(wait_for_writers * 1000))}ms"},
            )
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _KEY})
            last = await connection.execute(
                text("SELECT last_value, is_called FROM audit_records_id_seq")
            )
            value, called = last.one()
            return int(value) if called else int(value) - 1

    try:
        return await asyncio.shield(read())  # never abandon a connection in mid-transaction
    except DBAPIError as exc:
        raise Unavailable(
            "the audit trail's newest records are still being written; try again",
            reason="AUDIT_UNAVAILABLE",
        ) from exc

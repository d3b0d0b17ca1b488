"""Named counters (the `counters` table): session serials, the revocation sequence, the agent
registry's revision. Each is bumped in a journal job's transaction, so its row lock orders the
writers that take it (replicas on one PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, update

from agentid_server.storage import tables

SESSION_SERIAL = "session_serial"
REVOCATION_SEQUENCE = "revocation_sequence"

_BUMP = (
    update(tables.counters)
    .where(tables.counters.c.name == bindparam("counter"))
    .values(value=tables.counters.c.value + bindparam("by"))
    .returning(tables.counters.c.value)
)  # built once: building it per call cost more than running it


def bump_counter(connection: Connection, name: str, by: int = 1) -> int:
    """Adds ``by`` to a counter in the job's transaction; its new value."""
    return int(connection.execute(_BUMP, {"counter": name, "by": by}).scalar_one())

"""Sessions and their lineage: the recursive questions over parent_id, and the rule that keeps a
sub-agent from outliving a revoked ancestor when its Delegate races the Revoke.

A Delegate writes its session in the journal's transaction only under a lineage that is live at
that moment (`refusal`), and in batch order, so a Revoke earlier in the batch refuses it and one
later in the batch revokes it too. Across PostgreSQL replicas the two transactions meet on row
locks, always taken oldest session first so they cannot deadlock: the Delegate holds its
lineage FOR SHARE, the Revoke holds its target (or the user's sessions) FOR UPDATE before it
asks for the subtree (`lock_targets`). SQLite's one writer needs no locks.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, Connection, Select, bindparam, select

from agentid_server.domain.errors import AgentIdError, PermissionDenied, Unauthenticated
from agentid_server.domain.model import SessionRecord
from agentid_server.storage import tables

SessionId = str | BindParameter[str]  # a value, or a parameter of a statement built once


def session_lineage(session_id: SessionId) -> Select[Any]:
    """The ids of a session and all its ancestors (a recursive CTE, portable SQL)."""
    s = tables.sessions
    up = select(s.c.id, s.c.parent_id).where(s.c.id == session_id).cte("up", recursive=True)
    up = up.union_all(select(s.c.id, s.c.parent_id).where(s.c.id == up.c.parent_id))
    return select(up.c.id)


def session_subtree(root: SessionId) -> Select[Any]:
    """The ids of a session and all its descendants (a recursive CTE, portable SQL)."""
    s = tables.sessions
    tree = select(s.c.id).where(s.c.id == root).cte("tree", recursive=True)
    tree = tree.union_all(select(s.c.id).where(s.c.parent_id == tree.c.id))
    return select(tree.c.id)


def _lineage_rows() -> Select[Any]:
    s = tables.sessions
    lineage = session_lineage(bindparam("id"))
    return (
        select(s.c.id, s.c.revoked_at, s.c.expires_at)
        .where(s.c.id.in_(lineage))
        .order_by(s.c.created_at, s.c.id)
        .with_for_update(read=True)  # FOR SHARE on PostgreSQL; SQLite renders none
    )


_LINEAGE = _lineage_rows()


def refusal(connection: Connection, session: SessionRecord) -> AgentIdError | None:
    """Why ``session`` may not be written now (its parent or an ancestor was revoked, or the
    parent has expired), or None. Run in the writing transaction, just before the insert."""
    if not session.parent_id:
        return None
    rows = connection.execute(_LINEAGE, {"id": session.parent_id}).all()
    if not rows or any(row.revoked_at is not None for row in rows):
        return Unauthenticated("the agent session has been revoked", reason="SESSION_REVOKED")
    parent = next(row for row in rows if row.id == session.parent_id)
    if parent.expires_at <= session.created_at:
        return PermissionDenied("the delegating session has expired", reason="SESSION_EXPIRED")
    return None


_LOCK_SESSION = (
    select(tables.sessions.c.id).where(tables.sessions.c.id == bindparam("root")).with_for_update()
)
_LOCK_USER = (
    select(tables.sessions.c.id)
    .where(tables.sessions.c.user_id == bindparam("user"))
    .order_by(tables.sessions.c.created_at, tables.sessions.c.id)
    .with_for_update()
)


def lock_targets(connection: Connection, *, root: str | None, user: str | None) -> None:
    """PostgreSQL: holds what a Revoke is about to revoke FOR UPDATE, so a Delegate under it in
    another replica's transaction waits for this one and then finds its lineage revoked."""
    if connection.dialect.name != "postgresql":
        return
    if root is not None:
        connection.execute(_LOCK_SESSION, {"root": root})
    else:
        connection.execute(_LOCK_USER, {"user": user})

"""Sessions and their lineage: the recursive questions over parent_id, and the rule that keeps a
sub-agent from outliving a revoked ancestor when its Delegate races the Revoke.

A Delegate writes its session in the journal's transaction only under a lineage that is live at
that moment (`refusal`), and in batch order, so a Revoke earlier in the batch refuses it and one
later in the batch revokes it too. Across PostgreSQL replicas, every write batch that holds a
Revoke or a sub-agent's Delegate first takes one transaction advisory lock (`serialize`), so such
batches commit one after another: a Delegate's batch reads its lineage after any Revoke that got
there first has committed, and a Revoke's reads the subtree after any Delegate that did. One lock,
taken before any other, cannot deadlock (row locks taken in batch order could, two batches taking
them in opposite orders). SQLite's one writer needs none of it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import BindParameter, Connection, Select, bindparam, select, text

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


def agent_subtrees(agent_id: SessionId, now: BindParameter[int]) -> Select[Any]:
    """The ids of an agent's sessions not expired at ``now`` and all their descendants."""
    s = tables.sessions
    tree = (
        select(s.c.id)
        .where(s.c.agent_id == agent_id, s.c.expires_at > now)
        .cte("agent_tree", recursive=True)
    )
    # Down to live descendants only: a session never outlives its parent (Delegate clamps its
    # ttl to the parent's lifetime), so an expired one has none. Without it PostgreSQL walked
    # every sub-agent session ever delegated (docs/benchmarks.md, session 7).
    tree = tree.union(select(s.c.id).where(s.c.parent_id == tree.c.id, s.c.expires_at > now))
    return select(tree.c.id)


def _lineage_rows() -> Select[Any]:
    s = tables.sessions
    lineage = session_lineage(bindparam("id"))
    return select(s.c.id, s.c.revoked_at, s.c.expires_at).where(s.c.id.in_(lineage))


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


# The PostgreSQL advisory lock of write batches that revoke or delegate under a parent.
_LINEAGE_LOCK = int.from_bytes(
    hashlib.sha256(b"agentid.session-lineage").digest()[:8], "big", signed=True
)


def serialize(connection: Connection) -> None:
    """PostgreSQL: makes this transaction wait for every other one that revokes or delegates
    under a parent, and them for it. Taken first in the batch, before any other lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LINEAGE_LOCK})

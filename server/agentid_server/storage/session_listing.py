"""ListSessions' reads: one keyset query, newest first, whose shape each visibility case fills.

Which index serves it (migration 0012; the plans are asserted in test_store_schema.py):
* everything, ended sessions too: (user_id | agent_id | nothing, created_at, serial), read
  backwards from the cursor, so a page reads about a page of rows whatever the history;
* live sessions only: (user_id | agent_id | nothing, expires_at), a range over the sessions not
  expired yet, sorted. Sessions are never pruned and a live page read along created_at would, on
  its last page, walk every ended session of that user or agent; the live ones are few (every
  token expires within max_ttl), so sorting them is the cheaper bound.
* an agent's own subtree: the recursive walk down parent_id, then sorted (a subtree is small).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.sessions import ListedSession, SessionQuery
from agentid_server.storage import tables
from agentid_server.storage.database import read_all
from agentid_server.storage.lineage import session_subtree
from agentid_server.storage.rows import session_record


class SessionListing:
    """Reads the sessions ListSessions shows (SessionListStore)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list_sessions(self, query: SessionQuery) -> list[ListedSession]:
        rows = await read_all(self._engine, listing_statement(query))
        return [_listed(row) for row in rows]


def listing_statement(query: SessionQuery) -> Select[Any]:
    """The statement for ``query`` (also what the query-plan tests explain)."""
    s = tables.sessions
    conditions: list[ColumnElement[bool]] = []
    narrow = bool(query.subtree_of or query.user_id)
    if query.subtree_of:
        conditions.append(s.c.id.in_(session_subtree(query.subtree_of)))
    if query.user_id:
        conditions.append(s.c.user_id == query.user_id)
    if query.agent_id:
        # Within a user's (or a subtree's) sessions the agent is a filter, not an index to read
        # by: an agent kind has every user's sessions. `|| ''` keeps planners off its index.
        agent = s.c.agent_id + literal("") if narrow else s.c.agent_id
        conditions.append(agent == query.agent_id)
    if not query.include_ended:
        conditions += [s.c.expires_at > query.now, s.c.revoked_at.is_(None)]
    created, serial = _order_keys(query)
    if query.after is not None:
        # `created_at <= c` alone bounds an index range; the rest breaks the tie.
        after = query.after
        conditions += [
            created <= after.created_at,
            or_(created < after.created_at, serial < after.serial),
        ]
    return select(s).where(*conditions).order_by(created.desc(), serial.desc()).limit(query.limit)


def _order_keys(query: SessionQuery) -> tuple[ColumnElement[int], ColumnElement[int]]:
    """(created_at, serial), the order and the cursor. For live sessions as computed values
    (`+ 0`): no index on them can serve the order or the cursor, so the planner reads the range
    of sessions not expired yet and sorts it, rather than walk every ended session of the user
    or agent in created_at order to find the live ones."""
    s = tables.sessions
    if query.include_ended:
        return s.c.created_at, s.c.serial
    return s.c.created_at + 0, s.c.serial + 0


def _listed(row: Any) -> ListedSession:
    return ListedSession(session_record(row), row.revoked_at, row.revoke_reason or "")

"""The revoke job's statements, built once with bind parameters (building them per call was most
of a Revoke's CPU), and as few as the work needs (docs/benchmarks.md, session 11):

* one read of the slice's sessions (the root's subtree, a user's or an agent's sessions), which
  also serves the authorization of a session's Revoke when the root is among them;
* the writes: the sequence counter, a revocation row per session, the sessions' `revoked_at`,
  their live step-ups expired and the other replicas told. On SQLite four statements, each a
  call into the library in this process; on PostgreSQL, where each is a round trip, one
  statement whose data-modifying CTEs do them all (they see one snapshot and touch different
  rows), the NOTIFY with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Connection,
    bindparam,
    column,
    func,
    select,
    text,
    update,
)

from agentid_server.domain.model import SessionRecord
from agentid_server.domain.revocation import Revocation
from agentid_server.domain.stepup import StepUp, StepUpState
from agentid_server.storage import tables
from agentid_server.storage.counters import REVOCATION_SEQUENCE, bump_counter
from agentid_server.storage.lineage import agent_subtrees, session_lineage, session_subtree
from agentid_server.storage.notify import REVOCATIONS_CHANNEL
from agentid_server.storage.stepups import expire_for_sessions, step_up_record


def _reads() -> dict[str, Any]:
    s, r = tables.sessions, tables.revocations
    root: BindParameter[str] = bindparam("root")
    # Live sessions from a serial on (a Revoke pages through them in slices, by serial), the
    # revoked ones too: their revocation may have been lost (see RevocationRepository.revoke).
    live = (s.c.expires_at > bindparam("now"), s.c.serial > bindparam("after"))
    # The sequence of the session's last revocation row; None when none is (never, or pruned).
    recorded = (
        select(func.max(r.c.sequence))
        .where(r.c.session_id == s.c.id)
        .scalar_subquery()
        .label("recorded")
    )
    return {
        "session": select(s).where(s.c.id == root),
        "lineage": session_lineage(root),
        "subtree": select(s, recorded)
        .where(s.c.id.in_(session_subtree(root)), *live)
        .order_by(s.c.serial)
        .limit(bindparam("limit")),
        # The live sessions of an agent with their descendants (DisableAgent, Revoke by agent).
        "of_agent": select(s, recorded)
        .where(s.c.id.in_(agent_subtrees(bindparam("agent"), bindparam("now"))), *live)
        .order_by(s.c.serial)
        .limit(bindparam("limit")),
        "of_user": select(s, recorded)
        .where(s.c.user_id == bindparam("user"), *live)
        .order_by(s.c.serial)
        .limit(bindparam("limit")),
    }


READS = _reads()

_INSERT = tables.revocations.insert()
_MARK = (
    update(tables.sessions)
    .where(tables.sessions.c.id.in_(bindparam("ids", expanding=True)))
    .values(revoked_at=bindparam("at"), revoke_reason=bindparam("reason"))
)

# PostgreSQL: the four writes and the NOTIFY in one statement (one round trip). Sequences are
# numbered in the order of the arrays (WITH ORDINALITY), as the Revocation objects are; the live
# step-ups expired are those of stepups.expire_for_sessions; the NOTIFY's payload is the last
# sequence (evaluated once per row of the answer; PostgreSQL folds identical notifications of a
# transaction into one).
_EXPIRED, _PENDING, _APPROVED = (
    int(StepUpState.EXPIRED),
    int(StepUpState.PENDING),
    int(StepUpState.APPROVED),
)
# Named in the table's order, so the answer's columns are the ones .columns() below declares.
_STEP_UP_COLUMNS = ", ".join(c.name for c in tables.step_ups.c)
_PG_WRITE = text(
    f"""
WITH bumped AS (
    UPDATE counters SET value = value + CAST(:count AS bigint)
    WHERE name = '{REVOCATION_SEQUENCE}'
    RETURNING value
), written AS (
    INSERT INTO revocations (sequence, session_id, serial, user_id, reason, revoked_at, expires_at)
    SELECT bumped.value - CAST(:count AS bigint) + t.n, t.session_id, t.serial, t.user_id,
           CAST(:reason AS text), CAST(:at AS bigint), t.expires_at
    FROM bumped, unnest(CAST(:ids AS text[]), CAST(:serials AS bigint[]), CAST(:users AS text[]),
                        CAST(:expiries AS bigint[]))
         WITH ORDINALITY AS t(session_id, serial, user_id, expires_at, n)
), marked AS (
    UPDATE sessions SET revoked_at = CAST(:at AS bigint), revoke_reason = CAST(:reason AS text)
    WHERE id = ANY(CAST(:fresh AS text[]))
), expired AS (
    UPDATE step_ups SET state = {_EXPIRED}
    WHERE session_id = ANY(CAST(:ids AS text[])) AND state IN ({_PENDING}, {_APPROVED})
    RETURNING {_STEP_UP_COLUMNS}
)
SELECT bumped.value AS last_sequence,
       pg_notify('{REVOCATIONS_CHANNEL}', bumped.value::text) AS notified, expired.*
FROM bumped LEFT JOIN expired ON true
"""  # noqa: S608  (constants only; every value is a bind parameter)
).columns(column("last_sequence", BigInteger), column("notified"), *tables.step_ups.c)


def targets(
    connection: Connection,
    *,
    root_session_id: str | None,
    user_id: str | None,
    agent_id: str | None,
    now: float,
    limit: int,
    after_serial: int,
) -> list[Any]:
    """The next ``limit`` live sessions by serial after ``after_serial`` of the slice's target,
    each with ``recorded``, the sequence of its last revocation row."""
    live = {"now": int(now), "limit": limit, "after": after_serial}
    if root_session_id is not None:
        rows = connection.execute(READS["subtree"], {"root": root_session_id, **live})
    elif agent_id is not None:
        rows = connection.execute(READS["of_agent"], {"agent": agent_id, **live})
    else:
        rows = connection.execute(READS["of_user"], {"user": user_id, **live})
    return list(rows)


def root_session(connection: Connection, root_session_id: str, examined: list[Any]) -> Any:
    """The root's row: among the slice's sessions when it is live (most Revokes), else read."""
    for row in examined:
        if row.id == root_session_id:
            return row
    return connection.execute(READS["session"], {"root": root_session_id}).first()


def lineage(connection: Connection, root_session_id: str) -> Callable[[], list[str]]:
    """Reads, when called, the ids of the root and its ancestors."""
    return lambda: [r.id for r in connection.execute(READS["lineage"], {"root": root_session_id})]


def revoke_sessions(
    connection: Connection,
    sessions: list[SessionRecord],
    fresh: list[str],
    *,
    reason: str,
    now: float,
) -> tuple[list[Revocation], list[StepUp]]:
    """Revokes ``sessions`` with the next gap-free sequences, in their order, and sets the
    `revoked_at` of ``fresh`` (those not marked revoked before; the others keep theirs); tells
    the other replicas at the commit (PostgreSQL). The revocations, and the step-ups that
    expired with them."""
    if connection.dialect.name == "postgresql":
        return _write_in_one(connection, sessions, fresh, reason, now)
    last = bump_counter(connection, REVOCATION_SEQUENCE, len(sessions))
    revocations = _numbered(sessions, last, reason, now)
    connection.execute(_INSERT, [_revocation_row(r) for r in revocations])
    if fresh:
        connection.execute(_MARK, {"ids": fresh, "at": int(now), "reason": reason})
    return revocations, expire_for_sessions(connection, [s.id for s in sessions])


def _write_in_one(
    connection: Connection, sessions: list[SessionRecord], fresh: list[str], reason: str, now: float
) -> tuple[list[Revocation], list[StepUp]]:
    parameters = {
        "count": len(sessions), "reason": reason, "at": int(now), "fresh": fresh,
        "ids": [s.id for s in sessions], "serials": [s.serial for s in sessions],
        "users": [s.user_id for s in sessions], "expiries": [s.expires_at for s in sessions],
    }  # fmt: skip
    rows = connection.execute(_PG_WRITE, parameters).all()
    expired = [step_up_record(row) for row in rows if row.id is not None]
    return _numbered(sessions, int(rows[0].last_sequence), reason, now), expired


def _numbered(
    sessions: list[SessionRecord], last: int, reason: str, now: float
) -> list[Revocation]:
    first = last - len(sessions) + 1
    return [
        Revocation(first + n, s.id, s.serial, s.user_id, reason, now, s.expires_at)
        for n, s in enumerate(sessions)
    ]


def _revocation_row(r: Revocation) -> dict[str, object]:
    return {
        "sequence": r.sequence,
        "session_id": r.session_id,
        "serial": r.serial,
        "user_id": r.user_id,
        "reason": r.reason,
        "revoked_at": int(r.revoked_at),
        "expires_at": r.expires_at,
    }

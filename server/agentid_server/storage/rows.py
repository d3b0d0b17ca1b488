"""How audit records and sessions become table rows: the audit columns in the order they are
written and hashed, and the JSON they hold encoded once, exactly as the hash chain covers it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from agentid_server.domain.model import AuditEvent, SessionRecord

AUDIT_COLUMNS = (
    "time_us", "event_type", "session_id", "user_id", "scopes", "agent_id", "actor_kind",
    "actor_id", "action", "resource", "decision", "reason", "parent_session_id", "step_up_id",
    "context", "detail",
)  # fmt: skip
# A record as written: the id, its columns, then its place in the hash chain.
SEALED_COLUMNS = ("id", *AUDIT_COLUMNS, "chain_id", "prev_hash", "hash")
AuditRow = tuple[Any, ...]
AuditRecordRow = tuple[Any, ...]  # (id, *AUDIT_COLUMNS, chain_id, prev_hash, hash)


@lru_cache(maxsize=4096)
def _scopes_json(scopes: tuple[str, ...]) -> str:
    return json.dumps(list(scopes), separators=(",", ":"))


def audit_row(event: AuditEvent) -> AuditRow:
    """The record's column values in AUDIT_COLUMNS order, JSON already encoded."""
    context = event.context
    return (
        int(event.time * 1_000_000),
        int(event.event_type),
        event.session_id,
        event.user_id,
        _scopes_json(tuple(event.scopes)),
        event.agent_id,
        int(event.actor_kind),
        event.actor_id,
        event.action,
        event.resource,
        int(event.decision),
        int(event.reason),
        event.parent_session_id,
        event.step_up_id,
        None
        if context is None  # most records: before the (slower) check for a mapping
        else json.dumps(dict(context), separators=(",", ":"), sort_keys=True)
        if isinstance(context, Mapping)
        else None,
        event.detail,
    )


def session_row(session: SessionRecord) -> dict[str, Any]:
    return {
        "id": session.id,
        "serial": session.serial,
        "user_id": session.user_id,
        "agent_id": session.agent_id,
        "parent_id": session.parent_id or None,
        "scopes": list(session.scopes),
        "audiences": list(session.audiences),
        "task": session.task,
        "jkt": session.jkt,
        "created_at": session.created_at,
        "expires_at": session.expires_at,
    }


def session_record(row: Any) -> SessionRecord:
    """A sessions row as the domain's record."""
    return SessionRecord(
        id=row.id,
        serial=row.serial,
        user_id=row.user_id,
        agent_id=row.agent_id,
        scopes=tuple(row.scopes),
        audiences=tuple(row.audiences),
        task=row.task,
        jkt=row.jkt,
        created_at=row.created_at,
        expires_at=row.expires_at,
        parent_id=row.parent_id or "",
    )

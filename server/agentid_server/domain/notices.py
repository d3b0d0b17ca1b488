"""What a step-up notification says, and when one is due: pure, so the rules and the body's
content can be read (and tested) apart from the HTTP that carries them (``webhooks/``).

A human approves a step-up only if someone tells them it is waiting; the webhook is that
someone. The body names the step-up, the user, the agent, what an approval would allow and a
link to the console. What the agent wrote itself (its binding message, the request's context)
goes under ``agent_supplied``: a receiver shows it as quoted text, never as markup or as
instructions, since an agent may write anything there.
"""

from __future__ import annotations

import datetime
import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agentid_server.domain.stepup import StepUp, StepUpState

CONSOLE_PATH = "/console/step-ups/"


class NoticeEvent(enum.StrEnum):
    """The step-up changes a webhook can be told of (`[[step_up.notify]] events`)."""

    REQUESTED = "requested"  # a new PENDING step-up: a human must look
    RESOLVED = "resolved"  # approved or denied
    EXPIRED = "expired"  # pending or approved, past its time (or its session revoked)


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification, the same for every endpoint that wants its event."""

    message_id: str  # the step-up's id and the event: the receiver's idempotency key
    event: NoticeEvent
    body: bytes  # JSON, as signed and sent


def event_of(step_up: StepUp) -> NoticeEvent | None:
    """The event a committed change of ``step_up`` is. Only a new step-up is committed PENDING
    (asking again for a live binding commits nothing); a consumed approval tells no one."""
    match step_up.state:
        case StepUpState.PENDING:
            return NoticeEvent.REQUESTED
        case StepUpState.APPROVED | StepUpState.DENIED:
            return NoticeEvent.RESOLVED
        case StepUpState.EXPIRED:
            return NoticeEvent.EXPIRED
    return None


def notices(
    changed: Iterable[StepUp], wanted: frozenset[NoticeEvent], base_url: str, now: float
) -> list[Notice]:
    """The notices due for step-up changes this replica committed, of the events wanted."""
    due = []
    for step_up in changed:
        event = event_of(step_up)
        if event is not None and event in wanted:
            due.append(notice(step_up, event, base_url, now))
    return due


def console_url(base_url: str, step_up_id: str) -> str:
    """Where the user sees and resolves the step-up (the console, under the public URL)."""
    return f"{base_url.rstrip('/')}{CONSOLE_PATH}{step_up_id}"


def notice(step_up: StepUp, event: NoticeEvent, base_url: str, now: float) -> Notice:
    """The notice of ``event``; its body follows the Standard Webhooks payload shape (type,
    timestamp, data)."""
    occurred = {
        NoticeEvent.REQUESTED: step_up.created_at,
        NoticeEvent.RESOLVED: step_up.resolved_at if step_up.resolved_at is not None else now,
        NoticeEvent.EXPIRED: now,
    }[event]
    data: dict[str, Any] = {
        "step_up": {
            "id": step_up.id,
            "state": step_up.state.name,
            "created_at": _time(step_up.created_at),
            "expires_at": _time(step_up.expires_at),
            "resolved_at": _time(step_up.resolved_at) if step_up.resolved_at else None,
            "risk_rule": step_up.risk_rule,
            "comment": step_up.comment,  # the user's, when resolved
        },
        "user": {"id": step_up.user_id},
        "agent": {
            "id": step_up.agent_id,
            "session_id": step_up.session_id,
            "parent_session_id": step_up.parent_session_id or None,
        },
        "allows": {
            # Checked against the session's scopes: concrete names, not free text.
            "action": step_up.action,
            "resource": step_up.resource,
            "context_sha256": step_up.context_digest,  # the approval binds this context only
        },
        "agent_supplied": {
            "binding_message": step_up.binding_message,
            "context": dict(step_up.context) if step_up.context is not None else None,
        },
        "console_url": console_url(base_url, step_up.id),
    }
    payload = {"type": f"step_up.{event.value}", "timestamp": _time(occurred), "data": data}
    return Notice(f"{step_up.id}_{event.value}", event, encode(payload))


def encode(payload: dict[str, Any]) -> bytes:
    """Compact ASCII JSON in which ``<``, ``>`` and ``&`` are escaped too: agent-written text
    stays one JSON string even for a receiver that pastes the body into HTML. (Those characters
    occur only inside strings in JSON, so the replacement keeps the JSON the same.)"""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.encode("ascii")


def _time(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

"""The nouns of agentid: principals, sessions, verified agent claims, decisions, audit events.

Enum values equal the wire enums of agentid.v1 so the api layer maps them by number.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agentid_server.domain.scopes import ScopeSet


class Decision(enum.IntEnum):
    UNSPECIFIED = 0
    ALLOW = 1
    DENY = 2
    STEP_UP_REQUIRED = 3


class Reason(enum.IntEnum):
    UNSPECIFIED = 0
    GRANTED = 1
    STEP_UP_APPROVED = 2
    TOKEN_MALFORMED = 3
    SIGNATURE_INVALID = 4
    TOKEN_EXPIRED = 5
    TOKEN_NOT_YET_VALID = 6
    AUDIENCE_MISMATCH = 7
    SESSION_REVOKED = 8
    SCOPE_NOT_GRANTED = 9
    HIGH_RISK = 10
    STEP_UP_DENIED = 11
    PROOF_OF_POSSESSION_FAILED = 12

    @property
    def full(self) -> str:
        """The agentid.v1.Reason value's name, e.g. REASON_GRANTED."""
        return f"REASON_{self.name}"


class EventType(enum.IntEnum):
    UNSPECIFIED = 0
    DELEGATE = 1
    CHECK = 2
    STEP_UP_REQUESTED = 3
    STEP_UP_RESOLVED = 4
    REVOKE = 5
    KEY_ROTATED = 6
    AGENT_CREATED = 7
    AGENT_UPDATED = 8
    AGENT_DISABLED = 9
    AGENT_ENABLED = 10
    KEY_RETIRED = 11


class ActorKind(enum.IntEnum):
    UNSPECIFIED = 0
    USER = 1
    AGENT = 2
    SERVICE = 3


class Role(enum.StrEnum):
    CHECK = "check"
    WATCH = "watch"
    AUDIT = "audit"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class AgentClaims:
    """What a verified agent token says. Times are whole seconds since the epoch."""

    session_id: str
    user_id: str
    agent_id: str
    serial: int
    issued_at: int
    not_before: int
    expires_at: int
    scopes: ScopeSet
    audiences: frozenset[str] | None
    act: Mapping[str, Any]
    parent_session_id: str = ""
    task: str = ""
    jkt: str = ""


@dataclass(frozen=True, slots=True)
class UserPrincipal:
    """A human, authenticated by a trusted IdP token."""

    user_id: str
    issuer: str
    grantable: ScopeSet
    auth_time: int | None = None
    acr: str | None = None
    valid_until: float | None = None  # the token's exp + the IdP's leeway: streams end then
    clock_leeway: float = 0.0  # its IdP's (`[[idp]] leeway`): how far ahead auth_time may be


@dataclass(frozen=True, slots=True)
class ProofUse:
    """A verified DPoP proof, used once: its key's thumbprint, its `jti`, until when it must
    stay spent (after that its `iat` is too old for it to verify again), and the user whose
    session's token it accompanied (whose share of the replay cache it takes)."""

    jkt: str
    jti: str
    until: float
    owner: str = ""


@dataclass(frozen=True, slots=True)
class AgentPrincipal:
    """An agent session, authenticated by its own (unrevoked, unexpired) agent token; ``proof``
    is the call's verified DPoP proof (a key-bound token), spent once the call is authorised."""

    claims: AgentClaims
    proof: ProofUse | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ServicePrincipal:
    """A calling service, authenticated by its API key."""

    name: str
    roles: frozenset[Role]
    audience: str

    def has_role(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles


Principal = UserPrincipal | AgentPrincipal | ServicePrincipal


def actor_of(principal: Principal) -> tuple[ActorKind, str]:
    """Who an audit record names as its actor: the user, the agent session, or the service."""
    if isinstance(principal, UserPrincipal):
        return ActorKind.USER, principal.user_id
    if isinstance(principal, AgentPrincipal):
        return ActorKind.AGENT, principal.claims.session_id
    return ActorKind.SERVICE, principal.name


@dataclass(frozen=True, slots=True)
class AgentKind:
    """A registered agent kind: the most it may ever be granted, and whether it may be
    delegated to at all (a disabled agent may not)."""

    id: str
    max_scopes: ScopeSet
    max_ttl: int
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A delegated agent session as stored."""

    id: str
    serial: int
    user_id: str
    agent_id: str
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    task: str
    jkt: str
    created_at: int
    expires_at: int
    parent_id: str = ""


class AuditEvent(NamedTuple):
    """One audit record before it is written (the store assigns id and chain hashes).

    Immutable like the other nouns, but a NamedTuple: every Check builds one, and a frozen
    dataclass of sixteen fields (one ``object.__setattr__`` per field) costs about three times
    as much to build (docs/benchmarks.md, session 10)."""

    time: float
    event_type: EventType
    actor_kind: ActorKind
    actor_id: str
    session_id: str = ""
    user_id: str = ""
    scopes: tuple[str, ...] = ()
    agent_id: str = ""
    action: str = ""
    resource: str = ""
    decision: Decision = Decision.UNSPECIFIED
    reason: Reason = Reason.UNSPECIFIED
    parent_session_id: str = ""
    step_up_id: str = ""
    context: Mapping[str, Any] | None = None
    detail: str = ""


# Bidirectional formatting characters: they make text read in another order than it is written
# (CVE-2021-42574, "Trojan Source"), which a person approving a step-up must not be shown.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unreadable(text: str) -> str | None:
    """Why free text a person will read back (a task, a reason, a comment, a binding message)
    is refused, or None: control characters other than tab and newline (NUL among them, which
    PostgreSQL's text refuses, and the terminal's escape sequences), and bidirectional
    formatting characters."""
    for ch in text:
        if ch in "\t\n":
            continue
        if unicodedata.category(ch) == "Cc":
            return f"control character U+{ord(ch):04X} (only tab and newline are allowed)"
        if ch in BIDI_CONTROLS:
            return f"bidirectional formatting character U+{ord(ch):04X}"
    return None

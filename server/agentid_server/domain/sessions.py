"""ListSessions: who may see which sessions, their state now, and pages that cannot be forged.

Visibility (api.md "Who calls what"): a user sees the sessions they delegated (sub-agents
included, which carry the same user); an agent sees its own session and its descendants; a
service with role audit or admin sees every session. A user naming another user is refused, never
answered with a silently filtered list (as Audit does). A user who owns an agent (domain/agents.py)
sees every user's sessions of it when they name it.

Pages are keyset pages, newest first by (created_at, serial): a session delegated between two
pages sorts before the cursor, so paging neither repeats nor skips a session that was there. The
page token carries the cursor and an HMAC over it and the query (caller, filters): a token edited,
or taken to another query or caller, is refused.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from agentid_server.domain.errors import InvalidArgument, PermissionDenied
from agentid_server.domain.model import (
    AgentPrincipal,
    Principal,
    Role,
    ServicePrincipal,
    SessionRecord,
    UserPrincipal,
)
from agentid_server.domain.ports import Clock
from agentid_server.domain.revoking import MAX_USER_ID_LENGTH

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # larger sizes are taken as this (AIP-158), not refused
MAX_AGENT_ID_LENGTH = 128
PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"  # noqa: S105 (an error reason, not a secret)
_TOKEN_VERSION = 1
_CURSOR = struct.Struct(">BqQ")  # version, created_at, serial
_MAC_BYTES = 16
MAX_PAGE_TOKEN_LENGTH = 256


class SessionState(enum.IntEnum):
    """Values equal agentid.v1.SessionState."""

    UNSPECIFIED = 0
    ACTIVE = 1
    EXPIRED = 2
    REVOKED = 3


@dataclass(frozen=True, slots=True)
class ListedSession:
    """A stored session with how it ended, if it did."""

    record: SessionRecord
    revoked_at: int | None = None
    revoke_reason: str = ""

    def state(self, now: float) -> SessionState:
        """REVOKED once revoked (whatever its expiry); EXPIRED from its `exp` on, as Check
        judges a token."""
        if self.revoked_at is not None:
            return SessionState.REVOKED
        if now >= self.record.expires_at:
            return SessionState.EXPIRED
        return SessionState.ACTIVE


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last session of a page: the next page holds those sorting after it (older)."""

    created_at: int
    serial: int


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """What the store is asked: the sessions matching every filter set (``subtree_of``: that
    session and its descendants), live at ``now`` unless ``include_ended``, newest first, after
    ``after``, at most ``limit``."""

    user_id: str = ""
    agent_id: str = ""
    subtree_of: str = ""
    include_ended: bool = False
    now: int = 0
    after: Cursor | None = None
    limit: int = DEFAULT_PAGE_SIZE


class SessionListStore(Protocol):
    async def list_sessions(self, query: SessionQuery) -> list[ListedSession]:
        """The sessions ``query`` selects, ordered by (created_at, serial) descending."""
        ...


@dataclass(frozen=True, slots=True)
class ListSessionsInput:
    user_id: str = ""
    agent_id: str = ""
    include_ended: bool = False
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: list[ListedSession]
    next_page_token: str
    now: float  # the time the states were judged at


class PageTokens:
    """Opaque page tokens: the cursor, sealed with an HMAC-SHA256 (truncated to 128 bits) over
    it and the query it belongs to. Not encrypted: the cursor is the time and serial of a
    session the caller was just shown."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("a page token key needs at least 32 bytes")
        self._key = key

    def issue(self, binding: bytes, cursor: Cursor) -> str:
        return self.seal(binding, _CURSOR.pack(_TOKEN_VERSION, cursor.created_at, cursor.serial))

    def open(self, binding: bytes, token: str) -> Cursor:
        """The cursor of a token issued for this ``binding``; INVALID_ARGUMENT otherwise."""
        body = self.unseal(binding, token)
        if len(body) != _CURSOR.size:
            raise _not_ours()
        version, created_at, serial = _CURSOR.unpack(body)
        if version != _TOKEN_VERSION:  # sealed by us, so never: a later format's
            raise InvalidArgument.field("page_token", "an unknown format", PAGE_TOKEN_INVALID)
        return Cursor(created_at, serial)

    def seal(self, binding: bytes, body: bytes) -> str:
        """A token of any cursor ``body`` (ListAgents': the last id shown)."""
        return base64.urlsafe_b64encode(body + self._mac(binding, body)).rstrip(b"=").decode()

    def unseal(self, binding: bytes, token: str) -> bytes:
        """The body of a token sealed for this ``binding``; INVALID_ARGUMENT otherwise."""
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise _not_ours()
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(binding, body)):
            raise _not_ours()
        return body

    def _mac(self, binding: bytes, body: bytes) -> bytes:
        message = len(binding).to_bytes(4, "big") + binding + body
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _not_ours() -> InvalidArgument:
    return InvalidArgument.field(
        "page_token",
        "not a page token of this query (changed, or from another query or caller)",
        reason=PAGE_TOKEN_INVALID,
    )


class SessionLister:
    """Answers ListSessions."""

    def __init__(
        self,
        *,
        store: SessionListStore,
        tokens: PageTokens,
        clock: Clock,
        owns: Callable[[str, str], bool] = lambda _agent_id, _user_id: False,
    ) -> None:
        """``owns(agent_id, user_id)``: is the user one of the agent's owners."""
        self._store = store
        self._tokens = tokens
        self._clock = clock
        self._owns = owns

    async def list(self, caller: Principal, request: ListSessionsInput) -> SessionPage:
        limit = page_size(request.page_size)
        _validate_ids(request.user_id, request.agent_id)
        query = visible_query(
            caller, request.user_id, request.agent_id, request.include_ended, self._owns
        )
        binding = query_binding(caller, query)
        after = self._tokens.open(binding, request.page_token) if request.page_token else None
        now = self._clock.now()
        page = await self._store.list_sessions(
            replace(query, now=int(now), after=after, limit=limit + 1)
        )
        token = ""
        if len(page) > limit:
            page = page[:limit]
            last = page[-1].record
            token = self._tokens.issue(binding, Cursor(last.created_at, last.serial))
        return SessionPage(page, token, now)


def page_size(requested: int) -> int:
    """0 means the default; above the maximum, the maximum (AIP-158); negative is refused."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def visible_query(
    caller: Principal,
    user_id: str,
    agent_id: str,
    include_ended: bool,
    owns: Callable[[str, str], bool] = lambda _agent_id, _user_id: False,
) -> SessionQuery:
    """The query for what ``caller`` asked, narrowed to what it may see; PERMISSION_DENIED when it
    names a user whose sessions it may not see. An owner of the agent named sees every user's
    sessions of it."""
    if isinstance(caller, ServicePrincipal) and caller.has_role(Role.AUDIT):
        return SessionQuery(user_id=user_id, agent_id=agent_id, include_ended=include_ended)
    if isinstance(caller, UserPrincipal) and agent_id and owns(agent_id, caller.user_id):
        return SessionQuery(user_id=user_id, agent_id=agent_id, include_ended=include_ended)
    if isinstance(caller, UserPrincipal):
        _own_user(caller.user_id, user_id)
        return SessionQuery(user_id=caller.user_id, agent_id=agent_id, include_ended=include_ended)
    if isinstance(caller, AgentPrincipal):
        claims = caller.claims
        _own_user(claims.user_id, user_id)
        return SessionQuery(
            subtree_of=claims.session_id, agent_id=agent_id, include_ended=include_ended
        )
    raise PermissionDenied(  # the method policy lets no other caller through
        "listing sessions needs role audit or admin", reason="CALLER_NOT_ALLOWED"
    )


def _own_user(own: str, asked: str) -> None:
    """A user (or an agent acting for one) names only themselves: the same rule, and reason, as
    Revoke of a user's sessions."""
    if asked and asked != own:
        raise PermissionDenied(
            "only the user themselves, or a service with role audit or admin, may list a user's "
            "sessions",
            reason="NOT_YOUR_SESSIONS",
        )


def query_binding(caller: Principal, query: SessionQuery) -> bytes:
    """What a page token is bound to: who asked, and the query's filters (not the page size,
    which may change from page to page, AIP-158)."""
    return page_binding(
        "list-sessions/v1",
        caller,
        query.user_id,
        query.agent_id,
        query.subtree_of,
        str(int(query.include_ended)),
    )


def page_binding(listing: str, caller: Principal, *filters: str) -> bytes:
    """A page token's binding: the listing (its name and version), who asked, the filters;
    each length-prefixed, so no two differ only in where one field ends."""
    if isinstance(caller, UserPrincipal):
        who: Sequence[str] = ("user", caller.issuer, caller.user_id)
    elif isinstance(caller, AgentPrincipal):
        who = ("agent", caller.claims.session_id)
    else:
        who = ("service", caller.name)
    encoded = (field.encode() for field in (listing, *who, *filters))
    return b"".join(len(field).to_bytes(4, "big") + field for field in encoded)


def _validate_ids(user_id: str, agent_id: str) -> None:
    if len(user_id) > MAX_USER_ID_LENGTH or not user_id.isprintable():
        raise InvalidArgument.field("user_id", "not a valid user id")
    if len(agent_id) > MAX_AGENT_ID_LENGTH or not agent_id.isprintable():
        raise InvalidArgument.field("agent_id", "not a valid agent id")

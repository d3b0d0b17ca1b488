"""Shared Signals in (OpenID SSF 1.0, CAEP 1.0, RISC 1.0): what a verified Security Event Token
(RFC 8417) asks of agentid, and doing it.

The door (web/ssf_receiver.py) hands over the claims of a SET whose signature, `typ`, issuer and
audience tokens/signals.py verified. Here: the `jti` is spent once (a bounded replay cache per
transmitter, with an `iat` floor: docs/limits.md), every event is read with its subject (SSF's
`sub_id`, or the older `subject` inside the event), and the events that end a user's access
(CAEP `session-revoked`, RISC `account-disabled` and `credential-compromise`) revoke every live
session of that user and their sub-agents with the Revoker, as Revoke by user_id does: durable,
pushed to watchers, audited, the caller the service principal `ssf:<transmitter>`, the reason
`ssf:<event>:<jti>`. Other event types are acknowledged and ignored (SSF 1.0 section 10); a
subject that is no user here, or one without sessions, is acknowledged and logged.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentid_server.domain.errors import AgentIdError
from agentid_server.domain.model import Role, ServicePrincipal, unreadable
from agentid_server.domain.revoking import MAX_USER_ID_LENGTH, Revoker

log = logging.getLogger(__name__)

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
# The events that end a user's access here, by their short name (the revoke reason's).
REVOKING_EVENTS = {
    CAEP + "session-revoked": "session-revoked",
    RISC + "account-disabled": "account-disabled",
    RISC + "credential-compromise": "credential-compromise",
}
MAX_JTI_LENGTH = 128
MAX_EVENTS = 16
MAX_SUBJECT_VALUE = 1024  # characters of one identifier member (an email, an opaque id)
# RFC 9493 formats and the members each must carry; "complex" nests them (SSF 1.0 3.2).
FORMAT_MEMBERS = {
    "iss_sub": ("iss", "sub"),
    "email": ("email",),
    "opaque": ("id",),
    "phone_number": ("phone_number",),
    "account": ("uri",),
    "did": ("url",),
    "uri": ("uri",),
}
# The older CAEP/RISC drafts' `subject_type` names, as formats.
_SUBJECT_TYPES = {"iss-sub": "iss_sub", "spag": "complex"}
# Members of a complex subject that may name the user (SSF 1.0 section 3.2).
_COMPLEX_USER = "user"
_COMPLEX_MEMBERS = ("user", "device", "session", "application", "tenant", "org_unit", "group")


class SetRefused(AgentIdError):
    """A SET that is not accepted, with its RFC 8935 section 2.4 error code as the reason in
    upper case (INVALID_REQUEST, INVALID_KEY, INVALID_ISSUER, INVALID_AUDIENCE,
    AUTHENTICATION_FAILED, ACCESS_DENIED). The message never quotes the SET."""

    default_reason = "INVALID_REQUEST"

    @property
    def err(self) -> str:
        return self.reason.lower()


def invalid_request(message: str) -> SetRefused:
    return SetRefused(message, reason="INVALID_REQUEST")


@dataclass(frozen=True, slots=True)
class Subject:
    """A subject identifier: its format and its string members (for `complex`, the user's)."""

    format: str
    members: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    subject: Subject | None  # None: the event names no user (a complex subject without one)


@dataclass(frozen=True, slots=True)
class Received:
    """What one SET did: per revoking event, the user and the sessions revoked."""

    jti: str
    revoked: list[tuple[str, str, list[str]]] = field(default_factory=list)  # event, user, ids
    ignored: list[str] = field(default_factory=list)  # event types not acted on


class ReplayCache:
    """The `jti`s of one transmitter's SETs accepted in the last ``max_age`` seconds, at most
    ``size`` of them. Full, the one with the oldest `iat` goes, and no SET with an `iat` at or
    before it is accepted from then on (the floor): so a SET is never accepted twice, whatever
    the bound, and under a flood beyond it the oldest late deliveries are refused."""

    def __init__(self, size: int, max_age: float) -> None:
        self._size, self._max_age = size, max_age
        self._seen: dict[str, float] = {}
        self._by_iat: list[tuple[float, str]] = []  # a heap of (iat, jti)
        self._floor = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def spend(self, jti: str, iat: float, now: float) -> None:
        """Records ``jti`` (SetRefused when it was seen, or is too old to tell)."""
        self._forget(now)
        if iat <= max(self._floor, now - self._max_age):
            raise invalid_request("the SET is too old (iat): it may have been delivered already")
        if jti in self._seen:
            raise invalid_request("the SET was delivered already (jti)")
        while len(self._seen) >= self._size:
            oldest, gone = heapq.heappop(self._by_iat)
            del self._seen[gone]
            self._floor = max(self._floor, oldest)
        self._seen[jti] = iat
        heapq.heappush(self._by_iat, (iat, jti))

    def release(self, jti: str) -> None:
        """Forgets ``jti`` (its SET could not be acted on: the transmitter may send it again)."""
        iat = self._seen.pop(jti, None)
        if iat is not None:
            self._by_iat.remove((iat, jti))
            heapq.heapify(self._by_iat)

    def _forget(self, now: float) -> None:
        horizon = now - self._max_age
        while self._by_iat and self._by_iat[0][0] <= horizon:
            _, jti = heapq.heappop(self._by_iat)
            del self._seen[jti]


@dataclass(frozen=True)
class Transmitter:
    """A configured transmitter as the domain sees it: its name, how its subjects map to user
    ids here (None: not a user here), and its replay cache."""

    name: str
    user_of: Callable[[Subject], str | None]
    replays: ReplayCache

    @property
    def principal(self) -> ServicePrincipal:
        return ServicePrincipal(f"ssf:{self.name}", frozenset({Role.ADMIN}), "")


class SignalReceiver:
    """Acts on verified SETs."""

    def __init__(self, revoker: Revoker, clock: Callable[[], float]) -> None:
        self._revoker = revoker
        self._now = clock

    async def receive(self, transmitter: Transmitter, claims: Mapping[str, Any]) -> Received:
        """Spends the SET's jti, reads its events, revokes for those that ask it. SetRefused
        when the SET is malformed or replayed (nothing revoked then)."""
        jti, iat = _jti(claims), _iat(claims)
        events = read_events(claims)
        transmitter.replays.spend(jti, iat, self._now())
        received = Received(jti)
        try:
            for event in events:
                await self._act(transmitter, jti, event, received)
        except BaseException:
            # Not done (the store is unavailable, or the call was cancelled): the transmitter's
            # retry may deliver it again. Revoking twice is harmless: the first slices stay.
            transmitter.replays.release(jti)
            raise
        return received

    async def _act(
        self, transmitter: Transmitter, jti: str, event: Event, received: Received
    ) -> None:
        short = REVOKING_EVENTS.get(event.type)
        if short is None:
            log.info(
                "SET %s from %s: event type %r is not acted on",
                jti, transmitter.name, event.type[:200],
            )  # fmt: skip
            received.ignored.append(event.type)
            return
        user_id = transmitter.user_of(event.subject) if event.subject is not None else None
        if user_id is None:
            log.info(
                "SET %s from %s (%s): its subject (%r) is not a user here; acknowledged",
                jti, transmitter.name, short,
                event.subject.format if event.subject else "none",
            )  # fmt: skip
            return
        if len(user_id) > MAX_USER_ID_LENGTH or not user_id.isprintable():
            log.info("SET %s from %s: its subject is not a user id here", jti, transmitter.name)
            return
        outcome = await self._revoker.revoke(
            transmitter.principal,
            session_id="",
            user_id=user_id,
            reason=f"ssf:{short}:{jti}",
        )
        if not outcome.session_ids:
            log.info(
                "SET %s from %s (%s): the user has no live session; acknowledged",
                jti, transmitter.name, short,
            )  # fmt: skip
        received.revoked.append((short, user_id, outcome.session_ids))


def _jti(claims: Mapping[str, Any]) -> str:
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise invalid_request("jti: required, a string")
    if len(jti) > MAX_JTI_LENGTH or not jti.isascii() or not jti.isprintable():
        raise invalid_request(f"jti: at most {MAX_JTI_LENGTH} printable ASCII characters")
    return jti


def _iat(claims: Mapping[str, Any]) -> float:
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise invalid_request("iat: required, a number")
    return float(iat)


def read_events(claims: Mapping[str, Any]) -> list[Event]:
    """The SET's events (RFC 8417 section 2.2), each with its subject: the SET's `sub_id` (SSF
    1.0), else the event's own `subject` member (CAEP/RISC before SSF 1.0). A malformed
    `events`, or a malformed subject of any event, refuses the whole SET."""
    events = claims.get("events")
    if not isinstance(events, dict) or not events:
        raise invalid_request("events: required, an object of at least one event")
    if len(events) > MAX_EVENTS:
        raise invalid_request(f"events: at most {MAX_EVENTS}")
    shared = claims.get("sub_id")
    top = read_subject(shared, "sub_id") if shared is not None else None
    read: list[Event] = []
    for uri, payload in events.items():
        if not isinstance(payload, dict):
            raise invalid_request("events: each event's payload must be an object")
        subject, named = top, shared is not None
        if not named and "subject" in payload:
            subject, named = read_subject(payload["subject"], "subject"), True
        if not named and uri in REVOKING_EVENTS:
            raise invalid_request("sub_id: required for this event type (SSF 1.0)")
        read.append(Event(uri, subject))
    return read


def read_subject(value: Any, where: str) -> Subject | None:
    """A subject identifier (RFC 9493; SSF 1.0's `complex`, whose `user` member is the one that
    matters here: None without one); SetRefused when it is malformed."""
    if not isinstance(value, dict):
        raise invalid_request(f"{where}: must be an object")
    fmt = value.get("format", value.get("subject_type"))
    if not isinstance(fmt, str):
        if any(member in value for member in _COMPLEX_MEMBERS):
            fmt = "complex"  # the older drafts' complex subjects carry no format
        else:
            raise invalid_request(f"{where}: format is required")
    fmt = _SUBJECT_TYPES.get(fmt, fmt)
    if fmt == "complex":
        for part in _COMPLEX_MEMBERS:
            if part in value:
                read_subject(value[part], f"{where}.{part}")  # each well-formed
        user = value.get(_COMPLEX_USER)
        return read_subject(user, f"{where}.user") if user is not None else None
    required = FORMAT_MEMBERS.get(fmt)
    if required is None:
        return Subject(fmt[:64], {})  # a format unknown here: no user of ours
    members: dict[str, str] = {}
    for name in required:
        member = value.get(name)
        if not isinstance(member, str) or not member:
            raise invalid_request(f"{where}.{name}: required for format {fmt}, a string")
        if len(member) > MAX_SUBJECT_VALUE or unreadable(member) is not None:
            raise invalid_request(f"{where}.{name}: too long or not printable")
        members[name] = member
    return Subject(fmt, members)

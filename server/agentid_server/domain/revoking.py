"""Revoke and WatchRevocations: immediate on this process, pushed to every watcher, resumable.

A revocation is committed (rows with a global gap-free sequence), applied to the in-memory set and
handed to every watcher before Revoke answers, so a Check that starts after Revoke returned never
allows the session.

Several replicas on one database share the sequence. Each applies revocations strictly in
sequence order: what another replica committed is read from the store (``catch_up``), when told
of it (PostgreSQL NOTIFY), every poll interval, or on demand (a Revoke that found a gap before its
own sequences, a Check with ``min_revocation_sequence``). Watchers therefore see one gap-free
order on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from agentid_server.domain.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unavailable,
)
from agentid_server.domain.fanout import Resync
from agentid_server.domain.model import (
    AgentPrincipal,
    AuditEvent,
    EventType,
    Principal,
    Role,
    ServicePrincipal,
    SessionRecord,
    UserPrincipal,
    actor_of,
    unreadable,
)
from agentid_server.domain.ports import Clock, RevocationStore
from agentid_server.domain.revocation import Revocation, RevocationHub, RevocationSet, Snapshot

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"ses_[0-9A-HJKMNP-TV-Z]{26}")
MAX_REASON_LENGTH = 512
MAX_USER_ID_LENGTH = 256
HISTORY_PAGE = 1000
REVOKE_SLICE = 250  # sessions a Revoke writes per transaction (revocation.revoke_slice)


class AgentOwners(Protocol):
    def __contains__(self, agent_id: object) -> bool:
        """Is the agent registered?"""
        ...

    def owned_by(self, agent_id: str, user_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class RevokeOutcome:
    session_ids: list[str]
    sequence: int


def validate_session_id(field: str, value: str) -> None:
    if not SESSION_ID.fullmatch(value):
        raise InvalidArgument.field(field, "not a session id (ses_ followed by a ULID)")


class Revoker:
    """Revokes sessions and serves the revocation stream."""

    def __init__(
        self,
        *,
        store: RevocationStore,
        revoked: RevocationSet,
        hub: RevocationHub,
        clock: Clock,
        slice_size: int = REVOKE_SLICE,
        on_applied: Callable[[Revocation], None] | None = None,
        agents: AgentOwners | None = None,
    ) -> None:
        """A Revoke of many sessions is written ``slice_size`` sessions per transaction;
        ``on_applied`` is told of each revocation as it is applied (streams of that session end);
        ``agents``: the registry, for Revoke by agent (its owners may)."""
        self._agents = agents
        self._store = store
        self._revoked = revoked
        self._hub = hub
        self._clock = clock
        self._slice = slice_size
        self._on_applied = on_applied
        self._ahead: dict[int, Revocation] = {}  # committed, waiting for an earlier sequence
        self._catching_up = asyncio.Lock()

    # -- Revoke ----------------------------------------------------------------------------------

    async def revoke(
        self, caller: Principal, *, session_id: str, user_id: str, reason: str, agent_id: str = ""
    ) -> RevokeOutcome:
        if sum(map(bool, (session_id, user_id, agent_id))) != 1:
            raise InvalidArgument.field(
                "target", "set exactly one of session_id, user_id and agent_id"
            )
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidArgument.field("reason", f"at most {MAX_REASON_LENGTH} characters")
        if (problem := unreadable(reason)) is not None:
            raise InvalidArgument.field("reason", problem)
        authorize: Callable[[SessionRecord | None, Callable[[], list[str]]], None] | None = None
        if session_id:
            validate_session_id("session_id", session_id)

            def of_session(session: SessionRecord | None, lineage: Callable[[], list[str]]) -> None:
                _authorize_session(caller, session_id, session, lineage)

            authorize = of_session

        elif agent_id:
            self._authorize_agent(caller, agent_id)
        else:
            if len(user_id) > MAX_USER_ID_LENGTH or not user_id.isprintable():
                raise InvalidArgument.field("user_id", "not a valid user id")
            _authorize_user(caller, user_id)
        # In slices, each its own transaction, applied and handed to watchers before the next:
        # one Revoke of a user's 20,000 sessions neither holds the event loop (the SQLite
        # writer runs inline) nor floods every watcher at once. A failure part-way leaves the
        # slices before it revoked; the same Revoke again revokes the rest.
        now = self._clock.now()
        revocations: list[Revocation] = []
        after_serial = 0
        while True:
            written = await self._store.revoke(
                root_session_id=session_id or None,
                user_id=user_id or None,
                agent_id=agent_id or None,
                reason=reason,
                now=now,
                audit=lambda session, revocation: _audit_event(caller, session, revocation),
                on_commit=self._applied,
                authorize=authorize,
                known=self._revoked.holds,
                limit=self._slice,
                after_serial=after_serial,
            )
            revocations += written.revocations
            if written.following is None:
                break
            after_serial = written.following
            authorize = None  # asked once, of the root, in the first slice's transaction
            await asyncio.sleep(0)  # let the Checks and watchers waiting meanwhile run
        sequence = revocations[-1].sequence if revocations else self._revoked.applied_sequence
        if sequence > self._revoked.applied_sequence:  # another replica's revocations come first
            await self.catch_up(until=sequence)
        return RevokeOutcome([r.session_id for r in revocations], sequence)

    def _authorize_agent(self, caller: Principal, agent_id: str) -> None:
        """Every session of an agent: an admin service, or one of the agent's owners."""
        if self._agents is None or agent_id not in self._agents:
            raise NotFound(
                f"agent {agent_id[:64]!r} is not registered",
                reason="AGENT_NOT_REGISTERED",
                metadata={"agent_id": agent_id[:64]},
            )
        if isinstance(caller, ServicePrincipal) and caller.has_role(Role.ADMIN):
            return
        if isinstance(caller, UserPrincipal) and self._agents.owned_by(agent_id, caller.user_id):
            return
        raise PermissionDenied(
            "only the agent's owners or an admin service may revoke every session of an agent",
            reason="NOT_AGENT_OWNER",
        )

    def _applied(self, revocations: list[Revocation]) -> None:
        """After the commit, in commit order: the Check path and every watcher see it now (or,
        after a gap, as soon as the revocations before it are read: see catch_up)."""
        self.deliver(revocations)

    def deliver(self, revocations: Iterable[Revocation]) -> None:
        """Applies revocations in sequence order, each exactly once: the Check path sees them and
        every watcher is handed them. One that comes before its predecessors waits for them."""
        applied = self._revoked.applied_sequence
        for revocation in revocations:
            if revocation.sequence > applied:
                self._ahead[revocation.sequence] = revocation
        following = applied + 1
        while following in self._ahead:
            revocation = self._ahead.pop(following)
            self._revoked.apply(revocation)
            self._hub.publish(revocation)
            if self._on_applied is not None:
                self._on_applied(revocation)
            following += 1

    async def catch_up(self, until: int | None = None) -> None:
        """Reads and applies, in order, what the store holds beyond what this process applied
        (revocations other replicas committed); with ``until``, stops once that is applied."""
        async with self._catching_up:
            while until is None or self._revoked.applied_sequence < until:
                applied = self._revoked.applied_sequence
                page = await self._store.events_after(applied, HISTORY_PAGE)
                if page and page[0].sequence != applied + 1:
                    # Only history of expired tokens is ever pruned: nothing to apply there.
                    log.warning(
                        "revocations %d-%d were pruned before this process applied them",
                        applied + 1,
                        page[0].sequence - 1,
                    )
                    self._revoked.advance(page[0].sequence - 1)
                self.deliver(page)
                if len(page) < HISTORY_PAGE:
                    return

    # -- WatchRevocations ------------------------------------------------------------------------

    async def watch(self, after_sequence: int) -> AsyncIterator[Snapshot | Revocation]:
        """A snapshot (when asked for, or when the history needed is gone), then every event in
        sequence order, without gaps or duplicates, then live events as they are applied; when
        more arrive at once than the watcher's buffer holds (a mass revocation), a fresh snapshot
        in their place, and on from there."""
        if after_sequence > self._revoked.applied_sequence:
            written = await self._store.last_sequence()
            if after_sequence > written:
                raise OutOfRange(
                    f"after_sequence {after_sequence} is beyond the last revocation written",
                    reason="SEQUENCE_IN_THE_FUTURE",
                    metadata={"last_sequence": str(written)},
                )
        # First, so nothing published from now is missed.
        subscription = self._hub.subscribe(resync=True)
        try:
            last = after_sequence
            if after_sequence == 0 or not await self._history_kept(after_sequence):
                snapshot = self._revoked.snapshot()
                yield snapshot
                last = snapshot.sequence
            else:
                async for revocation in self._history(after_sequence):
                    yield revocation
                    last = revocation.sequence
            while (live := await subscription.next()) is not None:
                if isinstance(live, Resync):  # taken now: what was dropped, and all before
                    snapshot = self._revoked.snapshot()
                    yield snapshot
                    last = max(last, snapshot.sequence)
                elif live.sequence > last:
                    yield live
                    last = live.sequence
        finally:
            self._hub.unsubscribe(subscription)

    async def _history_kept(self, after_sequence: int) -> bool:
        if after_sequence >= self._revoked.applied_sequence:
            return True  # nothing missed
        oldest = await self._store.oldest_sequence()
        return oldest is not None and oldest <= after_sequence + 1

    async def _history(self, after_sequence: int) -> AsyncIterator[Revocation]:
        cursor = after_sequence
        while True:
            page = await self._store.events_after(cursor, HISTORY_PAGE)
            for revocation in page:
                if revocation.sequence != cursor + 1:  # pruned under us: never skip silently
                    raise Unavailable(
                        "revocation history changed while reading; reconnect",
                        reason="HISTORY_PRUNED",
                    )
                yield revocation
                cursor = revocation.sequence
            if len(page) < HISTORY_PAGE:
                return

    # -- consistency -----------------------------------------------------------------------------

    async def await_sequence(self, sequence: int, budget: float) -> None:
        """Waits, at most ``budget`` seconds, until this process applied ``sequence`` (Check's
        min_revocation_sequence)."""
        if sequence <= self._revoked.applied_sequence:
            return
        if sequence > await self._store.last_sequence():
            raise OutOfRange(
                f"revocation sequence {sequence} has not been written",
                reason="SEQUENCE_IN_THE_FUTURE",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        if budget > 0:  # written by another replica: read it now rather than wait to be told
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.catch_up(until=sequence), budget)
        if not await self._revoked.wait_applied(sequence, deadline - loop.time()):
            raise Unavailable(
                f"revocation sequence {sequence} is not applied here yet",
                reason="REVOCATION_SEQUENCE_NOT_APPLIED",
            )


def _authorize_session(
    caller: Principal,
    session_id: str,
    session: SessionRecord | None,
    lineage: Callable[[], list[str]],
) -> None:
    """Who may revoke a session: the delegating user, the session itself or an ancestor (its
    lineage is read only for an agent), an admin service."""
    if session is None:
        raise NotFound(f"no session {session_id}", reason="SESSION_NOT_FOUND")
    if isinstance(caller, ServicePrincipal):
        if caller.has_role(Role.ADMIN):
            return
    elif isinstance(caller, UserPrincipal):
        if caller.user_id == session.user_id:
            return
    elif isinstance(caller, AgentPrincipal):
        own = caller.claims.session_id
        if own == session_id or own in lineage():
            return
    raise PermissionDenied(
        "only the delegating user, the session itself or an ancestor, or an admin service "
        "may revoke this session",
        reason="NOT_YOUR_SESSION",
    )


def _authorize_user(caller: Principal, user_id: str) -> None:
    if isinstance(caller, ServicePrincipal) and caller.has_role(Role.ADMIN):
        return
    if isinstance(caller, UserPrincipal) and caller.user_id == user_id:
        return
    raise PermissionDenied(
        "only the user themselves or an admin service may revoke all of a user's sessions",
        reason="NOT_YOUR_SESSIONS",
    )


def _audit_event(caller: Principal, session: SessionRecord, revocation: Revocation) -> AuditEvent:
    kind, actor = actor_of(caller)
    return AuditEvent(
        time=revocation.revoked_at,
        event_type=EventType.REVOKE,
        actor_kind=kind,
        actor_id=actor,
        session_id=session.id,
        user_id=session.user_id,
        scopes=session.scopes,
        agent_id=session.agent_id,
        parent_session_id=session.parent_id,
        detail=revocation.reason,
    )

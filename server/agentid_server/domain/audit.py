"""The audit trail's two questions, "what did this agent do" and "what did this user authorise",
its live follow, and chain verification."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agentid_server.domain.checkpoint import AuditProblem, Checkpoint, parse_kept
from agentid_server.domain.errors import InvalidArgument, PermissionDenied
from agentid_server.domain.fanout import Doorbell, Hub, Resync, Subscription
from agentid_server.domain.model import (
    ActorKind,
    Decision,
    EventType,
    Principal,
    Reason,
    Role,
    ServicePrincipal,
    UserPrincipal,
)
from agentid_server.domain.revoking import validate_session_id

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_RECORD_ID = (1 << 63) - 1  # the largest id a database column holds
FOLLOW_COALESCE = 0.02  # seconds a store-reading follower waits after a ring, to read once


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    time_us: int
    event_type: EventType
    session_id: str
    user_id: str
    scopes: tuple[str, ...]
    agent_id: str
    actor_kind: ActorKind
    actor_id: str
    action: str
    resource: str
    decision: Decision
    reason: Reason
    parent_session_id: str
    step_up_id: str
    context: Mapping[str, Any] | None
    detail: str
    chain_id: str
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class AuditQuery:
    session_ids: tuple[str, ...] = ()  # the session (and with descendants, its subtree)
    user_id: str = ""
    actor_kind: ActorKind = ActorKind.UNSPECIFIED
    event_types: frozenset[EventType] = frozenset()
    since_us: int | None = None
    until_us: int | None = None
    after_id: int = 0
    limit: int = DEFAULT_LIMIT
    newest: bool = False  # the last `limit` records after after_id (still in id order)

    def matches(self, record: AuditRecord, session_ids: set[str] | None = None) -> bool:
        """The same filter the store applies, for records arriving live (``session_ids``: the
        subtree as it grows)."""
        sessions = self.session_ids if session_ids is None else session_ids
        if sessions and not (
            record.session_id in sessions
            or (record.event_type is EventType.DELEGATE and record.parent_session_id in sessions)
        ):
            return False
        if self.user_id and record.user_id != self.user_id:
            return False
        if self.actor_kind and record.actor_kind != self.actor_kind:
            return False
        if self.event_types and record.event_type not in self.event_types:
            return False
        time_us = record.time_us
        if self.since_us is not None and time_us < self.since_us:
            return False
        return self.until_us is None or time_us < self.until_us


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    verified: int
    first_bad_id: int
    head_hash: bytes
    problem: AuditProblem = AuditProblem.NONE
    detail: str = ""  # what was found, for a person
    checkpoints: tuple[Checkpoint, ...] = ()  # the newest checked checkpoint of each chain


class AuditStore(Protocol):
    async def query(self, query: AuditQuery) -> list[AuditRecord]: ...

    async def subtree(self, session_id: str) -> list[str]:
        """The session's id and all its descendants' ids."""
        ...

    async def session_user(self, session_id: str) -> str | None:
        """The delegating user of a session, None for an unknown session."""
        ...

    async def verify(
        self, from_id: int, to_id: int, kept: tuple[Checkpoint, ...] = ()
    ) -> Verification: ...


AuditHub = Hub[AuditRecord]


@dataclass(frozen=True, slots=True)
class AuditRequest:
    session_id: str = ""
    include_descendants: bool = False
    user_id: str = ""
    actor_kind: ActorKind = ActorKind.UNSPECIFIED
    event_types: tuple[EventType, ...] = ()
    since_us: int | None = None  # microseconds, inclusive
    until_us: int | None = None  # microseconds, exclusive
    after_id: int = 0
    limit: int = 0
    follow: bool = False


class Auditor:
    """Answers Audit and VerifyAudit."""

    def __init__(
        self,
        *,
        store: AuditStore,
        hub: AuditHub,
        bell: Doorbell | None = None,
        poll_interval: float = 1.0,
        checkpoint: Callable[[], Awaitable[Checkpoint | None]] | None = None,
    ) -> None:
        """Followers get live records from ``hub`` (the one writer's commits, in id order) or,
        when several writers share the store, from the store itself whenever ``bell`` rings
        (any writer committed records) and at least every ``poll_interval`` seconds.
        ``checkpoint`` signs this server's chain head (the journal's checkpoint_now)."""
        self._checkpoint = checkpoint
        self._store = store
        self._hub = hub
        self._bell = bell
        self._poll_interval = poll_interval

    async def records(self, caller: Principal, request: AuditRequest) -> AsyncIterator[AuditRecord]:
        query = await self._query(caller, request)
        if request.follow and self._bell is not None:
            async for record in self._follow_store(self._bell, query, request.include_descendants):
                yield record
            return
        live_sessions = set(query.session_ids)
        subscription: Subscription[AuditRecord] | None = None

        def wants(record: AuditRecord) -> bool:
            if not query.matches(record, live_sessions):
                return False
            if (
                request.include_descendants
                and record.event_type is EventType.DELEGATE
                and record.session_id not in live_sessions
            ):  # a new sub-agent joins the subtree, from this record on
                live_sessions.add(record.session_id)
                assert subscription is not None
                self._hub.add_key(subscription, ("session", record.session_id))
            return True

        if request.follow:
            subscription = self._hub.subscribe(wants, keys=follower_keys(query))
        try:
            last = query.after_id
            # Following, `limit` caps the backlog: its newest records, then everything live.
            for record in await self._store.query(replace(query, newest=subscription is not None)):
                yield record
                last = record.id
            if subscription is None:
                return
            # Records committed between the backlog query and now are in the store: catch up.
            while True:
                page = await self._store.query(replace(query, after_id=last, limit=MAX_LIMIT))
                for record in page:
                    yield record
                    last = record.id
                if len(page) < MAX_LIMIT:
                    break
            while (live := await subscription.next()) is not None:
                if isinstance(live, Resync) or live.id <= last:
                    continue  # (audit followers never resync: they are ended when too slow)
                yield live
                last = live.id
        finally:
            if subscription is not None:
                self._hub.unsubscribe(subscription)

    async def _follow_store(
        self, bell: Doorbell, query: AuditQuery, grow: bool
    ) -> AsyncIterator[AuditRecord]:
        """Backlog and live records alike read from the store, page after page in id order (the
        store shows ids in order), so a follower can fall behind without losing anything: it is
        never ended for being slow, and it sees every writer's records."""
        sessions = list(query.session_ids)
        known = set(sessions)
        last, limit, newest = query.after_id, query.limit, True  # the backlog's newest first
        with bell.listening() as rung:
            while True:
                rung.clear()  # a commit from now on rings again
                page = await self._store.query(
                    replace(
                        query,
                        session_ids=tuple(sessions),
                        after_id=last,
                        limit=limit,
                        newest=newest,
                    )
                )
                more = len(page) >= limit and not newest
                limit, newest = MAX_LIMIT, False
                for record in page:
                    yield record
                    last = record.id
                    if (
                        grow
                        and record.event_type is EventType.DELEGATE
                        and record.parent_session_id in known
                        and record.session_id not in known
                    ):  # a new sub-agent joins the subtree: read on with it
                        known.add(record.session_id)
                        sessions.append(record.session_id)
                        more = True
                        break
                if more:
                    continue
                if not bell.closed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(rung.wait(), self._poll_interval)
                if bell.closed:
                    return
                await asyncio.sleep(FOLLOW_COALESCE)  # a burst of commits: one read

    async def verify(
        self,
        from_id: int,
        to_id: int,
        kept: list[str] | tuple[str, ...] = (),
        checkpoint_now: bool = False,
    ) -> Verification:
        """Verifies the chain over [from_id, to_id] (0: to the end) against its stored
        checkpoints and the ``kept`` ones (their text form); ``checkpoint_now`` signs this
        server's chain head first, so the answer's checkpoints cover every record up to now."""
        if to_id and to_id < from_id:
            raise InvalidArgument.field("to_id", "must not be below from_id")
        checkpoints = parse_kept(kept)
        if checkpoint_now and self._checkpoint is not None:
            fresh = await self._checkpoint()
            if fresh is not None:  # checked like a kept one, whatever the range
                checkpoints = (*checkpoints, fresh)
        # uint64 on the wire, signed 64-bit in the databases: beyond it lies nothing to verify.
        return await self._store.verify(
            min(from_id, MAX_RECORD_ID), min(to_id, MAX_RECORD_ID), checkpoints
        )

    async def _query(self, caller: Principal, request: AuditRequest) -> AuditQuery:
        user_id = request.user_id
        if isinstance(caller, UserPrincipal):
            if user_id and user_id != caller.user_id:
                raise PermissionDenied(
                    "a user may only read the records of what was done on their behalf",
                    reason="NOT_YOUR_RECORDS",
                )
            user_id = caller.user_id
        elif not (isinstance(caller, ServicePrincipal) and caller.has_role(Role.AUDIT)):
            raise PermissionDenied(
                "reading the audit trail needs role audit", reason="NOT_AN_AUDITOR"
            )
        if (
            request.since_us is not None
            and request.until_us is not None
            and request.until_us < request.since_us
        ):
            raise InvalidArgument.field("until", "must not be before since")
        if request.include_descendants and not request.session_id:
            raise InvalidArgument.field("include_descendants", "needs a session_id")
        session_ids: tuple[str, ...] = ()
        if request.session_id:
            validate_session_id("session_id", request.session_id)
            if isinstance(caller, UserPrincipal) and await self._store.session_user(
                request.session_id
            ) not in (None, caller.user_id):
                raise PermissionDenied(  # never a silently filtered answer
                    "a user may only read the records of their own sessions",
                    reason="NOT_YOUR_RECORDS",
                )
            session_ids = (request.session_id,)
            if request.include_descendants:
                session_ids = tuple(await self._store.subtree(request.session_id))
        return AuditQuery(
            session_ids=session_ids,
            user_id=user_id,
            actor_kind=request.actor_kind,
            event_types=frozenset(request.event_types),
            since_us=request.since_us,
            until_us=request.until_us,
            after_id=min(request.after_id, MAX_RECORD_ID),  # none is beyond: an empty page
            limit=min(request.limit or DEFAULT_LIMIT, MAX_LIMIT),
        )


def follower_keys(query: AuditQuery) -> tuple[tuple[str, str], ...]:
    """Where a follower sits in the hub's index: under its user (every user follows their own
    records only), else under its sessions, else (an auditor following everything) nowhere,
    reached by every record."""
    if query.user_id:
        return (("user", query.user_id),)
    return tuple(("session", session_id) for session_id in query.session_ids)


def record_keys(record: AuditRecord) -> tuple[tuple[str, str], ...]:
    """The index entries a record reaches: its user, its session and, for a Delegate, the
    parent session (whose subtree it joins)."""
    keys = (("user", record.user_id), ("session", record.session_id))
    if record.event_type is EventType.DELEGATE and record.parent_session_id:
        return (*keys, ("session", record.parent_session_id))
    return keys


def record_listener(
    hub: AuditHub, convert: Callable[[Any], AuditRecord]
) -> Callable[[list[Any]], None]:
    """What the journal calls after each commit: publishes the new records when anyone follows,
    each to the followers that may want it only."""

    def publish(rows: list[Any]) -> None:
        if len(hub):
            for row in rows:
                record = convert(row)
                hub.publish(record, record_keys(record))

    return publish

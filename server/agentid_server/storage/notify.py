"""What other replicas committed, on PostgreSQL: LISTEN/NOTIFY, with a poll behind it.

* Revocations: a Revoke's transaction sends ``NOTIFY agentid_revocations`` (revoke_job.py;
  delivered at its commit, never before). Every replica listens on a connection of its own and,
  when another replica notified, reads what it has not applied yet (``on_revocations``: the
  Revoker's catch-up, which keeps the sequence order); its own revocations it applied at their
  commit. A notification can be lost with its connection, so the same catch-up also runs every
  ``poll_interval``, and the listening connection is replaced when it drops.
* Step-up changes (requested, approved, denied, consumed, expired): the changing transaction
  sends the step-up ids on ``agentid_step_ups``; the other replicas read those step-ups and hand
  them to their WatchStepUps streams (``on_step_ups``). A stream that reconnects starts from the
  current state, so a change missed with a dropped connection is seen then.
* The agent registry: each write sends ``agentid_agents``; every replica then reads the agents
  changed after the revision it holds (``on_revocations`` does that too: one catch-up for both,
  so a disabled agent and its revoked sessions arrive together).
* Audit records: each commit of audit records sends ``agentid_audit`` (visibility.py); the other
  replicas' followers then read the store (``audit_bell``). A replica listens for it only while
  it has followers. Followers also read every poll interval, so a missed notification only
  delays them.

SQLite has one writer and needs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentid_server.domain.fanout import Doorbell
from agentid_server.storage.visibility import AUDIT_CHANNEL

log = logging.getLogger(__name__)

REVOCATIONS_CHANNEL = "agentid_revocations"
STEP_UPS_CHANNEL = "agentid_step_ups"
AGENTS_CHANNEL = "agentid_agents"
RECONNECT_DELAY = 1.0
MAX_PAYLOAD = 7000  # PostgreSQL's limit is 8000 bytes per notification


def notify_agents(connection: Connection, revision: int) -> None:
    """In a registry write's transaction: the other replicas read the registry after its commit
    (PostgreSQL)."""
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": AGENTS_CHANNEL, "payload": str(revision)},
        )


def notify_step_ups(connection: Connection, step_up_ids: Sequence[str]) -> None:
    """In a job's transaction: tells the other replicas which step-ups changed (PostgreSQL)."""
    if connection.dialect.name != "postgresql" or not step_up_ids:
        return
    payloads: list[list[str]] = [[]]
    size = 0
    for step_up_id in step_up_ids:
        if size + len(step_up_id) + 1 > MAX_PAYLOAD:
            payloads.append([])
            size = 0
        payloads[-1].append(step_up_id)
        size += len(step_up_id) + 1
    for ids in payloads:
        connection.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": STEP_UPS_CHANNEL, "payload": ",".join(ids)},
        )


class PeerListener:
    """Runs ``on_revocations`` whenever another replica may have committed revocations,
    ``on_step_ups`` with the ids of step-ups another replica changed, and rings ``audit_bell``
    when another replica committed audit records. It listens for audit records only while the
    bell has listeners (followers): every batch of every replica notifies, and hearing them
    costs a replica without followers CPU for nothing."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        on_revocations: Callable[[], Awaitable[None]],
        on_step_ups: Callable[[list[str]], Awaitable[None]],
        own_pid: Callable[[], int | None],
        poll_interval: float,
        audit_bell: Doorbell | None = None,
    ) -> None:
        """``own_pid``: the backend process of this replica's writer, whose notifications are
        this replica's own (already handed to its watchers)."""
        self._engine = engine
        self._on_news = on_revocations
        self._on_step_ups = on_step_ups
        self._audit_bell = audit_bell
        self._hearing_audit = False  # LISTEN agentid_audit in place on the current connection
        self._own_pid = own_pid
        self._poll_interval = poll_interval
        self._news = False  # a notification came: read what changed
        self._wake = asyncio.Event()  # news, or the audit bell's listeners came or went
        if audit_bell is not None:
            audit_bell.on_listeners = self._wake.set
        self._step_ups: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while a LISTEN is in place (tests wait for it)

    @property
    def hearing_audit(self) -> bool:
        """LISTEN agentid_audit is in place (while the audit bell has listeners)."""
        return self._hearing_audit

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="peer-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notified(self, _connection: Any, pid: int, channel: str, payload: str) -> None:
        if channel == AUDIT_CHANNEL:
            if self._audit_bell is not None and pid != self._own_pid():
                self._audit_bell.ring()
            return
        if channel == STEP_UPS_CHANNEL:
            if pid == self._own_pid():
                return
            self._step_ups.update(i for i in payload.split(",") if i)
        elif channel == REVOCATIONS_CHANNEL and pid == self._own_pid():
            return  # this replica's own: applied and handed to its watchers at the commit
        self._news = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: listen again, catching up first
                log.warning("listening to the other replicas: %s; again", type(exc).__name__)
            self.listening.clear()
            await asyncio.sleep(RECONNECT_DELAY)

    async def _listen(self) -> None:
        async with self._engine.connect() as connection:
            raw = await connection.get_raw_connection()
            listener = raw.driver_connection  # the asyncpg connection
            assert listener is not None
            channels = (REVOCATIONS_CHANNEL, STEP_UPS_CHANNEL, AGENTS_CHANNEL)
            for channel in channels:
                await listener.add_listener(channel, self._notified)
            self._hearing_audit = False
            try:
                self.listening.set()
                due = True  # first: what came before this LISTEN took effect
                while not listener.is_closed():
                    self._wake.clear()
                    await self._hear_audit_while_followed(listener)
                    if due or self._news:
                        self._news = False
                        await self._on_news()
                        if self._step_ups:  # forgotten only once handed on: a failed read retries
                            changed = sorted(self._step_ups)
                            await self._on_step_ups(changed)
                            self._step_ups.difference_update(changed)
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                        due = False
                    except TimeoutError:
                        due = True  # the poll
                raise ConnectionError("the listening connection closed")
            finally:  # the connection goes back to the pool: not listening any more
                if not listener.is_closed():
                    heard = (*channels, AUDIT_CHANNEL) if self._hearing_audit else channels
                    for channel in heard:
                        with contextlib.suppress(Exception):
                            await listener.remove_listener(channel, self._notified)
                self._hearing_audit = False

    async def _hear_audit_while_followed(self, listener: Any) -> None:
        """LISTEN for audit records while the bell has listeners, UNLISTEN when it has none;
        once listening, ring it: a record committed before the LISTEN took effect was not
        heard of."""
        bell = self._audit_bell
        wanted = bell is not None and bell.heard
        if wanted and not self._hearing_audit:
            await listener.add_listener(AUDIT_CHANNEL, self._notified)
            self._hearing_audit = True
            assert bell is not None
            bell.ring()
        elif not wanted and self._hearing_audit:
            await listener.remove_listener(AUDIT_CHANNEL, self._notified)
            self._hearing_audit = False

"""Revocations committed by other replicas, on PostgreSQL: LISTEN/NOTIFY, with a poll behind it.

A Revoke's transaction sends ``NOTIFY agentid_revocations`` (delivered at its commit, never
before). Every replica listens on a connection of its own and, when notified, reads what it has
not applied yet (``on_news``, the Revoker's catch-up, which keeps the sequence order). A
notification can be lost with its connection, so the same catch-up also runs every
``poll_interval``, and the listening connection is replaced when it drops. SQLite has one writer
and needs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

REVOCATIONS_CHANNEL = "agentid_revocations"
RECONNECT_DELAY = 1.0


def notify_revocations(connection: Connection, last_sequence: int) -> None:
    """In a revoke job's transaction: tells the other replicas once it commits (PostgreSQL)."""
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": REVOCATIONS_CHANNEL, "payload": str(last_sequence)},
        )


class RevocationListener:
    """Runs ``on_news`` whenever another replica may have committed revocations."""

    def __init__(
        self, engine: AsyncEngine, on_news: Callable[[], Awaitable[None]], poll_interval: float
    ) -> None:
        self._engine = engine
        self._on_news = on_news
        self._poll_interval = poll_interval
        self._news = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while a LISTEN is in place (tests wait for it)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="revocation-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notified(self, *_args: Any) -> None:  # asyncpg: (connection, pid, channel, payload)
        self._news.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: listen again, catching up first
                log.warning("revocation listener: %s; listening again", type(exc).__name__)
            self.listening.clear()
            await asyncio.sleep(RECONNECT_DELAY)

    async def _listen(self) -> None:
        async with self._engine.connect() as connection:
            raw = await connection.get_raw_connection()
            listener = raw.driver_connection  # the asyncpg connection
            assert listener is not None
            await listener.add_listener(REVOCATIONS_CHANNEL, self._notified)
            self.listening.set()
            await self._on_news()  # what was committed before this LISTEN took effect
            while not listener.is_closed():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._news.wait(), self._poll_interval)
                self._news.clear()
                await self._on_news()
            raise ConnectionError("the listening connection closed")

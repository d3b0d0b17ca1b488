"""Property: after any interleaving of revocations and reconnects, what a watcher assembled from
snapshots and events equals the database's revoked set, and events never skip or repeat: also
when Revokes are written in small slices and bursts overflow a small watch buffer (a fresh
snapshot mid-stream)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from agentid_server.domain.model import (
    ActorKind,
    AuditEvent,
    EventType,
    ServicePrincipal,
    SessionRecord,
)
from agentid_server.domain.model import Role as R
from agentid_server.domain.ports import SystemClock
from agentid_server.domain.revocation import Revocation, RevocationHub, RevocationSet, Snapshot
from agentid_server.domain.revoking import Revoker
from agentid_server.storage import tables
from agentid_server.storage.database import create_engines, migrate
from agentid_server.storage.journal import Journal
from agentid_server.storage.repositories import RevocationRepository
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap
from sqlalchemy import select

ADMIN = ServicePrincipal("ops", frozenset({R.ADMIN}), "ops")
SESSIONS = 10
ULID_CHARS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class Watcher:
    """A service keeping a local revoked set in sync, as the README describes."""

    def __init__(self, revoker: Revoker) -> None:
        self.revoker = revoker
        self.serials: set[int] = set()
        self.last = 0
        self.task: asyncio.Task[None] | None = None

    def connect(self) -> None:
        self.task = asyncio.create_task(self._consume(self.last))

    async def _consume(self, after: int) -> None:
        async for item in self.revoker.watch(after):
            if isinstance(item, Snapshot):
                self.serials = set(BitMap.deserialize(item.revoked_serials))
                self.last = item.sequence
            else:
                assert isinstance(item, Revocation)
                assert item.sequence == self.last + 1, (item.sequence, self.last)
                self.serials.add(item.serial)
                self.last = item.sequence

    async def disconnect(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


def session_id(n: int) -> str:
    return "ses_" + "0" * 24 + ULID_CHARS[n // 32] + ULID_CHARS[n % 32]


async def scenario(
    parents: list[int | None],
    operations: list[tuple[str, int]],
    buffer: int = 1000,
    slice_size: int = 1000,
) -> None:
    folder = Path(tempfile.mkdtemp())
    engines = create_engines(f"sqlite+aiosqlite:///{folder / 'p.db'}")
    await migrate(engines.main)
    journal = Journal(engines.main, engines.sqlite_writer, max_batch=64)
    journal.start()
    try:
        now = int(time.time())
        for n, parent in enumerate(parents):
            record = SessionRecord(
                id=session_id(n), serial=n + 1, user_id="alice", agent_id="bot", scopes=("a",),
                audiences=(), task="", jkt="", created_at=now, expires_at=now + 600,
                parent_id=session_id(parent) if parent is not None else "",
            )  # fmt: skip
            await journal.append(
                AuditEvent(
                    time=now,
                    event_type=EventType.DELEGATE,
                    actor_kind=ActorKind.USER,
                    actor_id="alice",
                ),
                new_session=record,
            )
        revoked = RevocationSet()
        revoker = Revoker(
            store=RevocationRepository(engines.main, journal),
            revoked=revoked,
            hub=RevocationHub(capacity=buffer),
            clock=SystemClock(),
            slice_size=slice_size,
        )
        watcher = Watcher(revoker)
        watcher.connect()
        for op, n in operations:
            if op == "revoke":
                await revoker.revoke(ADMIN, session_id=session_id(n), user_id="", reason="p")
            elif op == "reconnect":
                await watcher.disconnect()
                watcher.connect()
            else:
                await asyncio.sleep(0)  # let the watcher run a little
        for _ in range(2500):  # at most 5 s, on a loaded machine; done as soon as caught up
            if watcher.last == revoked.applied_sequence:
                break
            await asyncio.sleep(0.002)
        async with engines.main.connect() as connection:
            rows = (await connection.execute(select(tables.revocations.c.serial))).all()
        assert watcher.serials == {row.serial for row in rows}
        assert watcher.last == revoked.applied_sequence
        await watcher.disconnect()
    finally:
        await journal.stop()
        # Whatever else still runs on this example's loop ends here, while the loop is open: a
        # task cancelled later, by asyncio.run's shutdown, left an aiosqlite worker thread
        # answering a closed loop (an unhandled thread exception).
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await engines.dispose()


@st.composite
def forests(draw: st.DrawFn) -> list[int | None]:
    return [
        draw(st.one_of(st.none(), st.integers(0, n - 1))) if n else None for n in range(SESSIONS)
    ]


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("revoke"), st.integers(0, SESSIONS - 1)),
        st.tuples(st.just("reconnect"), st.just(0)),
        st.tuples(st.just("yield"), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parents=forests(),
    operations=OPERATIONS,
    buffer=st.sampled_from([1, 2, 1000]),
    slice_size=st.sampled_from([1, 3, 1000]),
)
def test_snapshot_plus_events_equal_the_database(
    parents: list[int | None], operations: Any, buffer: int, slice_size: int
) -> None:
    asyncio.run(scenario(parents, operations, buffer, slice_size))

"""Forgetting revocations whose tokens have expired, without ever forgetting a live one.

A revocation may leave the revocation set once its token has expired: Check refuses the token by
its `exp` anyway. "Expired" is judged by the wall clock, which can be set. Stepped forward (by
hand, by a wrong time source) it makes live revocations look expired, and forgotten then, their
sessions would be allowed again once the clock is put right. So:

* the set is pruned by a clock that never runs ahead of the time that has really passed (the
  monotonic clock) since the server started (``PruneClock``), and follows the wall clock at once
  when it goes back;
* when the wall clock goes back before what was already forgotten (a server started with a clock
  ahead, then put right), those entries are put back from the store at once;
* the store keeps every revocation on its session (`revoked_at`, never pruned): the set is built
  from there at start, so a pruned revocation history loses nothing.

Not a persisted high-water mark of the wall clock: one step far ahead would raise it for good,
and pruning by it would forget live revocations once the clock came back. Across a restart
nothing measures the time that passed, so a server started with its clock ahead prunes by it;
what it forgot comes back from the sessions as soon as its clock is put right.
"""

from __future__ import annotations

from typing import Protocol

from agentid_server.domain.ports import Clock
from agentid_server.domain.revocation import RevocationSet


class PruneClock:
    """The wall clock, never ahead of the monotonic time passed since the first reading."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._time = clock.now()
        self._ticks = clock.monotonic()

    def now(self) -> float:
        """min(the wall clock, the last reading + the monotonic time passed since)."""
        wall, ticks = self._clock.now(), self._clock.monotonic()
        self._time = min(wall, self._time + max(0.0, ticks - self._ticks))
        self._ticks = ticks
        return self._time


class RevokedSessions(Protocol):
    async def revoked_serials(self, after: int, until: int | None = None) -> list[int]:
        """Serials of the revoked sessions whose token expires in (after, until]."""
        ...

    async def prune_history(self, expired_before: int) -> int:
        """Deletes the revocation history of tokens that expired before then; how many rows."""
        ...


class RevocationPruner:
    """Keeps the revocation set to the revocations whose tokens have not expired."""

    def __init__(
        self,
        revoked: RevocationSet,
        store: RevokedSessions,
        clock: Clock,
        *,
        loaded_through: int,
        history_retention: float,
    ) -> None:
        """``loaded_through``: the set holds every revocation whose token expires after it."""
        self._revoked = revoked
        self._store = store
        self._wall = clock
        self._clock = PruneClock(clock)
        self._through = loaded_through  # the set holds every revocation expiring after this
        self._retention = history_retention

    async def prune(self) -> tuple[int, int]:
        """Forgets the entries expired by the prune clock and deletes history older than the
        retention; (entries forgotten, history rows deleted)."""
        await self.put_back()
        now = int(self._clock.now())
        forgotten = 0
        if now > self._through:
            forgotten = self._revoked.forget(await self._store.revoked_serials(self._through, now))
            self._through = now
        deleted = await self._store.prune_history(int(now - self._retention))
        return forgotten, deleted

    async def put_back(self) -> int:
        """When the wall clock is now before what was forgotten, puts back the entries whose
        tokens it makes live again; how many were missing. Reads the store only then."""
        wall = int(self._wall.now())
        if wall >= self._through:
            return 0
        restored = self._revoked.restore(await self._store.revoked_serials(wall, self._through))
        self._through = wall
        return restored

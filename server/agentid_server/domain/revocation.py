"""Revocation on the hot path and to every watcher.

* ``RevocationSet``: the revoked session serials as a Roaring bitmap, with the sequence of the
  last revocation applied. `sn in set` is what Check asks; entries leave once their token expired
  (the wrap of `sn` after 2^32 sessions is safe for the same reason: a serial comes round again
  only long after every token that carried it before has expired).
* ``RevocationHub``: the in-process fan-out of revocation events to watchers (fanout.Hub).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from pyroaring import BitMap

from agentid_server.domain.fanout import Hub

SERIAL_SPACE = 1 << 32


def serial_bit(serial: int) -> int:
    """The bit of a session serial in the bitmap (`sn` wraps after 2^32 sessions)."""
    return serial % SERIAL_SPACE


@dataclass(frozen=True, slots=True)
class Revocation:
    sequence: int
    session_id: str
    serial: int
    user_id: str
    reason: str
    revoked_at: float
    expires_at: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every revocation up to ``sequence``, as the portable Roaring serialization of serials."""

    sequence: int
    revoked_serials: bytes
    count: int


class RevocationSet:
    """Revoked serials plus the sequence of the last revocation applied to them."""

    def __init__(self) -> None:
        self._bitmap = BitMap()
        self.applied_sequence = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap by sequence
        self._waiter_ids = 0
        self._gave_up = 0  # waiters in the heap whose caller stopped waiting

    def __contains__(self, serial: int) -> bool:
        return serial_bit(serial) in self._bitmap

    def __len__(self) -> int:
        return len(self._bitmap)

    def apply(self, revocation: Revocation) -> None:
        """Adds one revocation; sequences arrive in order."""
        self._bitmap.add(serial_bit(revocation.serial))
        self.advance(revocation.sequence)

    def advance(self, sequence: int) -> None:
        """Records that every revocation up to ``sequence`` is applied; wakes those waiting."""
        if sequence <= self.applied_sequence:
            return
        self.applied_sequence = sequence
        waiters = self._waiters
        while waiters and waiters[0][0] <= sequence:
            _, _, future = heapq.heappop(waiters)
            if not future.done():
                future.set_result(None)
        self._gave_up = min(self._gave_up, len(waiters))

    async def wait_applied(self, sequence: int, budget: float) -> bool:
        """Waits until ``sequence`` is applied; False when ``budget`` seconds pass first."""
        if sequence <= self.applied_sequence:
            return True
        if budget <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter_ids += 1
        heapq.heappush(self._waiters, (sequence, self._waiter_ids, future))
        try:
            await asyncio.wait_for(future, budget)
        except TimeoutError:
            self._forget_abandoned()
            return False
        return True

    def _forget_abandoned(self) -> None:
        """Waiters that timed out leave the heap once they are half of it, so a sequence this
        replica cannot apply for a while does not grow the heap with every Check asking."""
        self._gave_up += 1
        if self._gave_up * 2 > len(self._waiters):
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)
            self._gave_up = 0

    def forget(self, serials: Iterable[int]) -> int:
        """Drops the entries of tokens that have expired (the `exp` check refuses them anyway);
        returns how many were dropped. Only the bitmap is kept in memory: which entries expired
        when is asked of the store, so a million revoked sessions cost about what their bitmap
        costs."""
        expired = BitMap(serial_bit(s) for s in serials)
        before = len(self._bitmap)
        self._bitmap -= expired
        return before - len(self._bitmap)

    def restore(self, serials: Iterable[int]) -> int:
        """Puts back entries forgotten too early (the clock went back: their tokens are live
        again as this server sees them); returns how many were missing."""
        before = len(self._bitmap)
        self._bitmap.update(serial_bit(s) for s in serials)
        return len(self._bitmap) - before

    def holds(self, serial: int, sequence: int) -> bool:
        """Whether the revocation of ``serial`` written as ``sequence`` is in the set, or will
        be once the sequences before it are applied. Safe from another thread: two plain reads,
        each one step under the GIL."""
        return sequence > self.applied_sequence or serial_bit(serial) in self._bitmap

    def snapshot(self) -> Snapshot:
        """The current set, consistent with ``applied_sequence`` (taken without an await)."""
        return Snapshot(self.applied_sequence, bytes(self._bitmap.serialize()), len(self._bitmap))


RevocationHub = Hub[Revocation]

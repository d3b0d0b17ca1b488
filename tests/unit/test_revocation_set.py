"""The revocation set: membership with the 32-bit wrap, forgetting, snapshots, and waiting for a
sequence (what Check's min_revocation_sequence uses)."""

from __future__ import annotations

import asyncio

from agentid_server.domain.revocation import Revocation, RevocationSet
from pyroaring import BitMap


def revocation(sequence: int, serial: int) -> Revocation:
    return Revocation(sequence, f"s{sequence}", serial, "alice", "", 0.0, 0)


def test_membership_wraps_at_32_bits_and_forgets() -> None:
    revoked = RevocationSet()
    revoked.apply(revocation(1, 7))
    revoked.apply(revocation(2, (1 << 32) + 9))
    assert 7 in revoked
    assert 9 in revoked
    assert (1 << 32) + 7 in revoked  # the same bit: safe because the old token expired long ago
    assert revoked.applied_sequence == 2
    assert revoked.forget([7, 123]) == 1
    assert 7 not in revoked
    snapshot = revoked.snapshot()
    assert (snapshot.sequence, snapshot.count) == (2, 1)
    assert list(BitMap.deserialize(snapshot.revoked_serials)) == [9]


async def test_waiting_for_a_sequence() -> None:
    revoked = RevocationSet()
    assert await revoked.wait_applied(0, 0)
    assert not await revoked.wait_applied(3, 0.01)  # times out
    waiter = asyncio.create_task(revoked.wait_applied(3, 5))
    await asyncio.sleep(0)
    revoked.apply(revocation(1, 1))
    revoked.apply(revocation(2, 2))
    await asyncio.sleep(0)
    assert not waiter.done()
    revoked.advance(3)
    assert await waiter


async def test_callers_that_stopped_waiting_do_not_pile_up() -> None:
    """A sequence this replica cannot apply for a while: every Check asking for it times out,
    and the heap of waiters stays bounded by the ones still waiting."""
    revoked = RevocationSet()
    still = asyncio.create_task(revoked.wait_applied(5, 30))
    await asyncio.sleep(0)
    for _ in range(1000):
        assert not await revoked.wait_applied(5, 0.0001)
    assert len(revoked._waiters) <= 3  # the one still waiting, and at most as many abandoned
    revoked.advance(5)
    assert await still

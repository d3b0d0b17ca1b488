"""A wall clock that is set forward and back (by hand, by a wrong time source) never makes a
revoked session live again: not while running, not after a restart, and a Revoke puts back a
revocation that was lost. The server's clock is the injected FakeClock: ``step`` sets the wall
clock alone, ``advance`` is time really passing."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from agentid.v1 import agentid_pb2 as pb
from google.protobuf.duration_pb2 import Duration
from pyroaring import BitMap

from tests.conftest import (
    ADMIN_KEY,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    running_harness,
    with_config,
)

FAST_PRUNE = with_config(revocation={"prune_interval": "20ms", "history_retention": "1s"})
REVOKED = (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)


async def revoke(h: Harness, session_id: str) -> pb.RevokeResponse:
    request = pb.RevokeRequest(session_id=session_id)
    return await h.stub.Revoke(request, metadata=bearer(ADMIN_KEY))


async def decision(h: Harness, token: str) -> tuple[int, int]:
    answer = await h.check(token, "tickets.read")
    return answer.decision, answer.reason


async def snapshot(h: Harness) -> set[int]:
    stream = h.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(WATCH_KEY))
    try:
        first = await asyncio.wait_for(stream.read(), 5)
        return set(BitMap.deserialize(first.snapshot.revoked_serials))
    finally:
        stream.cancel()


def history(h: Harness) -> set[str]:
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        return {row[0] for row in db.execute("SELECT session_id FROM revocations")}


async def eventually(condition: Any, what: str) -> None:
    for _ in range(250):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


async def test_a_clock_stepped_ahead_then_back_never_allows_a_revoked_session(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=FAST_PRUNE) as h:
        live = await h.delegate(ttl=Duration(seconds=120))
        marker = await h.delegate(ttl=Duration(seconds=60))  # truly expires below
        for session in (live, marker):
            await revoke(h, session.session_id)
        clock.step(300)  # the wall clock runs 5 minutes ahead ...
        clock.advance(61)  # ... while a minute really passes: the marker's token expires

        async def marker_pruned() -> bool:
            return marker.serial not in await snapshot(h)

        await eventually(marker_pruned, "the expired revocation is pruned")
        assert await snapshot(h) == {live.serial}  # its token is live: kept
        clock.step(-300)  # the clock is put right: the token is valid again
        assert await decision(h, live.token) == REVOKED


async def test_history_pruned_by_a_clock_ahead_loses_no_revocation_across_a_restart(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=FAST_PRUNE) as h:
        live = await h.delegate(ttl=Duration(seconds=600))
        marker = await h.delegate(ttl=Duration(seconds=60))
        for session in (live, marker):
            await revoke(h, session.session_id)
        clock.step(7200)  # two hours ahead: past the live token's expiry and the retention
        clock.advance(62)  # the marker's token expired (and its 1 s retention) for real

        async def marker_history_pruned() -> bool:
            return marker.session_id not in history(h)

        await eventually(marker_history_pruned, "the expired history is pruned")
        assert history(h) == {live.session_id}
    clock.step(-7200)  # restarted with the clock put right, on the same database
    async with running_harness(tmp_path, idp, clock, mutate=FAST_PRUNE) as h:
        assert await decision(h, live.token) == REVOKED
        assert (await revoke(h, live.session_id)).session_ids == []  # nothing was lost


async def test_a_server_started_with_its_clock_ahead_puts_revocations_back_when_it_is_put_right(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """The one thing a clock ahead at start can do: its history pruning deletes live tokens'
    revocation rows. The revocations themselves come back from the sessions as soon as the
    clock is put right, and a Revoke re-applies one with a new sequence for every watcher."""
    async with running_harness(tmp_path, idp, clock) as h:
        live = await h.delegate(ttl=Duration(seconds=600))
        first = await revoke(h, live.session_id)
    clock.step(7200)
    async with running_harness(tmp_path, idp, clock, mutate=FAST_PRUNE) as h:

        async def history_pruned() -> bool:
            return live.session_id not in history(h)

        await eventually(history_pruned, "the clock ahead prunes the live token's history")
        clock.step(-7200)

        async def denied() -> bool:
            return await decision(h, live.token) == REVOKED

        await eventually(denied, "the revocation is put back once the clock is right")
        assert live.serial in await snapshot(h)
        stream = h.stub.WatchRevocations(
            pb.WatchRevocationsRequest(after_sequence=first.revocation_sequence),
            metadata=bearer(WATCH_KEY),
        )
        again = await revoke(h, live.session_id)  # its history row was lost: re-applied
        assert list(again.session_ids) == [live.session_id]
        assert again.revocation_sequence == first.revocation_sequence + 1
        event = (await asyncio.wait_for(stream.read(), 5)).event
        assert (event.sequence, event.serial) == (again.revocation_sequence, live.serial)
        stream.cancel()
        assert history(h) == {live.session_id}
        assert (await revoke(h, live.session_id)).session_ids == []  # now held: a no-op


async def test_revoke_reapplies_a_revocation_the_set_has_lost(harness: Harness) -> None:
    live = await harness.delegate()
    first = await revoke(harness, live.session_id)
    assert await decision(harness, live.token) == REVOKED
    harness.running.revocations.forget([live.serial])  # lost, however that came about
    again = await revoke(harness, live.session_id)
    assert list(again.session_ids) == [live.session_id]
    assert again.revocation_sequence == first.revocation_sequence + 1
    assert await decision(harness, live.token) == REVOKED
    assert (await revoke(harness, live.session_id)).session_ids == []

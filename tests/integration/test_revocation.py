"""Revoke, cascade, WatchRevocations and consistency over real gRPC with a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from google.protobuf.duration_pb2 import Duration
from pyroaring import BitMap

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    error_info,
    running_harness,
    start_harness,
    with_config,
)

FAST_PRUNE = with_config(revocation={"prune_interval": "20ms", "history_retention": "1s"})


async def revoke(h: Harness, credential: str, **target: Any) -> pb.RevokeResponse:
    return await h.stub.Revoke(pb.RevokeRequest(**target), metadata=bearer(credential))


async def sub_delegate(
    h: Harness, parent: pb.DelegateResponse, **fields: Any
) -> pb.DelegateResponse:
    fields.setdefault("agent_id", "support-bot")
    fields.setdefault("scopes", ["tickets.read", "agentid.delegate"])
    return await h.sub_delegate(parent.token, **fields)


async def family(
    h: Harness,
) -> tuple[pb.DelegateResponse, pb.DelegateResponse, pb.DelegateResponse]:
    root = await h.delegate(scopes=["tickets.*", "agentid.delegate"], ttl=Duration(seconds=1800))
    child = await sub_delegate(h, root)
    grandchild = await sub_delegate(h, child, agent_id="sub-bot", scopes=["tickets.read"])
    return root, child, grandchild


def revoked_in_db(h: Harness) -> dict[str, int]:
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        return dict(db.execute("SELECT session_id, sequence FROM revocations").fetchall())


async def test_revoke_denies_the_next_check_and_cascades(harness: Harness) -> None:
    root, child, grandchild = await family(harness)
    other = await harness.delegate()
    for session in (root, child, grandchild):
        assert (await harness.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    user = harness.idp.token()
    response = await revoke(harness, user, session_id=child.session_id, reason="done")
    assert list(response.session_ids) == [child.session_id, grandchild.session_id]
    assert response.revocation_sequence == 2
    for session in (child, grandchild):
        check = await harness.check(session.token, "tickets.read")
        assert (check.decision, check.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
        assert check.revocation_sequence == 2
    assert (await harness.check(root.token, "tickets.read")).decision == pb.DECISION_ALLOW
    assert (await harness.check(other.token, "tickets.read")).decision == pb.DECISION_ALLOW
    assert revoked_in_db(harness) == {child.session_id: 1, grandchild.session_id: 2}
    # One audit record per revoked session, actor the user, reason recorded.
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        rows = db.execute(
            "SELECT session_id, actor_kind, actor_id, detail FROM audit_records WHERE event_type = ? ORDER BY id",
            (pb.EVENT_TYPE_REVOKE,),
        ).fetchall()
    assert rows == [
        (child.session_id, pb.ACTOR_KIND_USER, "alice", "done"),
        (grandchild.session_id, pb.ACTOR_KIND_USER, "alice", "done"),
    ]


async def test_revoking_again_is_not_an_error(harness: Harness) -> None:
    session = await harness.delegate()
    first = await revoke(harness, harness.idp.token(), session_id=session.session_id)
    again = await revoke(harness, harness.idp.token(), session_id=session.session_id)
    assert list(first.session_ids) == [session.session_id]
    assert list(again.session_ids) == []
    assert again.revocation_sequence == first.revocation_sequence


async def test_a_session_no_longer_live_is_authorized_by_its_own_row(harness: Harness) -> None:
    """The root is not among the slice's live sessions once expired, so it is read alone: its
    user may revoke it (nothing is left to revoke), another user may not."""
    session = await harness.delegate(ttl=Duration(seconds=60))
    harness.clock.advance(120)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(harness, harness.idp.token(sub="bob"), session_id=session.session_id)
    assert error_info(caught.value).reason == "NOT_YOUR_SESSION"
    done = await revoke(harness, harness.idp.token(), session_id=session.session_id)
    assert list(done.session_ids) == []
    assert revoked_in_db(harness) == {}


async def test_a_revoked_agent_can_no_longer_call(harness: Harness) -> None:
    root, child, _ = await family(harness)
    await revoke(harness, harness.idp.token(), session_id=root.session_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sub_delegate(harness, child)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "SESSION_REVOKED"


async def test_who_may_revoke_a_session(harness: Harness) -> None:
    root, child, grandchild = await family(harness)
    sibling = await sub_delegate(harness, root)
    bob = harness.idp.token(sub="bob")
    denied = [
        (bob, child.session_id),  # another user
        (grandchild.token, child.session_id),  # a descendant may not revoke its ancestor
        (sibling.token, child.session_id),  # nor a sibling
    ]
    for credential, target in denied:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await revoke(harness, credential, session_id=target)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "NOT_YOUR_SESSION"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(
            harness, CHECK_KEY, session_id=child.session_id
        )  # a check service is not admin
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An ancestor may revoke a descendant; the agent may end itself; admin anything.
    assert list(
        (await revoke(harness, root.token, session_id=grandchild.session_id)).session_ids
    ) == [grandchild.session_id]
    assert list(
        (
            await revoke(
                harness, sibling.token, session_id=sibling.session_id, reason="task_complete"
            )
        ).session_ids
    ) == [sibling.session_id]
    assert list((await revoke(harness, ADMIN_KEY, session_id=child.session_id)).session_ids) == [
        child.session_id
    ]


async def test_a_refused_revoke_writes_nothing(harness: Harness) -> None:
    """Refused in the revoking transaction itself (unknown session, not the caller's): no
    revocation, no sequence taken, no audit record."""
    root, child, _ = await family(harness)
    before = harness.running.revocations.applied_sequence
    unknown = "ses_" + "0" * 26
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(harness, ADMIN_KEY, session_id=unknown)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "SESSION_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(harness, harness.idp.token(sub="bob"), session_id=child.session_id)
    assert error_info(caught.value).reason == "NOT_YOUR_SESSION"
    assert harness.running.revocations.applied_sequence == before
    assert revoked_in_db(harness) == {}
    records = harness.stub.Audit(pb.AuditRequest(), metadata=bearer(ADMIN_KEY))
    assert pb.EVENT_TYPE_REVOKE not in [r.record.event_type async for r in records]
    # The next revocation takes the next sequence: none was used up by the refusals.
    response = await revoke(harness, ADMIN_KEY, session_id=root.session_id)
    assert response.revocation_sequence == before + 3  # root, child and grandchild


async def test_revoke_every_session_of_a_user(harness: Harness) -> None:
    mine = [await harness.delegate() for _ in range(3)]
    bobs = await harness.delegate(harness.idp.token(sub="bob"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(harness, harness.idp.token(), user_id="bob")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(harness, mine[0].token, user_id="alice")  # agents cannot revoke a user
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    response = await revoke(harness, harness.idp.token(), user_id="alice", reason="lost laptop")
    assert sorted(response.session_ids) == sorted(s.session_id for s in mine)
    assert (await harness.check(bobs.token, "tickets.read")).decision == pb.DECISION_ALLOW
    assert list((await revoke(harness, ADMIN_KEY, user_id="bob")).session_ids) == [bobs.session_id]
    assert list((await revoke(harness, ADMIN_KEY, user_id="nobody")).session_ids) == []


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"session_id": "not-a-session"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"session_id": "ses_01ARZ3NDEKTSV4RRFFQ69G5FAV"}, grpc.StatusCode.NOT_FOUND),
        ({"user_id": "alice\x00"}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            {"session_id": "ses_01ARZ3NDEKTSV4RRFFQ69G5FAV", "reason": "x" * 600},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        *(
            ({"session_id": "ses_01ARZ3NDEKTSV4RRFFQ69G5FAV", "reason": f"done{c}"},
             grpc.StatusCode.INVALID_ARGUMENT)
            for c in ("\x00", "\x1b[2J", "\u202e", "\x7f")
        ),
    ],
)  # fmt: skip
async def test_bad_revoke_requests(
    harness: Harness, target: dict[str, str], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await revoke(harness, ADMIN_KEY, **target)
    assert caught.value.code() == code


# -- WatchRevocations ----------------------------------------------------------------------------


async def next_item(stream: Any, within: float = 5) -> pb.WatchRevocationsResponse:
    item = await asyncio.wait_for(stream.read(), within)
    if item is grpc.aio.EOF:
        raise StopAsyncIteration
    assert isinstance(item, pb.WatchRevocationsResponse)
    return item


def watch(h: Harness, after: int = 0, key: str = WATCH_KEY) -> Any:
    return h.stub.WatchRevocations(
        pb.WatchRevocationsRequest(after_sequence=after), metadata=bearer(key)
    )


async def test_watch_starts_with_a_snapshot_then_pushes_live_events(harness: Harness) -> None:
    early = await harness.delegate()
    await revoke(harness, ADMIN_KEY, session_id=early.session_id)
    stream = watch(harness)
    first = await next_item(stream)
    assert first.WhichOneof("kind") == "snapshot"
    assert first.snapshot.sequence == 1
    assert first.snapshot.count == 1
    assert list(BitMap.deserialize(first.snapshot.revoked_serials)) == [early.serial]
    late = await harness.delegate()
    response = await revoke(harness, harness.idp.token(), session_id=late.session_id, reason="bye")
    event = (await next_item(stream)).event
    assert (event.sequence, event.session_id, event.serial, event.user_id, event.reason) == (
        response.revocation_sequence,
        late.session_id,
        late.serial,
        "alice",
        "bye",
    )
    assert event.expires_at.seconds == late.expires_at.seconds
    stream.cancel()


async def test_watch_resumes_exactly_after_a_sequence(harness: Harness) -> None:
    sessions = [await harness.delegate() for _ in range(5)]
    for s in sessions:
        await revoke(harness, ADMIN_KEY, session_id=s.session_id)
    stream = watch(harness, after=2)
    events = [(await next_item(stream)).event for _ in range(3)]
    assert [e.sequence for e in events] == [3, 4, 5]
    assert [e.session_id for e in events] == [s.session_id for s in sessions[2:]]
    newest = await harness.delegate()
    await revoke(harness, ADMIN_KEY, session_id=newest.session_id)
    assert (await next_item(stream)).event.sequence == 6
    stream.cancel()
    caught_up = watch(harness, after=6)  # nothing missed: no snapshot, just live events
    another = await harness.delegate()
    await revoke(harness, ADMIN_KEY, session_id=another.session_id)
    item = await next_item(caught_up)
    assert item.WhichOneof("kind") == "event"
    assert item.event.sequence == 7
    caught_up.cancel()


async def test_watch_from_the_future_is_out_of_range(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_item(watch(harness, after=99))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(caught.value)
    assert info.reason == "SEQUENCE_IN_THE_FUTURE"
    assert info.metadata["last_sequence"] == "0"


async def test_who_may_watch(harness: Harness) -> None:
    for credential in (harness.idp.token(), (await harness.delegate()).token):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await next_item(watch(harness, key=credential))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for key in (CHECK_KEY, WATCH_KEY, ADMIN_KEY):
        stream = watch(harness, key=key)
        assert (await next_item(stream)).WhichOneof("kind") == "snapshot"
        stream.cancel()


async def test_a_burst_larger_than_the_buffer_reaches_a_watcher_as_a_fresh_snapshot(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A mass Revoke of more sessions than a watcher's buffer holds, written in slices: the
    watcher stays connected, gets a fresh snapshot in place of what it could not buffer, and
    ends with the database's set (before: RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW)."""
    mutate = with_config(revocation={"watch_buffer": 2, "revoke_slice": 4})
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
        stream = watch(h)
        assert (await next_item(stream)).WhichOneof("kind") == "snapshot"
        serials = {(await h.delegate()).serial for _ in range(10)}
        done = await revoke(h, ADMIN_KEY, user_id="alice")  # three slices: 4, 4, 2
        assert (len(done.session_ids), done.revocation_sequence) == (10, 10)
        assert len(revoked_in_db(h)) == 10
        revoked: set[int] = set()
        sequence, kinds = 0, []
        while sequence < done.revocation_sequence:
            item = await next_item(stream)
            kinds.append(item.WhichOneof("kind"))
            if item.HasField("snapshot"):
                revoked = set(BitMap.deserialize(item.snapshot.revoked_serials))
                sequence = item.snapshot.sequence
            else:
                assert item.event.sequence == sequence + 1
                revoked.add(item.event.serial)
                sequence = item.event.sequence
        assert "snapshot" in kinds
        assert revoked == serials
        late = await h.delegate()
        await revoke(h, ADMIN_KEY, session_id=late.session_id)
        event = (await next_item(stream)).event  # the same stream: still connected
        assert (event.sequence, event.serial) == (11, late.serial)
        stream.cancel()


async def test_a_mass_revoke_pages_past_sessions_revoked_before(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Slices page through the user's live sessions by serial: a first slice made only of
    sessions revoked already (skipped, still held) does not end the Revoke early, leaving the
    rest live."""
    mutate = with_config(revocation={"revoke_slice": 3})
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
        sessions = [await h.delegate() for _ in range(8)]
        for session in sessions[:4]:  # the lowest serials: more than one slice of them
            await revoke(h, ADMIN_KEY, session_id=session.session_id)
        done = await revoke(h, ADMIN_KEY, user_id="alice")
        assert sorted(done.session_ids) == sorted(s.session_id for s in sessions[4:])
        for session in sessions:
            answer = await h.check(session.token, "tickets.read")
            assert answer.reason == pb.REASON_SESSION_REVOKED


async def test_shutdown_ends_watch_streams_cleanly(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    h = await start_harness(tmp_path, idp, clock)
    stream = watch(h)
    assert (await next_item(stream)).WhichOneof("kind") == "snapshot"
    await h.running.stop(grace=5)
    with pytest.raises(StopAsyncIteration):
        await next_item(stream)
    assert await stream.code() == grpc.StatusCode.OK
    await h.channel.close()


async def test_expired_entries_are_pruned(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=FAST_PRUNE) as h:
        short = await h.delegate(ttl=Duration(seconds=60))
        long = await h.delegate(ttl=Duration(seconds=900))
        for s in (short, long):
            await revoke(h, ADMIN_KEY, session_id=s.session_id)
        clock.advance(120)
        await asyncio.sleep(0.2)
        stream = watch(h)
        snapshot = (await next_item(stream)).snapshot
        assert snapshot.count == 1
        assert list(BitMap.deserialize(snapshot.revoked_serials)) == [long.serial]
        assert snapshot.sequence == 2
        stream.cancel()
        assert set(revoked_in_db(h)) == {long.session_id}  # history past retention is deleted
        resumed = watch(h, after=0)
        assert (await next_item(resumed)).WhichOneof("kind") == "snapshot"
        resumed.cancel()


async def test_history_older_than_kept_yields_a_snapshot_first(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=FAST_PRUNE) as h:
        for _ in range(2):  # sequences 1 and 2: short-lived, their history is pruned below
            short = await h.delegate(ttl=Duration(seconds=60))
            await revoke(h, ADMIN_KEY, session_id=short.session_id)
        clock.advance(120)
        kept = await h.delegate()
        for _ in range(100):  # wait for the pruning pass
            if len(revoked_in_db(h)) == 0:
                break
            await asyncio.sleep(0.02)
        assert revoked_in_db(h) == {}
        await revoke(h, ADMIN_KEY, session_id=kept.session_id)  # sequence 3, kept
        # Resuming after 1 needs event 2, which is gone: a snapshot comes first, then live events.
        gap = watch(h, after=1)
        first = await next_item(gap)
        assert first.WhichOneof("kind") == "snapshot"
        assert first.snapshot.sequence == 3
        assert list(BitMap.deserialize(first.snapshot.revoked_serials)) == [kept.serial]
        gap.cancel()
        # Resuming after 2 needs only event 3, which is kept: no snapshot.
        exact = watch(h, after=2)
        item = await next_item(exact)
        assert (item.WhichOneof("kind"), item.event.sequence) == ("event", 3)
        exact.cancel()


# -- consistency ---------------------------------------------------------------------------------


async def test_min_revocation_sequence(harness: Harness) -> None:
    session = await harness.delegate()
    other = await harness.delegate()
    response = await revoke(harness, ADMIN_KEY, session_id=session.session_id)
    check = await harness.check(
        other.token, "tickets.read", min_revocation_sequence=response.revocation_sequence
    )
    assert check.decision == pb.DECISION_ALLOW
    assert check.revocation_sequence == response.revocation_sequence
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.check(
            other.token, "tickets.read", min_revocation_sequence=response.revocation_sequence + 10
        )
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_no_allow_after_revoke_returned_under_concurrent_load(harness: Harness) -> None:
    """Linearizable per replica: record each Check's start and end; none that started after
    Revoke returned may ALLOW."""
    sessions = [await harness.delegate() for _ in range(4)]
    records: list[tuple[float, float, str, int]] = []
    stop = asyncio.Event()

    async def checker(session: pb.DelegateResponse) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = await harness.check(session.token, "tickets.read")
            records.append((started, time.monotonic(), session.session_id, response.decision))

    workers = [asyncio.create_task(checker(s)) for s in sessions for _ in range(4)]
    await asyncio.sleep(0.2)
    returned: dict[str, float] = {}
    for s in sessions[:3]:
        await revoke(harness, ADMIN_KEY, session_id=s.session_id)
        returned[s.session_id] = time.monotonic()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*workers)
    late = [r for r in records if r[2] in returned and r[0] > returned[r[2]]]
    assert late, "no Check started after a Revoke returned: the test proves nothing"
    assert all(decision == pb.DECISION_DENY for *_, decision in late)
    survivor = [r for r in records if r[2] == sessions[3].session_id]
    assert all(decision == pb.DECISION_ALLOW for *_, decision in survivor)


async def test_a_sub_agent_delegated_while_its_parent_is_revoked_never_outlives_it(
    harness: Harness,
) -> None:
    """Sub-Delegates racing the Revoke of their parent (in one group commit or the next): each
    child is either refused (SESSION_REVOKED) or revoked with its parent, never left live."""
    refused = survived = 0
    for _ in range(10):
        parent = await harness.delegate(scopes=["tickets.read", "agentid.delegate"])

        *children, revoked = await asyncio.gather(
            *(harness.sub_delegate(parent.token) for _ in range(5)),
            revoke(harness, ADMIN_KEY, session_id=parent.session_id, reason="compromised"),
            return_exceptions=True,
        )
        assert isinstance(revoked, pb.RevokeResponse)
        assert parent.session_id in revoked.session_ids
        for delegated in children:
            if isinstance(delegated, grpc.aio.AioRpcError):
                assert delegated.code() == grpc.StatusCode.UNAUTHENTICATED
                assert error_info(delegated).reason == "SESSION_REVOKED"
                refused += 1
                continue
            assert isinstance(delegated, pb.DelegateResponse)
            survived += 1
            answer = await harness.check(delegated.token, "tickets.read")
            assert (answer.decision, answer.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    assert refused + survived == 50


async def test_a_sequence_written_elsewhere_but_not_applied_here_is_waited_for(
    harness: Harness,
) -> None:
    """As when another replica wrote it: the sequence exists in the store, this process has not
    applied it, so Check waits (bounded by its deadline) and then answers UNAVAILABLE."""
    session = await harness.delegate()
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'revocation_sequence'")
    request = pb.CheckRequest(token=session.token, action="tickets.read", min_revocation_sequence=1)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Check(request, metadata=bearer(CHECK_KEY), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "REVOCATION_SEQUENCE_NOT_APPLIED"
    assert time.monotonic() - started < 0.5  # answered before the deadline, not cut off by it
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await next_item(watch(harness, after=5))
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(caught.value).metadata["last_sequence"] == "1"  # written, not applied


def revoke_elsewhere(h: Harness, session: pb.DelegateResponse) -> None:
    """What another replica's Revoke leaves in the store (the next sequence and its row), with
    this process told nothing."""
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        serial, user, expires = db.execute(
            "SELECT serial, user_id, expires_at FROM sessions WHERE id = ?", (session.session_id,)
        ).fetchone()
        (sequence,) = db.execute(
            "UPDATE counters SET value = value + 1 WHERE name = 'revocation_sequence'"
            " RETURNING value"
        ).fetchone()
        db.execute(
            "INSERT INTO revocations VALUES (?, ?, ?, ?, 'elsewhere', ?, ?)",
            (sequence, session.session_id, serial, user, int(time.time()), expires),
        )


async def test_a_revocation_written_elsewhere_is_read_in_order(harness: Harness) -> None:
    """As when another replica committed it (its row in the store, not applied here): a Check
    with that min_revocation_sequence reads it at once and denies, and this process's next
    revocation reaches watchers after it, in one gap-free order."""
    elsewhere, here = await harness.delegate(), await harness.delegate()
    watcher = watch(harness)
    assert (await next_item(watcher)).snapshot.sequence == 0
    revoke_elsewhere(harness, elsewhere)
    answer = await harness.check(elsewhere.token, "tickets.read", min_revocation_sequence=1)
    assert (answer.decision, answer.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    done = await revoke(harness, ADMIN_KEY, session_id=here.session_id)
    assert done.revocation_sequence == 2
    events = [(await next_item(watcher)).event for _ in range(2)]
    assert [(e.sequence, e.session_id) for e in events] == [
        (1, elsewhere.session_id),
        (2, here.session_id),
    ]
    watcher.cancel()


async def test_a_revoke_after_a_gap_applies_the_earlier_revocation_first(
    harness: Harness,
) -> None:
    """Another writer committed sequence 1 and nobody here has read it: this process's own
    revocation (2) waits for it, and Revoke answers only once both are applied, in order."""
    elsewhere, here = await harness.delegate(), await harness.delegate()
    watcher = watch(harness)
    assert (await next_item(watcher)).snapshot.sequence == 0
    revoke_elsewhere(harness, elsewhere)
    done = await revoke(harness, ADMIN_KEY, session_id=here.session_id)
    assert done.revocation_sequence == 2
    answer = await harness.check(elsewhere.token, "tickets.read")  # no hint needed any more
    assert (answer.decision, answer.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    events = [(await next_item(watcher)).event for _ in range(2)]
    assert [e.sequence for e in events] == [1, 2]
    watcher.cancel()

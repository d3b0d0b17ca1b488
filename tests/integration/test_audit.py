"""The audit trail over real gRPC: the two questions, who may ask, cursors and filters, follow,
and the hash chain (a changed or removed row is found)."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.storage.writer_lock import WriterInUse
from google.protobuf.timestamp_pb2 import Timestamp

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    agentid_cli,
    bearer,
    error_info,
    running_harness,
    start_harness,
    with_config,
)


async def audit(h: Harness, credential: str = ADMIN_KEY, **fields: Any) -> list[pb.AuditRecord]:
    stream = h.stub.Audit(pb.AuditRequest(**fields), metadata=bearer(credential))
    return [response.record async for response in stream]


async def scenario(h: Harness) -> dict[str, Any]:
    """alice delegates to a root agent, which delegates to a child; checks happen; bob delegates
    too; alice revokes the child."""
    alice = h.idp.token()
    root = await h.delegate(alice, scopes=["tickets.*", "agentid.delegate"], task="root task")
    child = await h.sub_delegate(root.token)
    for token, action, resource in (
        (root.token, "tickets.read", "t/1"),
        (child.token, "tickets.read", "t/2"),
        (child.token, "tickets.delete", "t/3"),
    ):
        h.clock.advance(1)  # distinct times, for the time filters
        await h.check(token, action, resource)
    h.clock.advance(1)
    bob = await h.delegate(h.idp.token(sub="bob"))
    await h.check(bob.token, "tickets.read")
    h.clock.advance(1)
    await h.stub.Revoke(pb.RevokeRequest(session_id=child.session_id), metadata=bearer(alice))
    return {"root": root, "child": child, "bob": bob}


async def test_what_did_this_agent_do(harness: Harness) -> None:
    s = await scenario(harness)
    records = await audit(harness, session_id=s["root"].session_id)
    kinds = [(pb.EventType.Name(r.event_type), r.session_id) for r in records]
    assert kinds == [
        ("EVENT_TYPE_DELEGATE", s["root"].session_id),  # its own delegation
        ("EVENT_TYPE_DELEGATE", s["child"].session_id),  # the sub-agent it created
        ("EVENT_TYPE_CHECK", s["root"].session_id),
    ]
    subtree = await audit(harness, session_id=s["root"].session_id, include_descendants=True)
    assert {r.session_id for r in subtree} == {s["root"].session_id, s["child"].session_id}
    assert [pb.EventType.Name(r.event_type) for r in subtree].count("EVENT_TYPE_CHECK") == 3
    assert any(r.event_type == pb.EVENT_TYPE_REVOKE for r in subtree)
    for record in records:  # the three identifiers on every record
        assert record.session_id
        assert record.user_id == "alice"
        assert list(record.scopes)


async def test_what_did_this_user_authorise(harness: Harness) -> None:
    s = await scenario(harness)
    records = await audit(harness, harness.idp.token(), actor_kind=pb.ACTOR_KIND_USER)
    assert [(pb.EventType.Name(r.event_type), r.session_id) for r in records] == [
        ("EVENT_TYPE_DELEGATE", s["root"].session_id),
        ("EVENT_TYPE_REVOKE", s["child"].session_id),
    ]
    assert all(r.actor_id == "alice" for r in records)
    on_behalf = await audit(harness, harness.idp.token())  # user_id empty: themselves
    assert {r.user_id for r in on_behalf} == {"alice"}
    assert len(on_behalf) > len(records)


async def test_who_may_read(harness: Harness) -> None:
    s = await scenario(harness)
    bob = harness.idp.token(sub="bob")
    for fields in ({"user_id": "alice"}, {"session_id": s["root"].session_id}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await audit(harness, bob, **fields)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "NOT_YOUR_RECORDS"
    own = await audit(harness, harness.idp.token(), session_id=s["root"].session_id)
    assert own  # alice may ask about her own session
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit(harness, CHECK_KEY)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # (The config's agents, recorded at the first start, have no user.)
    assert {r.user_id for r in await audit(harness, ADMIN_KEY) if r.session_id} == {"alice", "bob"}


async def test_cursor_limit_and_filters(harness: Harness) -> None:
    harness.clock.advance(1)  # after the config's agents were recorded, at the start
    await scenario(harness)
    everything = await audit(harness)
    ids = [r.id for r in everything]
    assert ids == sorted(ids)
    first_two = await audit(harness, limit=2)
    rest = await audit(harness, after_id=first_two[-1].id)
    assert [r.id for r in first_two + rest] == ids
    checks = await audit(harness, event_types=[pb.EVENT_TYPE_CHECK])
    assert {r.event_type for r in checks} == {pb.EVENT_TYPE_CHECK}
    assert len(checks) == 4
    middle = everything[3].time
    since = await audit(harness, since=middle)  # inclusive
    assert since == [r for r in everything if r.time.ToNanoseconds() >= middle.ToNanoseconds()]
    assert since[0].id == everything[3].id
    until = await audit(harness, until=middle)  # exclusive
    assert until == [r for r in everything if r.time.ToNanoseconds() < middle.ToNanoseconds()]
    assert until


@pytest.mark.parametrize(
    "fields",
    [
        {"session_id": "nope"},
        {"include_descendants": True},
        {"since": Timestamp(seconds=2000), "until": Timestamp(seconds=1000)},
        {"actor_kind": 42},
        {"event_types": [99]},
        {"since": Timestamp(seconds=2**62)},
        {"until": Timestamp(seconds=-(2**62))},
        {"since": Timestamp(seconds=5, nanos=-1)},
    ],
)
async def test_bad_audit_requests(harness: Harness, fields: dict[str, Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit(harness, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_follow_sends_the_backlog_then_new_records(harness: Harness) -> None:
    session = await harness.delegate()
    stream = harness.stub.Audit(
        pb.AuditRequest(session_id=session.session_id, follow=True), metadata=bearer(ADMIN_KEY)
    )
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.record.event_type == pb.EVENT_TYPE_DELEGATE
    response = await harness.check(session.token, "tickets.read")
    live = await asyncio.wait_for(stream.read(), 5)
    assert (live.record.id, live.record.event_type) == (
        int(response.decision_id),
        pb.EVENT_TYPE_CHECK,
    )
    other = await harness.delegate()
    await harness.check(other.token, "tickets.read")  # not this session: not sent
    again = await harness.check(session.token, "tickets.read")
    assert (await asyncio.wait_for(stream.read(), 5)).record.id == int(again.decision_id)
    stream.cancel()


async def test_following_with_a_limit_sends_the_newest_of_the_backlog_then_everything_new(
    harness: Harness,
) -> None:
    """api.md: with follow, limit caps only the backlog sent before the live records. The
    backlog sent is its newest records (as tail -n N -f), so nothing falls between it and what
    comes live."""
    session = await harness.delegate()
    decided = [
        int((await harness.check(session.token, "tickets.read")).decision_id) for _ in range(8)
    ]
    stream = harness.stub.Audit(
        pb.AuditRequest(session_id=session.session_id, follow=True, limit=3),
        metadata=bearer(ADMIN_KEY),
    )
    backlog = [(await asyncio.wait_for(stream.read(), 5)).record.id for _ in range(3)]
    assert backlog == decided[-3:]
    later = [
        int((await harness.check(session.token, "tickets.read")).decision_id) for _ in range(4)
    ]
    live = [(await asyncio.wait_for(stream.read(), 5)).record.id for _ in range(4)]
    assert live == later  # live records are not capped
    stream.cancel()


# -- the hash chain ----------------------------------------------------------------------------------


async def verify(h: Harness, **fields: int) -> pb.VerifyAuditResponse:
    return await h.stub.VerifyAudit(pb.VerifyAuditRequest(**fields), metadata=bearer(ADMIN_KEY))


async def test_the_chain_verifies_and_links(harness: Harness) -> None:
    await scenario(harness)
    records = await audit(harness)
    result = await verify(harness)
    assert (result.ok, result.verified, result.first_bad_id) == (True, len(records), 0)
    assert result.head_hash == records[-1].hash
    assert records[0].prev_hash == bytes(32)
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    part = await verify(harness, from_id=records[2].id, to_id=records[4].id)
    assert (part.ok, part.verified) == (True, 3)


async def test_cursors_beyond_any_id_are_answered_not_crashed_on(harness: Harness) -> None:
    """The wire's uint64 ids go past the databases' signed 64 bits: past the last record there
    is nothing, and to_id that large means to the end."""
    records = await scenario_records(harness)
    for huge in (2**63 - 1, 2**63, 2**64 - 1):
        assert await audit(harness, after_id=huge) == []
        beyond = await verify(harness, from_id=huge)
        assert (beyond.ok, beyond.verified) == (True, 0)
        whole = await verify(harness, from_id=1, to_id=huge)
        assert (whole.ok, whole.verified) == (True, len(records))


async def scenario_records(h: Harness) -> list[pb.AuditRecord]:
    await scenario(h)
    return await audit(h)


async def test_a_changed_row_is_found(harness: Harness) -> None:
    await scenario(harness)
    records = await audit(harness)
    victim = records[4].id
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        db.execute("UPDATE audit_records SET decision = 1 WHERE id = ?", (victim,))
    result = await verify(harness)
    assert (result.ok, result.first_bad_id, result.verified) == (False, victim, 4)


async def test_a_removed_row_is_found(harness: Harness) -> None:
    await scenario(harness)
    records = await audit(harness)
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        db.execute("DELETE FROM audit_records WHERE id = ?", (records[3].id,))
    result = await verify(harness)
    assert (result.ok, result.first_bad_id) == (False, records[4].id)


async def test_the_chain_continues_across_a_restart(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    first = await start_harness(tmp_path, idp, clock)
    await scenario(first)
    await first.channel.close()
    await first.running.stop(grace=1)
    async with running_harness(tmp_path, idp, clock) as second:
        await scenario(second)
        result = await verify(second)
        assert result.ok
        assert result.verified == len(await audit(second))


async def test_a_second_server_on_the_same_sqlite_file_is_refused(
    harness: Harness, idp: IdpFixture, clock: FakeClock
) -> None:
    """Two writers of one file would number records alike and fork the chain."""
    with pytest.raises(WriterInUse, match="written by another agentid server"):
        await start_harness(harness.tmp_path, idp, clock)
    await scenario(harness)  # the first one is undisturbed
    assert (await verify(harness)).ok


# -- the terminal tool and the export ------------------------------------------------------------------


async def cli(h: Harness, credential: str, *args: str) -> tuple[int, str, str]:
    return await agentid_cli(h, "audit", credential, *args)


def rechain(line: dict[str, Any]) -> str:
    """docs/audit.md's auditor snippet, independent of the server's code."""
    import hashlib
    import json

    r = line
    canonical = json.dumps(
        [1, r["id"], r["chain_id"], r["time_us"], r["event_type"], r["session_id"], r["user_id"],
         json.dumps(r["scopes"], separators=(",", ":")), r["agent_id"], r["actor_kind"],
         r["actor_id"], r["action"], r["resource"], r["decision"], r["reason"],
         r["parent_session_id"], r["step_up_id"],
         None if r["context"] is None else json.dumps(r["context"], separators=(",", ":"), sort_keys=True),
         r["detail"]],
        ensure_ascii=False, separators=(",", ":"),
    ).encode()  # fmt: skip
    return hashlib.sha256(bytes.fromhex(r["prev_hash"]) + canonical).hexdigest()


async def test_export_can_be_rechained_by_an_auditor(harness: Harness) -> None:
    import json

    from google.protobuf import struct_pb2

    s = await scenario(harness)
    context = struct_pb2.Struct()
    context.update(
        {"z": 1, "amount": 2500.5, "note": "ünïcode", "tags": ["a", "b"], "nested": {"k": True}}
    )
    await harness.check(s["root"].token, "tickets.read", "t/9", context=context)
    code, out, err = await cli(harness, ADMIN_KEY, "export")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(await audit(harness))
    previous = "00" * 32
    for line in lines:
        assert line["prev_hash"] == previous
        assert rechain(line) == line["hash"]
        previous = line["hash"]
    assert lines[-1]["context"]["note"] == "ünïcode"


async def test_the_audit_command(harness: Harness) -> None:
    s = await scenario(harness)
    code, out, _ = await cli(harness, ADMIN_KEY, "--session", s["child"].session_id)
    assert code == 0
    assert "DELEGATE" in out
    assert "tickets.delete t/3" in out
    assert "SCOPE_NOT_GRANTED" in out
    code, out, _ = await cli(
        harness, harness.idp.token(), "--user", "alice", "--authorised", "--json"
    )
    assert code == 0
    assert [
        json_line["event_type"] for json_line in map(__import__("json").loads, out.splitlines())
    ] == [
        "EVENT_TYPE_DELEGATE",
        "EVENT_TYPE_REVOKE",
    ]
    code, out, _ = await cli(harness, ADMIN_KEY, "verify")
    assert code == 0
    assert out.startswith("ok: ")
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        db.execute("UPDATE audit_records SET detail = 'forged' WHERE id = 1")
    code, out, _ = await cli(harness, ADMIN_KEY, "verify")
    assert (code, out.strip()) == (1, "BROKEN at record 1 (0 verified before it)")
    code, _, err = await cli(harness, harness.idp.token(sub="bob"), "--user", "alice")
    assert code == 1
    assert "NOT_YOUR_RECORDS" in err


async def test_a_slow_follower_is_ended_and_resumes_by_cursor(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(
        tmp_path, idp, clock, mutate=with_config(revocation={"watch_buffer": 2})
    ) as h:
        for _ in range(6):
            await h.delegate()
        stream = h.stub.Audit(
            pb.AuditRequest(event_types=[pb.EVENT_TYPE_REVOKE], follow=True),
            metadata=bearer(ADMIN_KEY),
        )
        await asyncio.sleep(0.2)  # the follower is subscribed, the backlog is empty
        # One Revoke of six sessions commits six records at once: more than the buffer holds.
        await h.stub.Revoke(pb.RevokeRequest(user_id="alice"), metadata=bearer(ADMIN_KEY))
        seen: list[int] = []

        async def drain() -> None:
            while True:
                item = await asyncio.wait_for(stream.read(), 5)
                assert item is not grpc.aio.EOF
                seen.append(item.record.id)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await drain()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(seen) == 2
        rest = await audit(h, event_types=[pb.EVENT_TYPE_REVOKE], after_id=seen[-1])
        assert len(seen) + len(rest) == 6

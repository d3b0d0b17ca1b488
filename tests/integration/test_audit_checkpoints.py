"""The audit chain against someone who can write the database but does not hold the KEK: signed
checkpoints of the chain head (stored, logged, kept by a verifier) find a truncated tail and a
re-linked chain, a forged checkpoint is found, and the ids of deleted records are never handed
out again (docs/audit.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.storage.audit_chain import canonical_bytes, link
from agentid_server.storage.rows import AUDIT_COLUMNS
from cryptography.exceptions import InvalidSignature

from tests.conftest import (
    ADMIN_KEY,
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
from tests.integration.test_audit import audit, scenario


async def verify(
    h: Harness, *kept: str, checkpoint_now: bool = False, **fields: int
) -> pb.VerifyAuditResponse:
    request = pb.VerifyAuditRequest(checkpoints=kept, checkpoint_now=checkpoint_now, **fields)
    return await h.stub.VerifyAudit(request, metadata=bearer(ADMIN_KEY))


def database(h: Harness) -> sqlite3.Connection:
    return sqlite3.connect(h.tmp_path / "agentid.db")


def delete_tail(h: Harness, count: int, *, with_checkpoints: bool = False) -> list[int]:
    """What the attacker does: the last ``count`` records gone (and with them, if asked, every
    stored checkpoint, so only a copy outside the database can tell); their ids."""
    with database(h) as db:
        ids = [
            row[0]
            for row in db.execute("SELECT id FROM audit_records ORDER BY id DESC LIMIT ?", (count,))
        ]
        db.executemany("DELETE FROM audit_records WHERE id = ?", [(i,) for i in ids])
        if with_checkpoints:
            db.execute("DELETE FROM audit_checkpoints")
    return sorted(ids)


def relink_from(h: Harness, victim: int) -> None:
    """What the attacker does: changes a record and recomputes its hash and every later one of
    its chain with the public algorithm (docs/audit.md), so every link holds again."""
    columns = ", ".join(AUDIT_COLUMNS)
    with database(h) as db:
        db.execute("UPDATE audit_records SET decision = 1, reason = 1 WHERE id = ?", (victim,))
        (head,) = db.execute(
            "SELECT prev_hash FROM audit_records WHERE id = ?", (victim,)
        ).fetchone()
        rows = db.execute(
            f"SELECT id, chain_id, {columns} FROM audit_records WHERE id >= ? ORDER BY id",  # noqa: S608
            (victim,),
        ).fetchall()
        for record_id, chain_id, *values in rows:
            digest = link(head, canonical_bytes(record_id, chain_id, values))
            db.execute(
                "UPDATE audit_records SET prev_hash = ?, hash = ? WHERE id = ?",
                (head, digest, record_id),
            )
            head = digest


async def test_a_truncated_tail_is_found_with_a_kept_checkpoint(harness: Harness) -> None:
    await scenario(harness)
    kept = await verify(harness, checkpoint_now=True)
    assert kept.ok
    (checkpoint,) = kept.checkpoints
    last = (await audit(harness))[-1]
    assert (json.loads(checkpoint)["record_id"], json.loads(checkpoint)["hash"]) == (
        last.id,
        last.hash.hex(),
    )
    gone = delete_tail(harness, 3, with_checkpoints=True)  # the last one: alice's revocation
    assert gone[-1] == last.id
    # The database alone can no longer tell (docs/audit.md says so) ...
    assert (await verify(harness)).ok
    # ... the checkpoint the verifier kept can.
    result = await verify(harness, checkpoint)
    assert (result.ok, result.problem, result.first_bad_id) == (
        False,
        pb.AUDIT_PROBLEM_CHECKPOINT_RECORD_MISSING,
        last.id,
    )
    assert f"record {last.id} is missing" in result.detail


async def test_a_truncated_tail_is_found_by_the_checkpoint_written_at_stop(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    first = await start_harness(tmp_path, idp, clock)
    await scenario(first)
    last = (await audit(first))[-1].id
    await first.channel.close()
    await first.running.stop(grace=1)  # signs the head: a checkpoint of the last record
    async with running_harness(tmp_path, idp, clock) as second:
        delete_tail(second, 3)
        await scenario(second)  # the chain goes on from the truncated head
        result = await verify(second)
        assert (result.ok, result.problem, result.first_bad_id) == (
            False,
            pb.AUDIT_PROBLEM_CHECKPOINT_RECORD_MISSING,
            last,
        )


async def test_deleted_ids_are_never_handed_out_again(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    first = await start_harness(tmp_path, idp, clock)
    await scenario(first)
    with sqlite3.connect(tmp_path / "agentid.db") as db:  # committed with the records: a
        (top,) = db.execute("SELECT max(id) FROM audit_records").fetchone()  # crash keeps it
        (mark,) = db.execute("SELECT value FROM counters WHERE name = 'audit_next_id'").fetchone()
    assert mark > top
    await first.channel.close()
    await first.running.stop(grace=1)
    with sqlite3.connect(tmp_path / "agentid.db") as db:
        db.execute("DELETE FROM audit_records WHERE id > ?", (top - 3,))
    async with running_harness(tmp_path, idp, clock) as second:
        session = await second.delegate()
        records = await audit(second, session_id=session.session_id)
        assert records[0].id == top + 1  # above every id ever handed out, none skipped


async def test_a_relinked_chain_fails_the_checkpoint_that_covers_it(harness: Harness) -> None:
    await scenario(harness)
    assert (await verify(harness, checkpoint_now=True)).ok  # stored: covers every record
    # A DENY, to be turned into an ALLOW (records without a session: the config's agents).
    victim = [r for r in await audit(harness) if r.session_id][4]
    assert victim.decision == pb.DECISION_DENY
    relink_from(harness, victim.id)
    result = await verify(harness)
    last = (await audit(harness))[-1].id
    assert (result.ok, result.problem, result.first_bad_id) == (
        False,
        pb.AUDIT_PROBLEM_CHECKPOINT_MISMATCH,
        last,
    )
    assert result.verified == len(await audit(harness))  # every link holds: only the signature
    assert "re-linked" in result.detail


async def test_a_forged_checkpoint_is_found(harness: Harness) -> None:
    """The attacker re-links the chain and moves the stored checkpoint along to the new head:
    without the KEK the signature no longer fits."""
    await scenario(harness)
    genuine = await verify(harness, checkpoint_now=True)
    assert genuine.ok
    relink_from(harness, (await audit(harness))[4].id)
    with database(harness) as db:
        db.execute(
            "UPDATE audit_checkpoints SET hash ="
            " (SELECT hash FROM audit_records WHERE id = audit_checkpoints.record_id)"
        )
    result = await verify(harness)
    assert (result.ok, result.problem) == (False, pb.AUDIT_PROBLEM_CHECKPOINT_FORGED)
    assert "signature that does not verify" in result.detail
    forged = json.loads(genuine.checkpoints[0])
    forged["record_id"] -= 1  # a kept checkpoint edited by hand
    result = await verify(harness, json.dumps(forged))
    assert (result.ok, result.problem) == (False, pb.AUDIT_PROBLEM_CHECKPOINT_FORGED)


async def test_checkpoints_are_written_every_so_many_records_and_logged(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentid_server")
    async with running_harness(
        tmp_path, idp, clock, mutate=with_config(audit={"checkpoint_records": 3})
    ) as h:
        await scenario(h)
        with database(h) as db:
            stored = db.execute("SELECT count(*) FROM audit_checkpoints").fetchone()[0]
        assert stored >= 2  # 11 records, at most one batch each: one every 3 records or so
        result = await verify(h)
        assert result.ok
        logged = [r.getMessage() for r in caplog.records if "audit checkpoint {" in r.getMessage()]
        assert len(logged) == stored
        assert logged[-1].removeprefix("audit checkpoint ") == result.checkpoints[0]
    (key_line,) = [
        r.getMessage() for r in caplog.records if "signed with Ed25519" in r.getMessage()
    ]
    public_x = key_line.rsplit("public x=", 1)[1].rstrip(")")
    for line in logged:  # docs/audit.md's offline check, with the public key from the log
        offline_check(line.removeprefix("audit checkpoint "), public_x)
    forged = json.loads(logged[-1].removeprefix("audit checkpoint "))
    forged["record_id"] += 1
    with pytest.raises(InvalidSignature):
        offline_check(json.dumps(forged), public_x)


def offline_check(line: str, public_x: str) -> None:
    """docs/audit.md's snippet, independent of the server's code."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def b64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    c = json.loads(line)
    signed = ["agentid.audit.checkpoint", 1, c["chain_id"], c["record_id"], c["hash"], c["time_us"]]
    public = Ed25519PublicKey.from_public_bytes(b64(public_x))
    text = json.dumps(signed, ensure_ascii=False, separators=(",", ":"))
    public.verify(b64(c["sig"]), text.encode())


async def test_a_kept_checkpoint_must_be_one(harness: Harness) -> None:
    await scenario(harness)
    for kept, field in (
        (["not json"], "checkpoints[0]"),
        (['{"v":2}'], "checkpoints[0]"),
        (["{}"] * 65, "checkpoints"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await verify(harness, *kept)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or "")
        assert error_info(refused.value).reason == "INVALID_ARGUMENT"


async def test_the_command_keeps_a_checkpoint_and_verifies_against_it(
    harness: Harness, tmp_path: Path
) -> None:
    await scenario(harness)
    kept = tmp_path / "kept-checkpoint"
    code, out, err = await agentid_cli(
        harness, "audit", ADMIN_KEY, "verify", "--save-checkpoint", str(kept)
    )
    assert code == 0, err
    assert "checkpoint verified: chain main at record" in out
    (line,) = kept.read_text().splitlines()
    code, out, err = await agentid_cli(
        harness, "audit", ADMIN_KEY, "verify", "--checkpoint", str(kept)
    )
    assert code == 0, err
    printed = tmp_path / "printed"
    code, out, err = await agentid_cli(harness, "audit", ADMIN_KEY, "checkpoint")
    assert code == 0, err
    assert json.loads(out)["record_id"] == json.loads(line)["record_id"]
    printed.write_text(
        "2026-12-06 08:00:00,000 INFO agentid_server.app: serving\n"
        f"2026-12-06 08:00:01,000 INFO agentid_server.storage.journal: audit checkpoint {out}"
    )
    as_json = tmp_path / "json-log"
    as_json.write_text(
        json.dumps({"level": "INFO", "message": "serving"})
        + "\n"
        + json.dumps({"level": "INFO", "message": f"audit checkpoint {out.strip()}"})
    )
    last = delete_tail(harness, 3, with_checkpoints=True)[-1]
    for path in (kept, printed, as_json):  # a saved file, the server's log (text or JSON)
        code, out, err = await agentid_cli(
            harness, "audit", ADMIN_KEY, "verify", "--checkpoint", str(path)
        )
        assert code == 1, err
        assert out.startswith(f"FAILED (CHECKPOINT_RECORD_MISSING): record {last} is missing")


async def test_a_quiet_chain_is_checkpointed_after_the_interval(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Few records, far from checkpoint_records: the interval signs the head anyway."""
    config = with_config(audit={"checkpoint_records": 1000, "checkpoint_interval": "20ms"})
    async with running_harness(tmp_path, idp, clock, mutate=config) as h:
        session = await h.delegate()
        record_id = (await audit(h, session_id=session.session_id))[-1].id
        for _ in range(500):  # the test's bound, not the server's: about 5 s
            with database(h) as db:
                stored = db.execute("SELECT max(record_id) FROM audit_checkpoints").fetchone()
            if stored[0] == record_id:
                break
            await asyncio.sleep(0.01)
        assert stored[0] == record_id

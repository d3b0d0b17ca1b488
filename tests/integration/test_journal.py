"""The journal: group commit, jobs isolated by savepoints, and no decision without its record."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.domain.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from agentid_server.domain.model import ActorKind, AuditEvent, EventType, SessionRecord
from agentid_server.storage.database import create_engines, migrate
from agentid_server.storage.journal import (
    LINGER_GROUP,
    LINGER_SECONDS,
    LINGER_SECONDS_PER_WRITE,
    JobResult,
    Journal,
)
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from tests.conftest import Harness, error_info


def event(n: int) -> AuditEvent:
    return AuditEvent(
        time=time.time(),
        event_type=EventType.CHECK,
        actor_kind=ActorKind.SERVICE,
        actor_id=f"svc-{n}",
    )


@pytest.fixture(params=["inline", "thread"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}", writer_busy_timeout=0.2)
    await migrate(engines.main)
    journal = Journal(
        engines.main, engines.sqlite_writer, max_batch=100, sqlite_inline=request.param == "inline"
    )
    journal.start()
    yield journal
    await journal.stop()
    await engines.dispose()


async def test_concurrent_appends_get_distinct_increasing_ids(journal: Journal) -> None:
    ids = await asyncio.gather(*(journal.append(event(n)) for n in range(250)))
    assert sorted(ids) == list(range(1, 251))
    assert ids == sorted(ids)  # queued order is id order


@pytest.mark.parametrize("writer", ["inline", "thread"])
async def test_concurrent_records_share_commits_and_each_caller_returns_after_its_own(
    tmp_path: Path, writer: str
) -> None:
    """Group commit: 250 concurrent records go in a handful of transactions (at most max_batch
    each), and every caller is answered only once another connection can read its record."""
    path = tmp_path / "j.db"
    engines = create_engines(f"sqlite+aiosqlite:///{path}", writer_busy_timeout=0.2)
    await migrate(engines.main)
    commits: list[int] = []
    journal = Journal(
        engines.main,
        engines.sqlite_writer,
        max_batch=100,
        sqlite_inline=writer == "inline",
        on_records=lambda rows: commits.append(len(rows)),
    )
    journal.start()
    reader = sqlite3.connect(path)
    unseen: list[int] = []

    async def append_then_read(n: int) -> None:
        record_id = await journal.append(event(n))
        if reader.execute("SELECT 1 FROM audit_records WHERE id = ?", (record_id,)).fetchone():
            return
        unseen.append(record_id)

    try:
        await asyncio.gather(*(append_then_read(n) for n in range(250)))
    finally:
        reader.close()
        await journal.stop()
        await engines.dispose()
    assert unseen == []
    assert sum(commits) == 250
    assert max(commits) <= 100
    assert len(commits) <= 5  # not one transaction per record


async def test_a_failing_job_rolls_back_alone(journal: Journal) -> None:
    def good(connection: Connection) -> JobResult[str]:
        connection.execute(text("INSERT INTO counters (name, value) VALUES ('good', 1)"))
        return JobResult("done", events=[event(1)])

    def bad(connection: Connection) -> JobResult[str]:
        connection.execute(text("INSERT INTO counters (name, value) VALUES ('bad', 1)"))
        raise NotFound("nothing here")

    results = await asyncio.gather(
        journal.run(good), journal.run(bad), journal.append(event(2)), return_exceptions=True
    )
    assert results[0] == "done"
    assert isinstance(results[1], NotFound)
    assert isinstance(results[2], int)
    async with journal._engine.connect() as connection:
        names = {row[0] for row in await connection.execute(text("SELECT name FROM counters"))}
    assert "good" in names
    assert "bad" not in names


async def counter_names(journal: Journal) -> set[str]:
    async with journal._engine.connect() as connection:
        return {row[0] for row in await connection.execute(text("SELECT name FROM counters"))}


def writing(name: str, *, fail: Exception | None = None) -> Callable[[Connection], JobResult[str]]:
    """A job that inserts a counter, records an event, then raises ``fail`` if given."""

    def job(connection: Connection) -> JobResult[str]:
        connection.execute(text("INSERT INTO counters (name, value) VALUES (:n, 1)"), {"n": name})
        if fail is not None:
            raise fail
        return JobResult(name, events=[event(1)])

    return job


async def test_jobs_commit_with_their_batchs_audit_records_or_not_at_all(journal: Journal) -> None:
    """pysqlite begins a transaction only before a write statement, so a batch starting with a
    job's SAVEPOINT committed each job at its RELEASE, before the batch's audit records: here
    the records cannot be written, and neither job's writes may stay."""
    async with journal._engine.begin() as connection:
        await connection.execute(
            text(
                "CREATE TRIGGER no_records BEFORE INSERT ON audit_records"
                " BEGIN SELECT RAISE(ABORT, 'no records today'); END"
            )
        )
    results = await asyncio.gather(
        journal.run(writing("first")), journal.run(writing("second")), return_exceptions=True
    )
    assert [type(r) for r in results] == [Unavailable, Unavailable]
    assert not {"first", "second"} & await counter_names(journal)


async def test_a_job_alone_in_its_batch_that_fails_leaves_nothing(journal: Journal) -> None:
    """Alone, a job runs without a savepoint: its failure rolls the transaction back whole, the
    caller gets the job's error, and the store stays healthy."""
    with pytest.raises(NotFound):
        await journal.run(writing("refused", fail=NotFound("nothing here")))
    with pytest.raises(IntegrityError):  # the database refused its data: the same
        await journal.run(writing("session_serial"))  # taken: a unique name
    assert journal.healthy
    assert await journal.run(writing("after")) == "after"
    names = await counter_names(journal)
    assert "after" in names
    assert "refused" not in names


async def test_after_commit_runs_in_order_with_the_record_ids(journal: Journal) -> None:
    seen: list[tuple[int, list[int]]] = []

    def job(n: int):  # type: ignore[no-untyped-def]
        def run(connection: Connection) -> JobResult[int]:
            return JobResult(
                n, events=[event(n), event(n)], after_commit=lambda ids: seen.append((n, ids))
            )

        return run

    values = await asyncio.gather(*(journal.run(job(n)) for n in range(5)))
    assert values == list(range(5))
    assert [n for n, _ in seen] == list(range(5))
    flat = [i for _, ids in seen for i in ids]
    assert flat == sorted(flat)
    assert len(flat) == 10


async def test_a_locked_store_answers_unavailable_then_recovers(
    journal: Journal, tmp_path: Path
) -> None:
    locker = sqlite3.connect(tmp_path / "j.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Unavailable):
            await journal.append(event(1))
        assert not journal.healthy
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert await journal.append(event(2)) >= 1
    assert journal.healthy


async def test_no_allow_is_answered_while_the_audit_store_is_locked(harness: Harness) -> None:
    delegated = await harness.delegate()
    assert (await harness.check(delegated.token, "tickets.read")).decision == pb.DECISION_ALLOW
    locker = sqlite3.connect(harness.tmp_path / "agentid.db", timeout=1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await harness.check(delegated.token, "tickets.read")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "AUDIT_UNAVAILABLE"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    recovered = await harness.check(delegated.token, "tickets.read")
    assert recovered.decision == pb.DECISION_ALLOW
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        assert (
            db.execute(
                "SELECT count(*) FROM audit_records WHERE id = ?", (int(recovered.decision_id),)
            ).fetchone()[0]
            == 1
        )


async def test_health_follows_the_store_and_recovers_by_itself(harness: Harness) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(harness.channel)

    async def status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

    async def until(expected: int) -> None:
        for _ in range(100):
            if await status() == expected:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"health never became {expected}")

    delegated = await harness.delegate()
    locker = sqlite3.connect(harness.tmp_path / "agentid.db", timeout=1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await harness.check(delegated.token, "tickets.read")
        await until(health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await until(health_pb2.HealthCheckResponse.SERVING)  # no call needed: the journal probes


async def test_a_write_stuck_past_the_append_timeout_is_answered_unavailable(
    tmp_path: Path,
) -> None:
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}")
    await migrate(engines.main)
    journal = Journal(engines.main, engines.sqlite_writer, max_batch=10, append_timeout=0.1)
    journal.start()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stuck(connection: Connection) -> JobResult[None]:  # holds the writer thread
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        return JobResult(None)

    try:
        blocked = asyncio.ensure_future(journal.run(stuck))
        await asyncio.sleep(0.02)  # the writer has taken the stuck job
        waiting = asyncio.ensure_future(journal.append(event(1)))
        started = time.monotonic()
        for pending in (blocked, waiting):
            with pytest.raises(Unavailable) as caught:
                await pending
            assert caught.value.reason == "AUDIT_UNAVAILABLE"
        assert time.monotonic() - started < 5
        release.set()
        assert await journal.append(event(2)) == 1  # the refused append was never written
    finally:
        release.set()
        await journal.stop()
        await engines.dispose()


async def test_writes_after_stop_are_refused(journal: Journal) -> None:
    assert await journal.append(event(1)) == 1
    await journal.stop()
    with pytest.raises(Unavailable):
        await journal.append(event(2))


async def test_a_failing_after_commit_fails_its_caller_only(journal: Journal) -> None:
    def broken(connection: Connection) -> JobResult[str]:
        return JobResult("written", events=[event(1)], after_commit=lambda ids: 1 / 0)

    results = await asyncio.gather(
        journal.run(broken), journal.append(event(2)), return_exceptions=True
    )
    assert isinstance(results[0], ZeroDivisionError)
    assert isinstance(results[1], int)
    assert await journal.append(event(3)) > results[1]  # the writer lives on
    assert journal.healthy


async def test_records_are_published_on_the_loop_and_a_failing_listener_costs_nothing(
    tmp_path: Path,
) -> None:
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}")
    await migrate(engines.main)
    threads: list[threading.Thread] = []

    def listener(rows: list[tuple[object, ...]]) -> None:
        threads.append(threading.current_thread())
        raise RuntimeError("a broken follower")

    journal = Journal(engines.main, engines.sqlite_writer, max_batch=10, on_records=listener)
    journal.start()  # the thread writer: records must still reach listeners on the loop
    try:
        ids = await asyncio.gather(*(journal.append(event(n)) for n in range(5)))
        assert sorted(ids) == [1, 2, 3, 4, 5]
        assert await journal.append(event(6)) == 6
        assert threads
        assert set(threads) == {threading.main_thread()}
    finally:
        await journal.stop()
        await engines.dispose()


async def test_a_failing_last_batch_at_stop_leaves_no_probe_behind(tmp_path: Path) -> None:
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}", writer_busy_timeout=0.1)
    await migrate(engines.main)
    journal = Journal(engines.main, engines.sqlite_writer, max_batch=10, probe_interval=0.01)
    journal.start()
    locker = sqlite3.connect(tmp_path / "j.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        queued = asyncio.ensure_future(journal.append(event(1)))
        await asyncio.sleep(0)
        await journal.stop()
        with pytest.raises(Unavailable):
            await queued
        await asyncio.sleep(0.05)
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "journal-probe"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        await engines.dispose()


def session(
    sid: str, serial: int, parent: str = "", expires_at: int | None = None
) -> SessionRecord:
    now = int(time.time())
    return SessionRecord(
        id=sid, serial=serial, user_id="alice", agent_id="bot", scopes=("a",), audiences=(),
        task="", jkt="", created_at=now, expires_at=expires_at or now + 600, parent_id=parent,
    )  # fmt: skip


def delegated(s: SessionRecord) -> AuditEvent:
    return AuditEvent(
        time=time.time(),
        event_type=EventType.DELEGATE,
        actor_kind=ActorKind.AGENT,
        actor_id=s.parent_id,
        session_id=s.id,
        parent_session_id=s.parent_id,
    )


async def test_a_session_is_written_only_under_a_live_lineage(journal: Journal) -> None:
    """Whatever a Delegate saw when it authenticated, its session goes in only if, at the write,
    no ancestor has been revoked and the parent has not expired."""
    root, parent = session("ses_root", 1), session("ses_parent", 2, parent="ses_root")
    for s in (root, parent):
        await journal.append(delegated(s), new_session=s)

    def revoke_root(connection: Connection) -> JobResult[None]:
        connection.execute(text("UPDATE sessions SET revoked_at = 1 WHERE id = 'ses_root'"))
        return JobResult(None)

    await journal.run(revoke_root)
    grandchild = session("ses_grandchild", 3, parent="ses_parent")  # the root is revoked
    with pytest.raises(Unauthenticated) as refused:
        await journal.append(delegated(grandchild), new_session=grandchild)
    assert refused.value.reason == "SESSION_REVOKED"
    expiring = session("ses_short", 4, expires_at=int(time.time()) - 1)
    await journal.append(delegated(expiring), new_session=expiring)
    late = session("ses_late", 5, parent="ses_short")
    with pytest.raises(PermissionDenied) as expired:
        await journal.append(delegated(late), new_session=late)
    assert expired.value.reason == "SESSION_EXPIRED"
    orphan = session("ses_orphan", 6, parent="ses_nowhere")
    with pytest.raises(Unauthenticated):
        await journal.append(delegated(orphan), new_session=orphan)
    # Nothing of the refused ones was written, and the journal goes on.
    assert await journal.append(event(1)) > 0


async def test_the_linger_waits_as_long_as_the_expected_group_takes_to_arrive(
    journal: Journal,
) -> None:
    """A write alone after a burst waits for the group the burst showed, up to
    LINGER_SECONDS_PER_WRITE for each of its writes and at least LINGER_SECONDS: a group of 4
    waits 2 ms as before, one of 32 (a saturated loop's) 8 ms, and no longer."""
    loop = asyncio.get_running_loop()
    waits: list[float] = []
    call_later = loop.call_later

    def recorded(
        delay: float, callback: Callable[..., object], *args: object
    ) -> asyncio.TimerHandle:
        if callback == journal._wake:
            waits.append(delay)
        return call_later(delay, callback, *args)

    loop.call_later = recorded  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(journal.append(event(n)) for n in range(4)))
        await journal.append(event(4))  # the group of 4 does not come: the timer ends the wait
        assert waits == [LINGER_SECONDS]
        await asyncio.gather(*(journal.append(event(n)) for n in range(32)))
        started = time.monotonic()
        await journal.append(event(5))
        waited = time.monotonic() - started
    finally:
        del loop.call_later  # the loop's own method again
    assert waits == [LINGER_SECONDS, LINGER_GROUP * LINGER_SECONDS_PER_WRITE]
    assert waits[1] > waits[0]  # a saturated loop's group is waited for longer
    assert waited >= 0.75 * waits[1]  # and the write did wait for it

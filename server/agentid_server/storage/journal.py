"""The journal: the one writer of the database. Every write (audit records, new sessions, serial
allocation, and the later revocation and step-up changes) is queued here and group-committed:
one task takes everything queued, writes it in a single transaction, and resolves each caller's
future only after the commit. Every answered decision is on disk without a commit per record.

Jobs are plain synchronous SQLAlchemy Core functions of a Connection, so one implementation serves
both backends:

* SQLite: a synchronous connection on a dedicated writer thread (one hop per batch), or inline on
  the event loop when configured so (`database.sqlite_writer = "inline"`): a small batch costs
  less there than the hop, but a lock held by another process would then stall the whole loop.
* PostgreSQL: the async engine, with the batch run through ``AsyncConnection.run_sync``.

Each job runs in a savepoint, so a job that fails (a domain error, say) rolls back alone and the
rest of the batch commits; a job alone in its batch runs without one (its failure rolls the whole
transaction back: the same outcome without the SAVEPOINT and RELEASE).

The journal also signs its chain's head (a checkpoint, storage/checkpoints.py) in the batch that
brings it `checkpoint_records` records past the last one, at least every `checkpoint_interval`
seconds while records arrive, on request and at stop; each is logged too, so a copy lives outside
the database. On SQLite it numbers records above a durable high-water mark (counters row
`audit_next_id`, reserved ID_BLOCK ids at a time and lowered to the next id at a clean stop), so
the ids of deleted records are never handed out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import msgspec
from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from agentid_server.domain.checkpoint import Checkpoint
from agentid_server.domain.errors import AgentIdError, Unavailable
from agentid_server.domain.model import AuditEvent, SessionRecord
from agentid_server.storage import checkpoints, tables
from agentid_server.storage.audit_chain import GENESIS, canonical_bytes, link
from agentid_server.storage.lineage import refusal, serialize
from agentid_server.storage.rows import (
    SEALED_COLUMNS,
    AuditRecordRow,
    AuditRow,
    audit_row,
    session_row,
)
from agentid_server.storage.visibility import CLOSE_WINDOW, TAKE_IDS, open_id_window
from agentid_server.storage.writer_lock import WriterInUse, claim_chain, lock_beside

log = logging.getLogger(__name__)

T = TypeVar("T")
LINGER_PASSES = 4
# While writes are known to be coming, wait up to LINGER_SECONDS for them (the wait ends when they
# are there): gRPC aio hands calls to Python about one per loop pass, so passes alone gather few.
# What is known to be coming is what recent batches showed: each batch's group is its writes plus
# those that arrived while it was written (a Check's caller mostly asks again once answered), and
# the writer waits for the largest group of the last LINGER_MEMORY batches, at most LINGER_GROUP.
# Two waits in a row that end on the timer forget them all: the group is then what came, so the
# writer does not keep waiting for callers that are not coming (a load that falls from 64 in
# flight to 2 costs two waits, not one per batch). One such wait is forgiven: a caller late once.
# History: 0.3 ms lifted warm Check / health from about 0.55 to 0.65-0.74 (session 4); 1 ms ending
# at a group of 8 gave batches of about 7 (session 8). Session 10: libuv keeps uvloop's clock in
# whole milliseconds, so a 1 ms timer fires 0.2-1 ms after it is set on a busy loop; 2 ms for a
# group of at least 8 (the last batch's writes and arrivals, at most 32) gave 7.2-8.8 per batch on
# both loops. Session 12: that floor of 8 never came at 2-7 in flight, so every batch waited the
# whole 2 ms: warm Check ÷ health calls/s 0.17 at 2 in flight, 0.26 at 4 (p50 3.5-3.8 ms against
# 0.5-0.9). The group without the floor, from the last batch alone, drifts down (a caller late
# once lowers it for good; session 10 saw 4.9 at 8 in flight): the memory of recent batches keeps
# it where the load is. Session 13: forgetting on every timer-ended wait cost uvloop at 8-16 in
# flight (0.53-0.68 of health's calls/s); on a busy uvloop the 2 ms timer fires after 1.4-1.9 ms
# (libuv's millisecond clock), so a wait ended before a group that was coming, and one late caller
# emptied the memory. Forgetting only on the second in a row: 0.62-0.84 at 8, 0.70-0.75 at 16.
# Session 16: the wait is LINGER_SECONDS_PER_WRITE for each write of the group, at least
# LINGER_SECONDS. At 64 in flight the loop is saturated and the other calls wait in front of it,
# arriving one per handler's turn (about 250 µs here); a fixed 2 ms held batches at 9-10 records,
# each commit's fixed cost spread over few (SQLite: 28 µs of the loop per record). Waiting as long
# as the group takes to arrive grows them to 22-25 (18 µs per record): warm Check ÷ health at 64
# in flight 0.70 → 0.77 (asyncio), 0.66 → 0.80-0.95 (uvloop); groups of 8 or fewer wait 2 ms as
# before, and 8-16 in flight did not lose. A load that falls from 64 to 1 waits twice, up to 8 ms.
LINGER_MEMORY = 8
LINGER_GROUP = 32
LINGER_SECONDS = 0.002
LINGER_SECONDS_PER_WRITE = 0.00025
# SQLite ids reserved per write of the high-water mark: a batch writes it only when it crosses
# the reservation, and a crash skips at most this many ids.
ID_BLOCK = 1000


@dataclass
class JobResult(Generic[T]):
    """What a job hands back: its value, audit events to record in the same transaction, and a
    callback run after the commit (in commit order) before any caller is answered."""

    value: T
    events: list[AuditEvent] = field(default_factory=list)
    after_commit: Callable[[list[int]], None] | None = None


Job = Callable[[Connection], JobResult[T]]


@dataclass(slots=True)
class _Item:
    future: asyncio.Future[Any]
    event: AuditEvent | None = None
    session: SessionRecord | None = None
    job: Job[Any] | None = None
    with_ids: bool = False
    lineage: bool = False  # revokes sessions: serialized with sub-agents' Delegates
    queued: float = 0.0  # loop time of submission
    checkpoint: bool = False  # sign the chain's head in this batch (its value: the checkpoint)
    final: bool = False  # the last batch: also lower SQLite's id mark to the next id


@dataclass(slots=True)
class _Outcome:
    value: Any = None
    error: Exception | None = None  # an AgentIdError, or a job's own database error
    after_commit: Callable[[list[int]], None] | None = None
    ids: list[int] = field(default_factory=list)


# What a batch's write hands back: an outcome per item, or for a batch of audit records only (the
# Checks') each record's id, its caller's answer (no outcome object per record).
Written = list[_Outcome] | list[int]


class Journal:
    """Implements the domain's AuditLog port and runs every other write as a job."""

    def __init__(
        self,
        engine: AsyncEngine,
        sync_engine: Engine | None,
        *,
        max_batch: int,
        append_timeout: float = 5.0,
        sqlite_inline: bool = False,
        on_health: Callable[[bool], None] | None = None,
        probe_interval: float = 0.5,
        unhealthy_after: float = 1.0,
        chain_id: str = "main",
        on_records: Callable[[list[AuditRecordRow]], None] | None = None,
        checkpoint_key: checkpoints.CheckpointKey | None = None,
        checkpoint_records: int = 10_000,
        checkpoint_interval: float = 60.0,
    ) -> None:
        """``sync_engine`` is given for SQLite, None for PostgreSQL. SQLite batches are written
        on a dedicated thread (one hop per batch; a lock held by another process stalls only the
        writer) or, with ``sqlite_inline``, on the event loop itself while the store is healthy
        (after a failed batch, on the thread until one commits: a failing store must not stall
        the loop batch after batch). ``unhealthy_after``: a batch not committed within this
        long makes the store unhealthy at once, its callers and those waiting behind it are
        answered UNAVAILABLE, and new writes are refused until it ends. Without
        ``checkpoint_key`` no checkpoints are written."""
        self._engine = engine
        self._sync_engine = sync_engine
        self._inline = sqlite_inline
        self._executor = (  # its thread starts at the first use: never, inline and healthy
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
            if sync_engine is not None
            else None
        )
        self._max_batch = max_batch
        self._timeout = append_timeout
        self._loop: asyncio.AbstractEventLoop  # the running loop, from start()
        self._pending: deque[_Item] = deque()  # submitted, not yet taken into a batch
        self._writing: Sequence[_Item] = ()  # the batch being written
        self._writing_since = 0.0  # loop time it was taken
        self._stalled = False  # it is older than unhealthy_after: writes are refused meanwhile
        self._unhealthy_after = unhealthy_after
        self._wakeup: asyncio.Future[None] | None = None  # set while the writer waits for work
        self._wake_at = 1  # while it waits: the pending writes that end the wait
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._sync_connection: Connection | None = None
        self._async_connection: AsyncConnection | None = None
        # Records are numbered and chained here, before the insert, so the hash can cover the id.
        # SQLite: this journal is the only writer of its file and numbers them itself;
        # PostgreSQL: ids are reserved from the table's sequence (several replicas may write).
        self._chain_id = chain_id
        self._on_records = on_records
        self._next_id: int | None = None
        self._chain_head: bytes | None = None
        # The head's id and time, and the checkpoints; loaded with the head, reloaded after a
        # failed batch (so a batch may advance them before its commit).
        self._head_id = 0
        self._head_time_us = 0
        self._id_mark = 0  # SQLite: every id below it may have been handed out
        self._checkpoint_key = checkpoint_key
        self._checkpoint_records = checkpoint_records
        self._checkpoint_interval = checkpoint_interval
        self._checkpoint: Checkpoint | None = None  # the chain's newest (maybe uncommitted)
        self._since_checkpoint = 0  # records sealed since it
        self._new_checkpoints: list[Checkpoint] = []  # signed in the batch, logged at commit
        self._checkpointer: asyncio.Task[None] | None = None
        self._insert = tables.audit_records.insert()
        self._pending_records: list[AuditRecordRow] = []  # written, not yet committed
        # Recent batches' groups (their writes and those that came while each was written): the
        # writer lingers for the largest (_run).
        self._groups: deque[int] = deque(maxlen=LINGER_MEMORY)
        self._late = 0  # 1 when the last linger ended on the timer
        self.healthy = True
        self._on_health = on_health
        self._probe_interval = probe_interval
        self._probe: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None  # SQLite: the writer's lock file, held until stop
        self.backend_pid: int | None = None  # PostgreSQL: the writer connection's server process
        self._window_open = False  # PostgreSQL: a Check batch holds the id window's lock
        self.records_committed = 0  # audit records, since start (telemetry)
        self.batches_committed = 0  # batches with audit records (records ÷ batches: group size)

    # -- lifecycle -------------------------------------------------------------------------------

    async def claim(self) -> None:
        """Makes sure no other server writes what this journal writes, before it writes anything
        (writer_lock: SQLite's lock file, held until stop; PostgreSQL's advisory lock on the
        chain id, taken again whenever the writer's connection is replaced). Raises WriterInUse
        when the lock is held elsewhere."""
        if self._sync_engine is not None:
            self._lock_fd = lock_beside(self._sync_engine.url.database)
        else:
            self._async_connection = await self._connect_claimed()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="journal")
        self._watchdog = self._loop.create_task(self._expire_overdue(), name="journal-watchdog")
        if self._checkpoint_key is not None:
            self._checkpointer = self._loop.create_task(
                self._checkpoint_periodically(), name="journal-checkpoints"
            )

    async def stop(self) -> None:
        """Writes what is queued, then ends the writer and closes its connection. Writes submitted
        after this are refused as UNAVAILABLE. Stopping twice is harmless."""
        if self._stopping:
            return
        if self._task is not None and not self._stalled and self._final_batch_due():
            final = _Item(self._future(), job=_no_change, checkpoint=True, final=True)
            final.future.add_done_callback(_quiet)
            self._submit(final)  # a stalled store takes none: the next start signs the head
        self._stopping = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._task is not None:  # the watchdog still answers writes stuck in the last batches
            self._wake()
            await self._finish_writer()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._close_connections
            )
            self._executor.shutdown(wait=True)
        else:
            self._close_connections()
        if self._async_connection is not None:
            connection, self._async_connection = self._async_connection, None
            try:  # a connection stuck in a statement may not close either
                await asyncio.wait_for(connection.close(), timeout=1.0)
            except (TimeoutError, SQLAlchemyError, OSError) as exc:
                log.warning("closing the writer's connection failed: %s", type(exc).__name__)
        if self.batches_committed:
            log.info(
                "journal stopped: %d audit records committed in %d batches",
                self.records_committed,
                self.batches_committed,
            )
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _final_batch_due(self) -> bool:
        """Whether a last batch has work: a head to sign, or SQLite's id mark to lower to the
        next id (so a clean restart skips no id)."""
        unsigned = self._checkpoint_key is not None and self._since_checkpoint > 0
        return unsigned or (self._next_id is not None and self._next_id != self._id_mark)

    async def _finish_writer(self) -> None:
        """Lets the writer write what is queued, for as long as a write may take (the append
        timeout): a store that hangs (a PostgreSQL statement waiting on another session's lock
        has no end of its own) must not hang the shutdown. What is left is answered UNAVAILABLE."""
        task = self._task
        assert task is not None
        done, _ = await asyncio.wait({task}, timeout=self._timeout)
        if not done:
            log.error(
                "the store did not take the last writes within %.1f s; stopping without them",
                self._timeout,
            )
            stuck = (*self._writing, *self._pending)
            self._pending.clear()
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
            for item in stuck:
                _give_up(item.future)
        else:
            task.result()  # the writer's own failure, if any, as before
        self._task = None

    # -- the ports -------------------------------------------------------------------------------

    async def append(self, event: AuditEvent, *, new_session: SessionRecord | None = None) -> int:
        """Records the event (and a new session with it) durably; returns the record id."""
        return int(await self._submit(_Item(self._future(), event=event, session=new_session)))

    async def run(self, job: Job[T], *, lineage: bool = False) -> T:
        """Runs a write job in the next group commit and returns its value after the commit.
        ``lineage``: it revokes sessions (lineage.serialize)."""
        result: T = await self._submit(_Item(self._future(), job=job, lineage=lineage))
        return result

    async def checkpoint_now(self) -> Checkpoint | None:
        """Signs the chain's head in the next batch (unless its newest checkpoint is of the head
        already) and returns the chain's newest checkpoint after the commit; None while the
        chain has no record or no key signs."""
        result: Checkpoint | None = await self._submit(
            _Item(self._future(), job=_no_change, checkpoint=True)
        )
        return result

    async def run_recorded(self, job: Job[T]) -> tuple[T, list[int]]:
        """Like run, also returning the ids of the audit records the job wrote."""
        result: tuple[T, list[int]] = await self._submit(
            _Item(self._future(), job=job, with_ids=True)
        )
        return result

    # -- internals -------------------------------------------------------------------------------

    def _future(self) -> asyncio.Future[Any]:
        return self._loop.create_future()

    def _submit(self, item: _Item) -> asyncio.Future[Any]:
        if self._stopping:
            raise Unavailable("the server is shutting down", reason="AUDIT_UNAVAILABLE")
        if self._stalled:
            raise self._stalled_error()
        item.queued = self._loop.time()
        self._pending.append(item)
        if self._wakeup is not None and len(self._pending) >= self._wake_at:
            self._wake()
        return item.future

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _expire_overdue(self) -> None:
        """Answers UNAVAILABLE to every write still waiting after the append timeout (the store
        is stuck, say, behind another process's lock), and to every one at once when the batch
        being written is older than ``unhealthy_after``. One timer for all, not one per write."""
        period = min(max(min(self._timeout, self._unhealthy_after) / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(period)
            now = self._loop.time()
            stuck = self._writing and self._writing_since <= now - self._unhealthy_after
            if stuck and not self._stalled:
                self._stall()
            overdue = now - self._timeout
            for item in self._writing:  # being written: answered, may still commit
                if item.queued > overdue:
                    break
                _give_up(item.future)
            pending = self._pending
            while pending and pending[0].queued <= overdue:  # not written yet: never will be
                _give_up(pending.popleft().future)

    async def _run(self) -> None:
        pending = self._pending
        while True:
            if not pending:
                if self._stopping:
                    return
                self._wake_at = 1
                self._wakeup = self._loop.create_future()
                await self._wakeup
                continue
            # Group commit needs a group: while the writes known to be coming (what recent
            # batches showed) are not all here, give them a few loop passes, then up to
            # LINGER_SECONDS; alone (1 in flight), write at once.
            group = max(self._groups, default=1)
            if group > 1 or len(pending) > 1:
                for _ in range(LINGER_PASSES):
                    waiting = len(pending)
                    await asyncio.sleep(0)
                    if len(pending) == waiting or len(pending) >= group:
                        break
            if len(pending) < group and not self._stopping:
                self._wake_at = group  # _submit ends the wait when the group is there
                self._wakeup = self._loop.create_future()
                wait = max(LINGER_SECONDS, group * LINGER_SECONDS_PER_WRITE)
                timer = self._loop.call_later(wait, self._wake)
                try:
                    await self._wakeup
                finally:
                    timer.cancel()
                if len(pending) >= group:
                    self._late = 0
                elif self._late:  # twice in a row they did not come: wait for none of them again
                    self._groups.clear()
                    self._late = 0
                else:  # once may be a caller late
                    self._late = 1
            take = min(len(pending), self._max_batch)
            if take == 0:
                continue  # answered meanwhile (the store stalled)
            batch = [pending.popleft() for _ in range(take)]
            self._writing, self._writing_since = batch, self._loop.time()
            try:
                await self._commit(batch)
            finally:
                self._writing, self._stalled = (), False
            if self._window_open:
                await self._close_window()
            # This batch's group: its callers (a Check's caller mostly asks again) and the writes
            # that came meanwhile.
            self._groups.append(min(take + len(pending), LINGER_GROUP))

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            if self._sync_engine is None:
                outcomes = await self._write_async(batch)
            elif self._inline and self.healthy:
                outcomes = self._write_sqlite(batch)
            else:
                assert self._executor is not None
                outcomes = await self._loop.run_in_executor(
                    self._executor, self._write_sqlite, batch
                )
        except Exception as exc:  # the writer must outlive any failed batch
            self._next_id = self._chain_head = None
            # A checkpoint the batch signed did not commit: the head is read again, and signed
            # at the latest in the last batch at stop.
            self._since_checkpoint = max(self._since_checkpoint, 1)
            self._pending_records.clear()
            self._new_checkpoints.clear()
            if self._executor is None:
                self._close_connections()
            else:
                self._executor.submit(self._close_connections)
            if self._async_connection is not None:  # PostgreSQL: start over on a new connection
                with contextlib.suppress(Exception):  # (which ends its transaction and locks)
                    await self._async_connection.invalidate()
                self._async_connection = None
            self._window_open = False
            self._set_health(False)
            if isinstance(exc, WriterInUse):
                log.error("write batch of %d items failed: %s", len(batch), exc)
            elif isinstance(exc, SQLAlchemyError | sqlite3.Error | OSError):
                log.error("write batch of %d items failed: %s", len(batch), type(exc).__name__)
            else:
                log.exception("write batch of %d items failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(
                        Unavailable("the store is unavailable", reason="AUDIT_UNAVAILABLE")
                    )
            return
        if not self.healthy:
            self._set_health(True)
        for checkpoint in self._new_checkpoints:  # a copy outside the database
            log.info("audit checkpoint %s", checkpoint.text())
        self._new_checkpoints.clear()
        if self._pending_records:
            records, self._pending_records = self._pending_records, []
            self.records_committed += len(records)
            self.batches_committed += 1
            try:
                self._published(records)
            except Exception:  # a listener's fault must not cost the writer or the callers
                log.exception("publishing %d committed audit records failed", len(records))
        if not outcomes or type(outcomes[0]) is int:  # a batch of records only: each its id
            for item, record_id in zip(batch, outcomes, strict=True):
                if not item.future.done():
                    item.future.set_result(record_id)
            return
        for item, outcome in zip(batch, cast("list[_Outcome]", outcomes), strict=True):
            if outcome.after_commit is not None:
                try:
                    outcome.after_commit(outcome.ids)
                except Exception as exc:  # committed, but not applied here: not a success
                    log.exception("applying a committed write failed")
                    if not item.future.done():
                        item.future.set_exception(exc)
                    continue
            if item.future.done():
                continue
            if outcome.error is not None:
                item.future.set_exception(outcome.error)
            elif item.with_ids:
                item.future.set_result((outcome.value, outcome.ids))
            else:
                item.future.set_result(outcome.value)

    def _stall(self) -> None:
        """The batch being written has not committed within ``unhealthy_after``: the store is
        failing (a lock another process holds, a disk that hangs), whatever its own timeout."""
        log.error(
            "the store has not committed a write for %.1f s; failing writes until it does",
            self._unhealthy_after,
        )
        self._stalled = True
        self._set_health(False)
        for item in self._writing:  # answered; the batch may still commit
            _give_up(item.future, self._stalled_error())
        while self._pending:  # not written yet: never will be
            _give_up(self._pending.popleft().future, self._stalled_error())

    def _stalled_error(self) -> Unavailable:
        return Unavailable(
            f"the store has not committed a write for {self._unhealthy_after:g} s",
            reason="AUDIT_UNAVAILABLE",
            metadata={"unhealthy_after": f"{self._unhealthy_after:g}"},
        )

    def _set_health(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        log.warning("the store is %s", "writable again" if healthy else "failing writes")
        if self._on_health is not None:
            self._on_health(healthy)
        if not healthy and not self._stopping and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self._recover(), name="journal-probe")

    async def _recover(self) -> None:
        """While the store fails, try a small write now and then, so health recovers by itself
        even when no call comes in to try."""
        while not self.healthy and not self._stopping:
            await asyncio.sleep(self._probe_interval)
            with contextlib.suppress(Unavailable):
                await self.run(_probe_write)

    def _write_sqlite(self, batch: list[_Item]) -> Written:
        assert self._sync_engine is not None
        if self._sync_connection is None:
            self._sync_connection = self._sync_engine.connect()
        connection = self._sync_connection
        if all(item.job is None and item.session is None for item in batch):  # Checks
            return self._write_audit_only(connection, batch)
        try:
            with connection.begin():
                # pysqlite begins a transaction by itself only before an INSERT, UPDATE or
                # DELETE: a batch whose first statement is a job's SAVEPOINT (or a read) would
                # commit at that RELEASE, apart from the rest of the batch and its audit records.
                # IMMEDIATE: the write lock from the start, so a job reads what it then writes.
                raw = connection.connection.driver_connection
                assert isinstance(raw, sqlite3.Connection)
                raw.execute("BEGIN IMMEDIATE")
                return self._write_batch(connection, batch)
        except _AloneRefused as refused:  # rolled back whole
            return [_Outcome(error=refused.error)]

    def _write_audit_only(self, connection: Connection, batch: list[_Item]) -> list[int]:
        """The Check path's batches, audit records only: straight to the sqlite3 connection
        (SQLAlchemy's per-statement work doubles the cost), one INSERT in its own transaction
        for up to SQLITE_ROWS_PER_INSERT records, else multi-row INSERTs and one commit."""
        raw = connection.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        if self._next_id is None or self._chain_head is None:
            with connection.begin():  # a read; ended before the raw connection is used
                self._load_head(connection)
        try:
            sealed = self._seal([audit_row(item.event) for item in batch if item.event])
            mark, checkpoint = self._chain_extras(force=False, final=False)
            if len(sealed) <= SQLITE_ROWS_PER_INSERT and mark is None and checkpoint is None:
                # One statement, its own transaction: one call into SQLite, which lets go of
                # the GIL for it (the gRPC poller thread takes it, and the loop waits to get it
                # back), instead of two with the commit.
                level, raw.isolation_level = raw.isolation_level, None
                try:
                    raw.execute(_sqlite_insert(len(sealed)), [v for row in sealed for v in row])
                finally:
                    raw.isolation_level = level
            else:
                for start in range(0, len(sealed), SQLITE_ROWS_PER_INSERT):
                    rows = sealed[start : start + SQLITE_ROWS_PER_INSERT]
                    raw.execute(_sqlite_insert(len(rows)), [v for row in rows for v in row])
                if mark is not None:
                    raw.execute(_SQLITE_MARK, (mark,))
                if checkpoint is not None:
                    raw.execute(_SQLITE_CHECKPOINT, checkpoints.checkpoint_row(checkpoint))
                raw.commit()
        except BaseException:
            raw.rollback()
            self._next_id = self._chain_head = None
            raise
        self._pending_records.extend(sealed)  # published on the loop, after the commit
        return [row[0] for row in sealed]

    async def _write_async(self, batch: list[_Item]) -> Written:
        if self._async_connection is None:
            self._async_connection = await self._connect_claimed()
        connection = self._async_connection
        if self._chain_head is not None and all(
            item.job is None and item.session is None for item in batch
        ):
            return await self._write_audit_only_async(connection, batch)
        try:
            async with connection.begin():
                return await connection.run_sync(self._write_batch, batch)
        except _AloneRefused as refused:  # rolled back whole
            return [_Outcome(error=refused.error)]

    async def _write_audit_only_async(
        self, connection: AsyncConnection, batch: list[_Item]
    ) -> list[int]:
        """PostgreSQL's Check batches, audit records only (the head known): straight to the
        asyncpg connection, two round trips before the answer (the general path takes five, each
        through SQLAlchemy's per-statement work): the id window's shared lock, at session level,
        and the ids in one statement; then every record in one INSERT of one JSON parameter,
        committed in its own transaction. The lock is let go, and the other replicas told, after
        the callers have their answer (_close_window). The guarantees are the general path's:
        ids taken inside the window, chained in id order, answered after the commit. A batch
        that signs a checkpoint writes it in the records' transaction (BEGIN ... COMMIT). A
        failure leaves the lock, or a transaction, open: the caller drops the connection, which
        ends both."""
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None
        rows = [audit_row(item.event) for item in batch if item.event]
        self._window_open = True
        reserved = await raw.fetch(TAKE_IDS, len(rows))
        ids = sorted(int(record[0]) for record in reserved)  # the chain runs in id order
        sealed = self._seal_numbered(list(zip(ids, rows, strict=True)))
        records = _PG_ROWS.encode(sealed).decode()
        _, checkpoint = self._chain_extras(force=False, final=False)
        if checkpoint is None:
            await raw.execute(_PG_INSERT, records)
        else:
            await raw.execute("BEGIN")
            await raw.execute(_PG_INSERT, records)
            await raw.execute(_PG_CHECKPOINT, *checkpoints.checkpoint_row(checkpoint))
            await raw.execute("COMMIT")
        self._pending_records.extend(sealed)  # published on the loop, after the commit
        return [row[0] for row in sealed]

    async def _close_window(self) -> None:
        """After a Check batch's callers have their answer: lets go of the id window's lock and
        tells the other replicas. A connection that fails to is dropped (which lets go too):
        the batch committed, so nobody is told of a failure; the next batch connects anew."""
        self._window_open = False
        connection = self._async_connection
        if connection is None:
            return
        try:
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            await asyncio.wait_for(raw.execute(CLOSE_WINDOW), self._unhealthy_after)
        except Exception as exc:  # the writer outlives it; the connection goes
            log.warning("closing the audit id window failed: %s", type(exc).__name__)
            self._async_connection = None
            with contextlib.suppress(Exception):
                await connection.invalidate()

    def _write_batch(self, connection: Connection, batch: list[_Item]) -> list[_Outcome]:
        """Runs the jobs and writes the new sessions in batch order (a session only under a
        lineage still live at that point: lineage.refusal), then every audit row of the batch."""
        outcomes = [_Outcome() for _ in batch]
        rows: list[AuditRow] = []
        owners: list[_Outcome] = []  # the outcome each audit row belongs to
        if any(item.lineage or (item.session and item.session.parent_id) for item in batch):
            serialize(connection)  # first, before any other lock of this transaction
        # A job alone in its batch needs no savepoint: when it fails, the whole transaction is
        # rolled back instead (_AloneRefused), which leaves what the savepoint would have left.
        alone = len(batch) == 1
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.job is None:
                assert item.event is not None
                if item.session is not None:
                    outcome.error = refusal(connection, item.session)
                    if outcome.error is not None:
                        continue
                    connection.execute(tables.sessions.insert(), session_row(item.session))
                rows.append(audit_row(item.event))
                owners.append(outcome)
                continue
            try:
                if alone:
                    result = item.job(connection)
                else:
                    with connection.begin_nested():
                        result = item.job(connection)
            except AgentIdError as error:
                if alone:
                    raise _AloneRefused(error) from None
                outcome.error = error
                continue
            except DBAPIError as error:
                if not _refused_data(error):
                    raise  # the store itself: the whole batch fails
                log.error("a write job failed on its data: %s", type(error.orig).__name__)
                if alone:
                    raise _AloneRefused(error) from None
                outcome.error = error  # INTERNAL for its caller; the batch goes on
                continue
            outcome.value, outcome.after_commit = result.value, result.after_commit
            rows.extend(audit_row(event) for event in result.events)
            owners.extend(outcome for _ in result.events)
        for owner, record_id in zip(owners, self._insert_audit(connection, rows), strict=True):
            owner.ids.append(record_id)
        self._write_extras(connection, batch)
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.job is None and outcome.error is None:
                outcome.value = outcome.ids[0]
            elif item.checkpoint:
                outcome.value = self._checkpoint
        return outcomes

    def _write_extras(self, connection: Connection, batch: list[_Item]) -> None:
        """The id mark and the checkpoint this batch brings, if any."""
        force = any(item.checkpoint for item in batch)
        final = any(item.final for item in batch)
        if self._chain_head is None or (self._sync_engine is not None and self._next_id is None):
            if not force:  # nothing sealed in this batch (sealing loads the head): nothing due
                return
            self._load_head(connection)
        mark, checkpoint = self._chain_extras(force=force, final=final)
        if mark is not None:
            counters = tables.counters
            connection.execute(
                update(counters).where(counters.c.name == tables.AUDIT_ID_MARK).values(value=mark)
            )
        if checkpoint is not None:
            connection.execute(
                tables.audit_checkpoints.insert(),
                dict(zip(checkpoints.COLUMNS, checkpoints.checkpoint_row(checkpoint), strict=True)),
            )

    def _chain_extras(self, *, force: bool, final: bool) -> tuple[int | None, Checkpoint | None]:
        """After sealing a batch: the id mark to store (SQLite: when the batch crossed the
        reservation, or exactly the next id at the last batch), and the checkpoint to store
        (when due or forced, and the head is not checkpointed yet)."""
        mark = None
        if self._sync_engine is not None and self._next_id is not None:
            if final and self._next_id != self._id_mark:
                mark = self._next_id
            elif self._next_id > self._id_mark:
                mark = self._next_id + ID_BLOCK
            if mark is not None:
                self._id_mark = mark
        checkpoint = None
        key = self._checkpoint_key
        due = force or self._since_checkpoint >= self._checkpoint_records
        if key is not None and due and self._head_id and self._since_checkpoint:
            assert self._chain_head is not None
            checkpoint = key.sign(
                Checkpoint(self._chain_id, self._head_id, self._chain_head, self._head_time_us)
            )
            self._checkpoint, self._since_checkpoint = checkpoint, 0
            self._new_checkpoints.append(checkpoint)
        return mark, checkpoint

    def _insert_audit(self, connection: Connection, rows: list[AuditRow]) -> list[int]:
        if not rows:
            return []
        if self._sync_engine is None:  # PostgreSQL: reserve the ids, then chain
            open_id_window(connection)
            reserved = connection.execute(
                text("SELECT nextval('audit_records_id_seq') FROM generate_series(1, :n)"),
                {"n": len(rows)},
            ).scalars()
            ids = sorted(int(i) for i in reserved)  # the chain runs in id order; rows come in any
            if self._chain_head is None:
                self._load_head(connection)
            sealed = self._seal_numbered(list(zip(ids, rows, strict=True)))
        else:
            if self._next_id is None or self._chain_head is None:
                self._load_head(connection)
            sealed = self._seal(rows)
        connection.execute(
            self._insert, [dict(zip(SEALED_COLUMNS, row, strict=True)) for row in sealed]
        )
        self._pending_records.extend(sealed)
        return [row[0] for row in sealed]

    def _load_head(self, connection: Connection) -> None:
        """This chain's last record and newest checkpoint (and, for SQLite, the next id: above
        every record and the high-water mark) from the tables."""
        a = tables.audit_records
        if self._sync_engine is not None:  # PostgreSQL reserves ids from the sequence instead
            top = connection.execute(select(func.max(a.c.id))).scalar()
            counters = tables.counters
            mark = connection.execute(
                select(counters.c.value).where(counters.c.name == tables.AUDIT_ID_MARK)
            ).scalar()
            if mark is None:  # the row is gone: written again with the next batch's mark
                connection.execute(counters.insert().values(name=tables.AUDIT_ID_MARK, value=0))
            self._id_mark = int(mark or 0)
            self._next_id = max(int(top or 0) + 1, self._id_mark)
        head = connection.execute(
            select(a.c.id, a.c.hash, a.c.time_us)
            .where(a.c.chain_id == self._chain_id)
            .order_by(a.c.id.desc())
            .limit(1)
        ).first()
        self._chain_head = bytes(head.hash) if head is not None and head.hash else GENESIS
        self._head_id, self._head_time_us = (head.id, head.time_us) if head else (0, 0)
        self._checkpoint = checkpoints.newest(connection, self._chain_id)
        covered = self._checkpoint is not None and self._checkpoint.record_id == self._head_id
        self._since_checkpoint = 0 if covered or not self._head_id else 1

    def _seal(self, rows: list[AuditRow]) -> list[tuple[Any, ...]]:
        assert self._next_id is not None
        first = self._next_id
        sealed = self._seal_numbered([(first + n, row) for n, row in enumerate(rows)])
        self._next_id = first + len(rows)
        return sealed

    def _seal_numbered(self, numbered: list[tuple[int, AuditRow]]) -> list[tuple[Any, ...]]:
        """(id, *row, chain_id, prev_hash, hash) per record, advancing the chain head."""
        head = self._chain_head
        assert head is not None
        chain = self._chain_id
        sealed = []
        for record_id, row in numbered:
            digest = link(head, canonical_bytes(record_id, chain, row))
            sealed.append((record_id, *row, chain, head, digest))
            head = digest
        self._chain_head = head
        if sealed:
            self._head_id, self._head_time_us = sealed[-1][0], sealed[-1][1]
            self._since_checkpoint += len(sealed)
        return sealed

    async def _checkpoint_periodically(self) -> None:
        """Signs the head every ``checkpoint_interval`` seconds while new records arrive."""
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            if self._since_checkpoint and self.healthy:
                # A failing store: health says so; the next interval tries again.
                with contextlib.suppress(Unavailable):
                    await self.checkpoint_now()

    def _published(self, sealed: list[tuple[Any, ...]]) -> None:
        if self._on_records is not None and sealed:
            self._on_records(sealed)

    async def _connect_claimed(self) -> AsyncConnection:
        """PostgreSQL: a new writer connection holding this chain's advisory lock."""
        connection, self.backend_pid = await claim_chain(self._engine, self._chain_id)
        return connection

    def _close_connections(self) -> None:
        if self._sync_connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._sync_connection.close()
            self._sync_connection = None


class _AloneRefused(Exception):
    """A job alone in its batch failed (a domain error, or the database refused its data):
    its transaction is rolled back whole and the job's caller gets ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _refused_data(error: DBAPIError) -> bool:
    """The database refused what a statement carried (SQLSTATE classes 22, data, and 23,
    integrity), not the connection or the store: asyncpg's errors reach SQLAlchemy as plain
    DBAPIErrors, so their SQLSTATE decides."""
    if isinstance(error, DataError | IntegrityError):
        return True
    return str(getattr(error.orig, "sqlstate", "") or "")[:2] in ("22", "23")


def _give_up(future: asyncio.Future[Any], error: Unavailable | None = None) -> None:
    """The write did not commit in time: answer UNAVAILABLE (it may still commit later, but no
    caller is told it succeeded before it did)."""
    if not future.done():
        future.set_exception(
            error
            or Unavailable("the store did not take the write in time", reason="AUDIT_UNAVAILABLE")
        )


# One statement and one parameter for the whole batch: the sealed rows as one JSON array of
# arrays (msgspec encodes it in one call, bytes as base64), taken apart by PostgreSQL. A column
# array per field (asyncpg encodes each element) cost the writer 4-8 µs more per record, and
# executemany sends a Bind and an Execute per row and runs the INSERT once per row.
_PG_SMALL = {"event_type", "actor_kind", "decision", "reason"}
_PG_TYPES = {"id": "bigint", "time_us": "bigint", "prev_hash": "bytea", "hash": "bytea"}


def _pg_field(index: int, name: str) -> str:
    kind = "smallint" if name in _PG_SMALL else _PG_TYPES.get(name, "text")
    if kind == "bytea":
        return f"decode(r->>{index}, 'base64')"
    return f"r->>{index}" if kind == "text" else f"(r->>{index})::{kind}"


_PG_INSERT = (
    f"INSERT INTO audit_records ({', '.join(SEALED_COLUMNS)}) SELECT "  # noqa: S608
    + ", ".join(_pg_field(n, name) for n, name in enumerate(SEALED_COLUMNS))
    + " FROM jsonb_array_elements($1::jsonb) AS r"
)
_PG_ROWS = msgspec.json.Encoder()
_PG_CHECKPOINT = (
    f"INSERT INTO audit_checkpoints ({', '.join(checkpoints.COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join(f'${n}' for n in range(1, len(checkpoints.COLUMNS) + 1))})"
)
# Records per INSERT statement on SQLite: a statement of many rows binds them in one call and runs
# once (executemany runs the statement per row, letting go of the GIL each time, which the gRPC
# poller thread then takes); 32 rows of 20 columns stay far below SQLite's 32,766 parameters, and
# the 32 statements (1 to 32 rows) stay in the sqlite3 module's statement cache (128).
SQLITE_ROWS_PER_INSERT = 32


@functools.cache
def _sqlite_insert(rows: int) -> str:
    """INSERT of ``rows`` audit records, their values in SEALED_COLUMNS order, row after row."""
    values = "(" + ", ".join("?" for _ in SEALED_COLUMNS) + ")"
    return (
        f"INSERT INTO audit_records ({', '.join(SEALED_COLUMNS)})"  # noqa: S608
        f" VALUES {', '.join([values] * rows)}"
    )


_SQLITE_MARK = f"UPDATE counters SET value = ? WHERE name = '{tables.AUDIT_ID_MARK}'"  # noqa: S608
_SQLITE_CHECKPOINT = (
    f"INSERT INTO audit_checkpoints ({', '.join(checkpoints.COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join('?' for _ in checkpoints.COLUMNS)})"
)


def _no_change(_connection: Connection) -> JobResult[None]:
    """The job of a checkpoint request: the batch itself signs the head."""
    return JobResult(None)


def _quiet(future: asyncio.Future[Any]) -> None:
    """Takes a future's outcome nobody awaits (the last batch's), so it is not reported."""
    if not future.cancelled():
        future.exception()


def _probe_write(connection: Connection) -> JobResult[None]:
    """A write that needs the store's write lock and changes nothing."""
    counters = tables.counters
    connection.execute(
        update(counters).where(counters.c.name == "session_serial").values(value=counters.c.value)
    )
    return JobResult(None)

"""Does the group commit keep a record's cost near the batched cost? (issue 5, point 2)

In one process, no gRPC, the server's own Journal (SQLite written on the event loop, as shipped),
Check-shaped records (1000 sessions, 100 users), at batch sizes 1, 8, 64 and 256, in one run:

* batched: the journal's write path handed ready batches of that size directly (row, id, hash
  chain, executemany, commit): what a record costs when written in a batch, nobody waiting;
* group commit: as many concurrent appenders, each awaiting its record's commit before appending
  the next, as a Check awaits it before answering (the same write path, plus the queue, the
  writer task, a future per record and the callers' wake-ups);
* plain sqlite3: ready rows on the same schema, no hash chain, no Python per record (the store's
  own share).

CPU µs per record; the group commit ÷ batched ratio is the point. Over gRPC the batches are
smaller than the concurrency suggests (calls reach Python about one per loop pass);
bench/check_cost and bench/audit_cost measure the record's cost there.

usage: bench/journal_batching [--records 16384] [--rounds 3] [--out bench/out/journal_batching.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import harness as H
from agentid_server.domain.model import ActorKind, AuditEvent, Decision, EventType, Reason
from agentid_server.storage.database import INLINE_WRITER_BUSY_TIMEOUT, create_engines, migrate
from agentid_server.storage.journal import Journal
from agentid_server.storage.journal import _Item as Item
from agentid_server.storage.rows import SEALED_COLUMNS

SIZES = (1, 8, 64, 256)
RAW_BATCHES = (1, 8, 64, 256, 1000)
EVENTS = 4096  # built before measuring: building them is the caller's cost, not the journal's
WARM_UP = 4096  # records written before measuring, in every run alike


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def check_event(n: int) -> AuditEvent:
    return AuditEvent(
        time=time.time(),
        event_type=EventType.CHECK,
        actor_kind=ActorKind.SERVICE,
        actor_id="payments-api",
        session_id=f"ses_{n % 1000:026d}",
        user_id=f"user-{n % 100}",
        scopes=("tickets.read", "tickets.comment"),
        agent_id="support-bot",
        action="tickets.read",
        resource=f"ticket/{n}",
        decision=Decision.ALLOW,
        reason=Reason.UNSPECIFIED,
    )


async def empty_database(path: Path) -> Path:
    """A database with the server's schema (its Alembic migrations) and no records."""
    engines = create_engines(f"sqlite+aiosqlite:///{path}")
    await migrate(engines.main)
    await engines.dispose()
    return path


def fresh_copy(template: Path, path: Path) -> Path:
    """Every run starts from the same empty database, so none inherits another's records."""
    shutil.copyfile(template, path)
    return path


@contextlib.asynccontextmanager
async def running_journal(path: Path, batches: list[int] | None = None) -> AsyncIterator[Journal]:
    engines = create_engines(
        f"sqlite+aiosqlite:///{path}", writer_busy_timeout=INLINE_WRITER_BUSY_TIMEOUT
    )
    journal = Journal(
        engines.main,
        engines.sqlite_writer,
        max_batch=2048,
        sqlite_inline=True,
        on_records=(lambda rows: batches.append(len(rows))) if batches is not None else None,
    )
    await journal.claim()
    journal.start()
    try:
        yield journal
    finally:
        await journal.stop()
        await engines.dispose()


async def group_commit_run(
    path: Path, events: list[AuditEvent], concurrency: int, records: int
) -> dict[str, Any]:
    """Appenders that each await their record's commit, as Checks do."""
    batches: list[int] = []
    async with running_journal(path, batches) as journal:

        async def appender(first: int, count: int) -> None:
            for n in range(first, first + count * concurrency, concurrency):
                await journal.append(events[n % EVENTS])

        async def run(count: int) -> None:
            await asyncio.gather(*(appender(k, count // concurrency) for k in range(concurrency)))

        await run(WARM_UP)
        batches.clear()
        start_cpu = cpu_seconds()
        await run(records)
        spent = cpu_seconds() - start_cpu
    written = records // concurrency * concurrency
    return {
        "records": written,
        "us_per_record": round(spent / written * 1e6, 1),
        "mean_batch": round(sum(batches) / len(batches), 1),
    }


async def batched_run(
    path: Path, events: list[AuditEvent], size: int, records: int
) -> dict[str, Any]:
    """The same write path given ready batches of ``size`` records: nobody waits on a future."""
    async with running_journal(path) as journal:
        loop = asyncio.get_running_loop()

        def run(count: int) -> None:
            for first in range(0, count - count % size, size):
                # The journal's write of one batch as its writer task makes it (private on
                # purpose: no server code hands the journal a batch without callers), with an
                # item and a future per record as append() makes them.
                batch = [
                    Item(loop.create_future(), event=events[(first + k) % EVENTS])
                    for k in range(size)
                ]
                journal._write_sqlite(batch)
                journal._pending_records.clear()  # handed to followers after each commit

        run(WARM_UP)
        start_cpu = cpu_seconds()
        run(records)
        spent = cpu_seconds() - start_cpu
    written = records - records % size
    return {"records": written, "us_per_record": round(spent / written * 1e6, 1)}


def raw_run(path: Path, per_commit: int, rows: int) -> float:
    """CPU µs per row of plain sqlite3 inserting ready rows, ``per_commit`` per transaction."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    names = ", ".join(SEALED_COLUMNS)
    insert = f"INSERT INTO audit_records ({names}) VALUES ({', '.join('?' * len(SEALED_COLUMNS))})"  # noqa: S608
    top = db.execute("SELECT coalesce(max(id), 0) FROM audit_records").fetchone()[0]
    ready = [
        (top + 1 + n, int(time.time() * 1e6), 2, f"ses_{n % 1000:026d}", f"user-{n % 100}",
         '["tickets.read","tickets.comment"]', "support-bot", 3, "payments-api", "tickets.read",
         f"ticket/{n}", 1, 0, "", "", None, "", "main", os.urandom(32), os.urandom(32))
        for n in range(WARM_UP + rows)
    ]  # fmt: skip

    def write(first: int, count: int) -> None:
        end = first + count
        for offset in range(first, end, per_commit):
            db.executemany(insert, ready[offset : min(offset + per_commit, end)])
            db.commit()

    write(0, WARM_UP)
    start = cpu_seconds()
    write(WARM_UP, rows)
    spent = cpu_seconds() - start
    db.close()
    return round(spent / rows * 1e6, 1)


async def measure(records: int, rounds: int) -> dict[str, Any]:
    """Each round measures every size both ways, alternating which goes first; medians."""
    events = [check_event(n) for n in range(EVENTS)]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(size): {"batched": [], "group_commit": []} for size in SIZES
    }
    raw: dict[str, list[float]] = {str(n): [] for n in RAW_BATCHES}
    with tempfile.TemporaryDirectory(prefix="agentid-journal-") as folder:
        template = await empty_database(Path(folder) / "empty.db")
        for round_ in range(rounds):
            for size in SIZES:
                order = (
                    ("batched", "group_commit") if round_ % 2 == 0 else ("group_commit", "batched")
                )
                for kind in order:
                    path = fresh_copy(template, Path(folder) / f"{kind}-{size}-{round_}.db")
                    run = batched_run if kind == "batched" else group_commit_run
                    result = await run(path, events, size, records)
                    runs[str(size)][kind].append(result)
                    H.log(f"round {round_ + 1}, {kind}, {size}: {result}")
            for per_commit in RAW_BATCHES:
                path = fresh_copy(template, Path(folder) / f"raw-{per_commit}-{round_}.db")
                raw[str(per_commit)].append(raw_run(path, per_commit, records))
    report: dict[str, Any] = {"sizes": {}, "raw_sqlite_us_per_row": {}}
    for n, values in raw.items():
        report["raw_sqlite_us_per_row"][n] = statistics.median(values)
    for label, kinds in runs.items():
        batched = statistics.median(r["us_per_record"] for r in kinds["batched"])
        grouped = statistics.median(r["us_per_record"] for r in kinds["group_commit"])
        ratios = [
            g["us_per_record"] / b["us_per_record"]
            for g, b in zip(kinds["group_commit"], kinds["batched"], strict=True)
        ]
        report["sizes"][label] = {
            "batched_us_per_record": batched,
            "group_commit_us_per_record": grouped,
            "group_commit_vs_batched": round(statistics.median(ratios), 2),
            "mean_batch": statistics.median(r["mean_batch"] for r in kinds["group_commit"]),
            "raw_sqlite_us_per_row": report["raw_sqlite_us_per_row"][label],
            "rounds": kinds,
        }
    one = report["sizes"]["1"]["group_commit_us_per_record"]
    for row in report["sizes"].values():
        row["group_commit_vs_one_appender"] = round(row["group_commit_us_per_record"] / one, 2)
    return report


def print_summary(report: dict[str, Any]) -> None:
    raw = report["raw_sqlite_us_per_row"]
    print("plain sqlite3, ready rows, CPU µs per row by rows per commit: "
          + ", ".join(f"{n}: {us}" for n, us in raw.items()))  # fmt: skip
    print("the journal, CPU µs per record (medians over rounds):")
    print(f"{'size':>5s} {'batched':>8s} {'group commit':>13s} {'÷ batched':>10s}"
          f" {'mean batch':>11s} {'÷ 1 appender':>13s} {'plain sqlite3':>14s}")  # fmt: skip
    for size, row in report["sizes"].items():
        print(
            f"{size:>5s} {row['batched_us_per_record']:>8.1f}"
            f" {row['group_commit_us_per_record']:>13.1f} {row['group_commit_vs_batched']:>10.2f}"
            f" {row['mean_batch']:>11.1f} {row['group_commit_vs_one_appender']:>13.2f}"
            f" {row['raw_sqlite_us_per_row']:>14.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=16384, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=H.OUT / "journal_batching.json")
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    args = parser.parse_args()
    H.exit_on_signals()
    report = asyncio.run(measure(args.records, args.rounds))
    report.update(
        machine=H.machine_info(),
        code=H.code_under_test(None),
        records=args.records,
        rounds=args.rounds,
    )
    return H.finish(report, args.out, print_summary)


if __name__ == "__main__":
    raise SystemExit(main())

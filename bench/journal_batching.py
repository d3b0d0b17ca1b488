"""Does the group commit keep a record's cost near the batched cost? (issue 5, point 2)

In one process, no gRPC: the server's own Journal (SQLite written on the event loop, as shipped)
takes Check-shaped audit records from 1, 8, 64 and 256 concurrent appenders, each awaiting its
record's commit before appending the next, as a Check awaits it before answering. The CPU per
record (row, id, hash chain, future, insert, commit) and the mean batch size are compared, in the
same run, with plain sqlite3 on the same schema writing ready-made rows one per commit and 1000
per commit.

Over gRPC the batches are smaller than the concurrency suggests (gRPC aio hands calls to Python
about one per loop pass); bench/check_cost and bench/audit_cost measure the record's cost there.

usage: bench/journal_batching [--seconds 3] [--out bench/out/journal_batching.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import harness as H
from agentid_server.domain.model import ActorKind, AuditEvent, Decision, EventType, Reason
from agentid_server.storage.database import INLINE_WRITER_BUSY_TIMEOUT, create_engines, migrate
from agentid_server.storage.journal import Journal
from agentid_server.storage.rows import SEALED_COLUMNS

CONCURRENCY = (1, 8, 64, 256)
RAW_BATCHES = (1, 8, 64, 256, 1000)


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


async def journal_run(path: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{path}"
    engines = create_engines(url, writer_busy_timeout=INLINE_WRITER_BUSY_TIMEOUT)
    batches: list[int] = []
    journal = Journal(
        engines.main,
        engines.sqlite_writer,
        max_batch=2048,
        sqlite_inline=True,
        on_records=lambda rows: batches.append(len(rows)),
    )
    await journal.claim()
    journal.start()
    written = 0
    stop = 0.0

    async def appender(first: int) -> None:
        nonlocal written
        n = first
        while time.monotonic() < stop:
            await journal.append(check_event(n))
            written += 1
            n += concurrency

    try:
        stop = time.monotonic() + 0.5  # warm-up
        await asyncio.gather(*(appender(k) for k in range(concurrency)))
        written, batches[:] = 0, []
        start_cpu = cpu_seconds()
        stop = time.monotonic() + seconds
        await asyncio.gather(*(appender(k) for k in range(concurrency)))
        spent = cpu_seconds() - start_cpu
    finally:
        await journal.stop()
        await engines.dispose()
    return {
        "records": written,
        "us_per_record": round(spent / written * 1e6, 1),
        "mean_batch": round(sum(batches) / len(batches), 1),
    }


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
        for n in range(rows)
    ]  # fmt: skip
    start = cpu_seconds()
    for offset in range(0, rows, per_commit):
        db.executemany(insert, ready[offset : offset + per_commit])
        db.commit()
    spent = cpu_seconds() - start
    db.close()
    return round(spent / rows * 1e6, 1)


async def measure(seconds: float) -> dict[str, Any]:
    report: dict[str, Any] = {"journal": {}, "raw_sqlite_us_per_row": {}}
    with tempfile.TemporaryDirectory(prefix="agentid-journal-") as folder:
        template = await empty_database(Path(folder) / "empty.db")
        for concurrency in CONCURRENCY:
            path = fresh_copy(template, Path(folder) / f"journal-{concurrency}.db")
            report["journal"][str(concurrency)] = await journal_run(path, concurrency, seconds)
            H.log(f"journal, {concurrency} appenders: {report['journal'][str(concurrency)]}")
        for per_commit in RAW_BATCHES:
            path = fresh_copy(template, Path(folder) / f"raw-{per_commit}.db")
            rows = 4000 if per_commit == 1 else 20480
            report["raw_sqlite_us_per_row"][str(per_commit)] = raw_run(path, per_commit, rows)
    raw = report["raw_sqlite_us_per_row"]
    for concurrency, row in report["journal"].items():
        # The journal's batch is its concurrency (every appender waits for its commit).
        row["raw_same_batch_us_per_row"] = raw[concurrency]
        row["over_raw_same_batch_us"] = round(row["us_per_record"] - raw[concurrency], 1)
        row["vs_raw_1_per_commit"] = round(row["us_per_record"] / raw["1"], 2)
    return report


def print_summary(report: dict[str, Any]) -> None:
    raw = report["raw_sqlite_us_per_row"]
    print("plain sqlite3, ready rows, CPU µs per row by rows per commit: "
          + ", ".join(f"{n}: {us}" for n, us in raw.items()))  # fmt: skip
    print("journal, CPU µs per record (row, id, hash chain, future, insert, commit):")
    print(f"{'appenders':>9s} {'µs/record':>10s} {'mean batch':>11s} {'raw, same batch':>16s}"
          f" {'journal - raw':>14s} {'÷ one per commit':>17s}")  # fmt: skip
    for concurrency, row in report["journal"].items():
        print(
            f"{concurrency:>9s} {row['us_per_record']:>10.1f} {row['mean_batch']:>11.1f}"
            f" {row['raw_same_batch_us_per_row']:>16.1f} {row['over_raw_same_batch_us']:>14.1f}"
            f" {row['vs_raw_1_per_commit']:>17.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per concurrency level")
    parser.add_argument("--out", type=Path, default=H.OUT / "journal_batching.json")
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    args = parser.parse_args()
    H.exit_on_signals()
    report = asyncio.run(measure(args.seconds))
    report.update(machine=H.machine_info(), code=H.code_under_test(None), seconds=args.seconds)
    return H.finish(report, args.out, print_summary)


if __name__ == "__main__":
    raise SystemExit(main())

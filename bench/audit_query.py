"""The audit trail's two questions on 1M records (bar: "what did session S do" < 50 ms).

Builds a SQLite database with the real schema (the server's Alembic migrations), fills it with
1M records in a realistic shape (10,000 agent sessions of 100 records each, most of them Checks,
spread over 1,000 users), then asks, through the server's own repository code, for:
* what did session S do (records of S and the DELEGATE records of its children), and
* what did user U authorise (user U's own actions),
for 200 random sessions and users, and reports p50/p99/max in milliseconds.

usage: bench/audit_query [--records 1000000] [--out bench/out/audit_query.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agentid_server.domain.audit import AuditQuery
from agentid_server.domain.model import ActorKind
from agentid_server.storage.audit import AuditRepository
from agentid_server.storage.database import create_engines, migrate

SESSION_RECORDS = 100
USERS = 1000
ASKS = 200
BAR_MS = 50.0


def session_id(n: int) -> str:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    digits = ""
    for _ in range(6):
        n, r = divmod(n, 32)
        digits = alphabet[r] + digits
    return "ses_" + "0" * 20 + digits


def fill(path: Path, records: int) -> float:
    """Inserts the records straight through sqlite3 (fast), in id order."""
    sessions = records // SESSION_RECORDS
    start = time.perf_counter()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    rng = random.Random(11)
    now_us = int(time.time() * 1_000_000)
    columns = (
        "id, time_us, event_type, session_id, user_id, scopes, agent_id, actor_kind, actor_id, "
        "action, resource, decision, reason, parent_session_id, step_up_id, context, detail, "
        "chain_id, prev_hash, hash"
    )
    insert = f"INSERT INTO audit_records ({columns}) VALUES ({', '.join('?' * 20)})"  # noqa: S608
    batch: list[tuple[object, ...]] = []
    # Sessions interleave in time, as they do in production: walk them round-robin.
    order = [s for _ in range(SESSION_RECORDS) for s in range(sessions)]
    written = [0] * sessions
    for record_id, s in enumerate(order, start=1):
        user = f"user-{s % USERS}"
        parent = session_id(s - 1) if s % 10 and written[s] == 0 else ""
        first = written[s] == 0
        written[s] += 1
        batch.append(
            (
                record_id, now_us + record_id, 1 if first else 2, session_id(s), user,
                '["tickets.*"]', "support-bot", 1 if first else 3, user if first else "api",
                "agentid.delegate" if first else "tickets.read", f"ticket/{rng.randrange(10**6)}",
                0 if first else 1, 0 if first else 1, parent, "", None, "", "main", b"", b"",
            )
        )  # fmt: skip
        if len(batch) == 50_000:
            db.executemany(insert, batch)
            batch.clear()
    db.executemany(insert, batch)
    db.commit()
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - start


async def ask(url: str, records: int) -> dict[str, object]:
    engines = create_engines(url)
    repo = AuditRepository(engines.main)
    rng = random.Random(5)
    sessions = records // SESSION_RECORDS
    results: dict[str, object] = {}
    try:

        def by_session() -> AuditQuery:
            return AuditQuery(session_ids=(session_id(rng.randrange(sessions)),))

        def by_user() -> AuditQuery:
            return AuditQuery(user_id=f"user-{rng.randrange(USERS)}", actor_kind=ActorKind.USER)

        questions: list[tuple[str, Callable[[], AuditQuery]]] = [
            ("session", by_session),
            ("user_authorised", by_user),
        ]
        for name, make in questions:
            await repo.query(make())  # warm the connection and the page cache
            timings: list[float] = []
            sizes: list[int] = []
            for _ in range(ASKS):
                query = make()
                start = time.perf_counter()
                found = await repo.query(query)
                timings.append((time.perf_counter() - start) * 1000)
                sizes.append(len(found))
            timings.sort()
            results[name] = {
                "asks": ASKS,
                "records_per_answer": statistics.median(sizes),
                "p50_ms": round(timings[len(timings) // 2], 2),
                "p99_ms": round(timings[int(len(timings) * 0.99) - 1], 2),
                "max_ms": round(timings[-1], 2),
            }
    finally:
        await engines.dispose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/audit_query.json"))
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentid-audit-") as folder:
        path = Path(folder) / "audit.db"
        url = f"sqlite+aiosqlite:///{path}"
        engines = create_engines(url)
        asyncio.run(migrate(engines.main))
        asyncio.run(engines.dispose())
        filled = fill(path, args.records)
        results = asyncio.run(ask(url, args.records))
    print(f"{args.records} records written in {filled:.1f} s")
    for name, r in results.items():
        assert isinstance(r, dict)
        met = "met" if r["p99_ms"] < BAR_MS else "NOT met"
        print(
            f"{name:<16} p50 {r['p50_ms']:>7} ms  p99 {r['p99_ms']:>7} ms  max {r['max_ms']:>7} ms"
            f"  ({r['records_per_answer']} records per answer)  bar < {BAR_MS:.0f} ms: {met}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"benchmark": "audit_query", "records": args.records, "results": results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

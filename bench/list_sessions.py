"""ListSessions' reads on 1M sessions (bar: p99 < 20 ms for a user's and an agent's page).

Builds a SQLite database with the real schema (the server's Alembic migrations, so the indexes
of migration 0012), fills it with 1M sessions created over the last 7 days, 15-minute tokens
(some 60-minute), 2% revoked, sub-agents under every tenth session; spread over 10,000 users plus
one hot user holding 2% of them, and 20 agent kinds of which one holds half. Sessions are never
pruned, so nearly all are ended: the live ones are those of the last quarter hour or so. Then
asks, through the server's own repository code (storage/session_listing.py), for one page of 100:
* a user's live sessions, and every session of theirs from a cursor deep in their history;
* the same for the hot user, for the biggest agent kind, and for everyone (an auditor);
200 times each (users and cursors drawn at random), and reports p50/p99/max in milliseconds.
No ANALYZE is run: the server never runs it, so the plans are the ones it gets.

usage: bench/list_sessions [--sessions 1000000] [--out bench/out/list_sessions.json]
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

from agentid_server.domain.sessions import Cursor, SessionQuery
from agentid_server.storage.database import create_engines, migrate
from agentid_server.storage.session_listing import SessionListing

USERS = 10_000
AGENTS = 20
HISTORY = 7 * 86_400  # seconds of history the sessions were created over
ASKS = 200
PAGE = 100
BAR_MS = 20.0
COLUMNS = (
    "id, serial, user_id, agent_id, parent_id, scopes, audiences, task, jkt, created_at, "
    "expires_at, revoked_at, revoke_reason"
)


def session_id(n: int) -> str:
    return f"ses_{n:026d}"


def user_of(rng: random.Random) -> str:
    return "user-hot" if rng.random() < 0.02 else f"user-{rng.randrange(USERS)}"


def agent_of(rng: random.Random) -> str:
    return "agent-0" if rng.random() < 0.5 else f"agent-{rng.randrange(1, AGENTS)}"


def fill(path: Path, sessions: int, now: int) -> float:
    """Inserts the sessions straight through sqlite3 (fast), oldest first, as they were made."""
    start = time.perf_counter()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    rng = random.Random(7)
    insert = f"INSERT INTO sessions ({COLUMNS}) VALUES ({', '.join('?' * 13)})"  # noqa: S608
    batch: list[tuple[object, ...]] = []
    first = now - HISTORY
    for n in range(1, sessions + 1):
        created = first + HISTORY * n // sessions
        expires = created + (3600 if rng.random() < 0.1 else 900)
        revoked = rng.random() < 0.02
        batch.append(
            (
                session_id(n), n, user_of(rng), agent_of(rng),
                session_id(n - 1) if n % 10 == 0 else None, '["tickets.read"]', "[]", "", "",
                created, expires, created + 60 if revoked else None,
                "task_complete" if revoked else None,
            )
        )  # fmt: skip
        if len(batch) == 50_000:
            db.executemany(insert, batch)
            batch.clear()
    db.executemany(insert, batch)
    db.commit()
    db.close()
    return time.perf_counter() - start


def questions(now: int) -> list[tuple[str, Callable[[random.Random], SessionQuery]]]:
    def deep(rng: random.Random) -> Cursor:  # a page somewhere in the history
        return Cursor(now - rng.randrange(HISTORY), 1 << 40)

    def live(user_id: str = "", agent_id: str = "") -> Callable[[random.Random], SessionQuery]:
        return lambda rng: SessionQuery(user_id, agent_id, now=now, limit=PAGE + 1)

    def ended(user_id: str = "", agent_id: str = "") -> Callable[[random.Random], SessionQuery]:
        return lambda rng: SessionQuery(
            user_id, agent_id, include_ended=True, after=deep(rng), now=now, limit=PAGE + 1
        )

    def user_live(rng: random.Random) -> SessionQuery:
        return SessionQuery(user_id=f"user-{rng.randrange(USERS)}", now=now, limit=PAGE + 1)

    def user_ended(rng: random.Random) -> SessionQuery:
        user = f"user-{rng.randrange(USERS)}"
        return SessionQuery(
            user_id=user, include_ended=True, after=deep(rng), now=now, limit=PAGE + 1
        )

    return [
        ("user_live", user_live),
        ("user_all_deep", user_ended),
        ("hot_user_live", live(user_id="user-hot")),
        ("hot_user_all_deep", ended(user_id="user-hot")),
        ("agent_live", live(agent_id="agent-0")),
        ("agent_all_deep", ended(agent_id="agent-0")),
        ("everyone_live", live()),
        ("everyone_all_deep", ended()),
    ]


async def ask(url: str, now: int) -> dict[str, dict[str, float]]:
    engines = create_engines(url)
    listing = SessionListing(engines.main)
    rng = random.Random(5)
    results: dict[str, dict[str, float]] = {}
    try:
        for name, make in questions(now):
            await listing.list_sessions(make(rng))  # warm the connection and the page cache
            timings: list[float] = []
            sizes: list[int] = []
            for _ in range(ASKS):
                query = make(rng)
                start = time.perf_counter()
                found = await listing.list_sessions(query)
                timings.append((time.perf_counter() - start) * 1000)
                sizes.append(len(found))
            timings.sort()
            results[name] = {
                "asks": ASKS,
                "sessions_per_answer": statistics.median(sizes),
                "p50_ms": round(timings[len(timings) // 2], 2),
                "p99_ms": round(timings[int(len(timings) * 0.99) - 1], 2),
                "max_ms": round(timings[-1], 2),
            }
    finally:
        await engines.dispose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/out/list_sessions.json"))
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    args = parser.parse_args()
    now = int(time.time())
    with tempfile.TemporaryDirectory(prefix="agentid-sessions-") as folder:
        path = Path(folder) / "sessions.db"
        url = f"sqlite+aiosqlite:///{path}"
        engines = create_engines(url)
        asyncio.run(migrate(engines.main))
        asyncio.run(engines.dispose())
        filled = fill(path, args.sessions, now)
        results = asyncio.run(ask(url, now))
    print(f"{args.sessions} sessions written in {filled:.1f} s")
    for name, r in results.items():
        barred = name.startswith(("user", "hot_user", "agent"))
        met = r["p99_ms"] < BAR_MS
        verdict = f"bar < {BAR_MS:.0f} ms: {'met' if met else 'NOT met'}" if barred else ""
        print(
            f"{name:<18} p50 {r['p50_ms']:>7} ms  p99 {r['p99_ms']:>7} ms  max {r['max_ms']:>7} ms"
            f"  ({r['sessions_per_answer']:.0f} per page)  {verdict}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"benchmark": "list_sessions", "sessions": args.sessions, "results": results},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

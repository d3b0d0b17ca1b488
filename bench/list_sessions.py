"""ListSessions' reads on 1M sessions (bar: p99 < 20 ms for a user's and an agent's page).

Builds a SQLite database with the real schema (the server's Alembic migrations, so the indexes
of migration 0012), fills it with 1M sessions created over the last 7 days, 15-minute tokens
(some 60-minute), 2% revoked, sub-agents under every tenth session; spread over 10,000 users plus
one hot user holding 2% of them, and 20 agent kinds of which one holds half. Sessions are never
pruned, so nearly all are ended: the live ones are those of the last quarter hour or so. Then
asks, through the server's own repository code (storage/session_listing.py), for one page of 100:
* a user's live sessions, and every session of theirs from a cursor deep in their history;
* the same for the hot user, for the biggest agent kind, and for everyone (an auditor);
200 times each (users and cursors drawn at random), and reports p50/p99/max in milliseconds,
beside the same for a read of nothing (`round_trip`: SELECT 1 through the same path), the floor.
Then the kill switch: one slice of a Revoke by agent_id (DisableAgent), the statement the
repository runs (`revoke_job.READS["of_agent"]`: a recursive CTE from the agent's sessions not
expired yet down parent_id, then the next 250 live ones by serial), for the biggest agent kind
and a small one, 50 times each, read only (nothing is revoked), on the connection the journal
would use.

SQLite (the default, a new file): no ANALYZE is run, the server never runs one, so the plans are
the ones it gets. PostgreSQL (`--database postgresql+asyncpg://...`): the database is migrated by
the server's own code, filled with COPY, then `VACUUM (ANALYZE) sessions` is run, because
PostgreSQL's autovacuum does the same on its own within a minute or so of such a load (1M rows
inserted is far past both its insert-vacuum and its analyze thresholds): the plans measured are
the ones a server gets once autovacuum has been by, not those of the first seconds after a bulk
load. `--wipe` drops the project's tables first (only then may the database hold them).

`--reuse` asks a database a previous run filled, as it is: the same questions once the load's
writes have been flushed (right after a bulk load the checkpointer writes it out meanwhile).

usage: bench/list_sessions [--sessions 1000000] [--database URL [--wipe | --reuse]] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from agentid_server.domain.sessions import Cursor, SessionQuery
from agentid_server.storage import tables
from agentid_server.storage.database import Engines, create_engines, migrate, read_all
from agentid_server.storage.revoke_job import READS
from agentid_server.storage.session_listing import SessionListing
from sqlalchemy import (
    Connection,
    literal,
    make_url,
    select,
    text,
)

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
KILL_RUNS = 50
KILL_SLICE = 250  # RevocationRepository.revoke's default limit
KILL_BAR_MS = 50.0  # a slice is one statement of a journal batch: anything near this is slow
KILL_AGENTS = {"kill_biggest_agent": "agent-0", "kill_small_agent": "agent-7"}


KILL_STATEMENTS = {"": READS["of_agent"]}


def session_id(n: int) -> str:
    return f"ses_{n:026d}"


def user_of(rng: random.Random) -> str:
    return "user-hot" if rng.random() < 0.02 else f"user-{rng.randrange(USERS)}"


def agent_of(rng: random.Random) -> str:
    return "agent-0" if rng.random() < 0.5 else f"agent-{rng.randrange(1, AGENTS)}"


def rows(sessions: int, now: int) -> Iterator[tuple[Any, ...]]:
    """The sessions, oldest first, as they were made (the same ones on every backend)."""
    rng = random.Random(7)
    first = now - HISTORY
    for n in range(1, sessions + 1):
        created = first + HISTORY * n // sessions
        expires = created + (3600 if rng.random() < 0.1 else 900)
        revoked = rng.random() < 0.02
        yield (
            session_id(n), n, user_of(rng), agent_of(rng),
            session_id(n - 1) if n % 10 == 0 else None, '["tickets.read"]', "[]", "", "",
            created, expires, created + 60 if revoked else None,
            "task_complete" if revoked else None,
        )  # fmt: skip


def fill(path: Path, sessions: int, now: int) -> float:
    """Inserts the sessions straight through sqlite3 (fast), oldest first, as they were made."""
    start = time.perf_counter()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    insert = f"INSERT INTO sessions ({COLUMNS}) VALUES ({', '.join('?' * 13)})"  # noqa: S608
    batch: list[tuple[object, ...]] = []
    for row in rows(sessions, now):
        batch.append(row)
        if len(batch) == 50_000:
            db.executemany(insert, batch)
            batch.clear()
    db.executemany(insert, batch)
    db.commit()
    db.close()
    return time.perf_counter() - start


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# The project's functions (migration 0016), dropped with its tables.
FUNCTIONS = ("agentid_take_audit_ids(bigint, integer)",)


async def prepare_postgres(url: str, wipe: bool, *, schema: bool = True) -> None:
    """A database of the project's schema and nothing in it (without ``schema``: of nothing of
    the project's, for servers that create it themselves, maybe of another revision): refused if
    it holds the project's tables already, unless ``wipe`` (then they are dropped first, and its
    functions: only the project's own)."""
    names = [t.name for t in reversed(tables.metadata.sorted_tables)] + ["alembic_version"]
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        present = [n for n in names if await connection.fetchval("SELECT to_regclass($1)", n)]
        if present and not wipe:
            database = make_url(url).database
            raise SystemExit(f"{database} holds {', '.join(present)}: pass --wipe to drop them")
        for name in present:
            await connection.execute(f'DROP TABLE IF EXISTS "{name}" CASCADE')
        for function in FUNCTIONS:
            await connection.execute(f"DROP FUNCTION IF EXISTS {function}")
    finally:
        await connection.close()
    if not schema:
        return
    engines = create_engines(url)
    try:
        await migrate(engines.main)
    finally:
        await engines.dispose()


async def filled_before(url: str) -> tuple[int, int]:
    """The `now` a previous run filled the database for (its newest session was created then)
    and how many sessions it holds."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await connection.fetchrow("SELECT max(created_at), count(*) FROM sessions")
        return int(row[0]), int(row[1])
    finally:
        await connection.close()


async def fill_postgres(url: str, sessions: int, now: int) -> tuple[float, float]:
    """COPY of the same sessions into the migrated table (its indexes in place, as a server's),
    then VACUUM (ANALYZE): what autovacuum does by itself shortly after such a load. Returns the
    seconds of the load and of the VACUUM (ANALYZE)."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute("SET synchronous_commit = off")
        start = time.perf_counter()
        columns = [c.strip() for c in COLUMNS.split(",")]
        batch: list[tuple[Any, ...]] = []
        async with connection.transaction():
            for row in rows(sessions, now):
                batch.append(row)
                if len(batch) == 100_000:
                    await connection.copy_records_to_table(
                        "sessions", records=batch, columns=columns
                    )
                    batch.clear()
            await connection.copy_records_to_table("sessions", records=batch, columns=columns)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        await connection.execute("VACUUM (ANALYZE) sessions")
        return loaded, time.perf_counter() - start
    finally:
        await connection.close()


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
        # The floor: a read of nothing (SELECT 1) through the same path (read_all, the pool, the
        # driver), so a page's tail can be told from the machine's and the round trip's.
        trivial = select(literal(1))
        await read_all(engines.main, trivial)
        timings: list[float] = []
        for _ in range(ASKS):
            start = time.perf_counter()
            await read_all(engines.main, trivial)
            timings.append((time.perf_counter() - start) * 1000)
        results["round_trip"] = {"asks": ASKS, "sessions_per_answer": 0, **percentiles(timings)}
        for name, make in questions(now):
            await listing.list_sessions(make(rng))  # warm the connection and the page cache
            timings = []
            sizes: list[int] = []
            for _ in range(ASKS):
                query = make(rng)
                start = time.perf_counter()
                found = await listing.list_sessions(query)
                timings.append((time.perf_counter() - start) * 1000)
                sizes.append(len(found))
            results[name] = {
                "asks": ASKS,
                "sessions_per_answer": statistics.median(sizes),
                **percentiles(timings),
            }
    finally:
        await engines.dispose()
    return results


def percentiles(timings: list[float]) -> dict[str, float]:
    timings = sorted(timings)
    return {
        "p50_ms": round(timings[len(timings) // 2], 2),
        "p99_ms": round(timings[int(len(timings) * 0.99) - 1], 2),
        "max_ms": round(timings[-1], 2),
    }


def explain(connection: Connection, statement: Any, params: dict[str, Any]) -> str:
    """The plan of ``statement`` with ``params``: SQLite's EXPLAIN QUERY PLAN, or PostgreSQL's
    EXPLAIN (ANALYZE, BUFFERS) (a read: the statement only selects)."""
    dialect = connection.dialect
    compiled = statement.compile(dialect=dialect)
    values = tuple(params.get(n, compiled.params[n]) for n in compiled.positiontup or ())
    if dialect.name == "sqlite":
        found = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", values)
        return "\n".join(str(row[-1]) for row in found)
    found = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", values)
    return "\n".join(str(row[0]) for row in found)


def kill_slices(connection: Connection, now: int) -> dict[str, dict[str, Any]]:
    """One slice of a Revoke by agent_id, as the repository's job runs it
    (`revoke_job.READS["of_agent"]` on the journal's connection), for each agent of KILL_AGENTS:
    first all its slices once (how many live sessions the agent's subtrees hold), then the first
    slice KILL_RUNS times, then its plan. Inside a transaction that is rolled back; nothing is
    written."""
    results: dict[str, dict[str, Any]] = {}
    with connection.begin() as transaction:
        for name, agent in KILL_AGENTS.items():
            for variant, statement in KILL_STATEMENTS.items():
                results[name + variant] = kill_slice(connection, statement, agent, now)
        transaction.rollback()
    return results


def kill_slice(connection: Connection, statement: Any, agent: str, now: int) -> dict[str, Any]:
    first = {"agent": agent, "now": now, "after": 0, "limit": KILL_SLICE}
    live, slices, after = 0, 0, 0
    while True:  # every slice once, as a DisableAgent would read them
        found = connection.execute(statement, {**first, "after": after}).all()
        live, slices = live + len(found), slices + 1
        if len(found) < KILL_SLICE:
            break
        after = found[-1].serial
    timings: list[float] = []
    for _ in range(KILL_RUNS):
        start = time.perf_counter()
        rows_found = len(connection.execute(statement, first).all())
        timings.append((time.perf_counter() - start) * 1000)
    return {
        "agent": agent,
        "runs": KILL_RUNS,
        "sessions_of_agent": connection.execute(
            text("SELECT count(*) FROM sessions WHERE agent_id = :a"), {"a": agent}
        ).scalar_one(),
        "live_in_subtrees": live,
        "slices": slices,
        "rows_in_first_slice": rows_found,
        **percentiles(timings),
        "plan": explain(connection, statement, first),
    }


async def kill_switch(url: str, now: int) -> dict[str, dict[str, Any]]:
    """kill_slices on the connection the journal would use: SQLite's synchronous writer engine,
    PostgreSQL's async engine through run_sync."""
    engines: Engines = create_engines(url)
    try:
        if engines.sqlite_writer is not None:
            with engines.sqlite_writer.connect() as connection:
                return kill_slices(connection, now)
        async with engines.main.connect() as connection:
            return await connection.run_sync(kill_slices, now)
    finally:
        await engines.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument(
        "--database",
        help="a PostgreSQL URL (postgresql+asyncpg://...); default: a new SQLite file",
    )
    parser.add_argument(
        "--wipe", action="store_true", help="drop the project's tables in --database first"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="ask a --database this benchmark filled before, as it is (no wipe, no fill)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default bench/out/list_sessions.json (list_sessions_postgresql.json with --database)",
    )
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    args = parser.parse_args()
    out: Path = args.out or Path(
        "bench/out/list_sessions_postgresql.json"
        if args.database
        else "bench/out/list_sessions.json"
    )
    now = int(time.time())
    load_before = os.getloadavg()
    if args.database:
        if make_url(args.database).get_backend_name() != "postgresql":
            raise SystemExit("--database takes a PostgreSQL URL (postgresql+asyncpg://...)")
        url = args.database
        if args.reuse:  # the sessions as a previous run left them; its `now` was the newest's
            now, args.sessions = asyncio.run(filled_before(url))
            filled, analyzed = 0.0, 0.0
        else:
            asyncio.run(prepare_postgres(url, args.wipe))
            filled, analyzed = asyncio.run(fill_postgres(url, args.sessions, now))
        results = asyncio.run(ask(url, now))
        kills = asyncio.run(kill_switch(url, now))
        backend = "postgresql"
    else:
        with tempfile.TemporaryDirectory(prefix="agentid-sessions-") as folder:
            path = Path(folder) / "sessions.db"
            url = f"sqlite+aiosqlite:///{path}"
            engines = create_engines(url)
            asyncio.run(migrate(engines.main))
            asyncio.run(engines.dispose())
            filled, analyzed = fill(path, args.sessions, now), 0.0
            results = asyncio.run(ask(url, now))
            kills = asyncio.run(kill_switch(url, now))
        backend = "sqlite"
    load_after = os.getloadavg()
    analysis = f", VACUUM (ANALYZE) in {analyzed:.1f} s" if backend == "postgresql" else ""
    print(f"{backend}: {args.sessions} sessions written in {filled:.1f} s{analysis}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for name, r in results.items():
        barred = name.startswith(("user", "hot_user", "agent"))
        met = r["p99_ms"] < BAR_MS
        verdict = f"bar < {BAR_MS:.0f} ms: {'met' if met else 'NOT met'}" if barred else ""
        print(
            f"{name:<27} p50 {r['p50_ms']:>7} ms  p99 {r['p99_ms']:>7} ms  max {r['max_ms']:>7} ms"
            f"  ({r['sessions_per_answer']:.0f} per page)  {verdict}"
        )
    for name, k in kills.items():
        met = k["p99_ms"] < KILL_BAR_MS
        print(
            f"{name:<27} p50 {k['p50_ms']:>7} ms  p99 {k['p99_ms']:>7} ms  max {k['max_ms']:>7} ms"
            f"  ({k['agent']}: {k['sessions_of_agent']} sessions, {k['live_in_subtrees']} live"
            f" in its subtrees, {k['slices']} slices; {k['rows_in_first_slice']} in the first)"
            f"  p99 < {KILL_BAR_MS:.0f} ms: {'met' if met else 'NOT met'}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "list_sessions",
                "backend": backend,
                "sessions": args.sessions,
                "fill_s": round(filled, 1),
                "vacuum_analyze_s": round(analyzed, 1),
                "load_average_before": load_before,
                "load_average_after": load_after,
                "results": results,
                "kill_switch": kills,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

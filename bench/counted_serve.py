"""`agentid serve` with every statement it sends to its database counted, for bench/revoke_cost.

Counted at the driver, below SQLAlchemy and below the journal's raw paths, so nothing is missed:

* SQLite: sqlite3's trace callback on every connection (the writer's and aiosqlite's), which
  SQLite calls for each statement it runs, BEGIN, COMMIT, SAVEPOINT and RELEASE included (the
  ones pysqlite issues by itself too), and for each row of an executemany;
* PostgreSQL: each asyncpg call that sends a statement and waits for its answer (a simple query,
  a bind-and-execute of a prepared statement, an executemany): one round trip each. Preparing a
  statement not yet in a cache is a round trip too, and not counted (there are none once warm).

Counts go, by the statement's first word, into a small file of int64 counters (mmap), which the
benchmark reads whenever it likes. With ``--profile``, SIGUSR2 starts cProfile on the event loop's
thread and the next SIGUSR2 writes the profile to ``<counts>.prof<N>`` (N from 1): diagnostics
only, a profiled server costs more. ``--trace FILE`` appends every statement to FILE too.

usage: counted_serve.py COUNTS_FILE CONFIG [--profile] [--trace FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import mmap
import re
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

KINDS = (
    "select", "with", "insert", "update", "delete", "begin", "commit", "rollback", "savepoint",
    "release", "other",
)  # fmt: skip
_INDEX = {kind: n for n, kind in enumerate(KINDS)}
_OTHER = _INDEX["other"]
_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z]+)")


def counts_size() -> int:
    return 8 * len(KINDS)


def read_counts(path: Path) -> dict[str, int]:
    """The counters as they are now (the server adds to them as it runs)."""
    raw = memoryview(path.read_bytes()).cast("q")
    return {kind: int(raw[n]) for n, kind in enumerate(KINDS)}


def _kind(sql: str) -> int:
    word = _FIRST_WORD.match(sql)
    return _INDEX.get(word.group(1).lower(), _OTHER) if word else _OTHER


def _install_sqlite(count: Callable[[str], None]) -> None:
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    @event.listens_for(Pool, "connect")
    def _connected(dbapi_connection: Any, _record: Any) -> None:
        connection = dbapi_connection
        if not isinstance(connection, sqlite3.Connection):  # aiosqlite's, adapted by SQLAlchemy
            connection = getattr(getattr(connection, "_connection", None), "_conn", None)
        if isinstance(connection, sqlite3.Connection):
            connection.set_trace_callback(count)


def _install_asyncpg(count: Callable[[str], None]) -> None:
    try:
        import asyncpg  # type: ignore[import-untyped]
        from asyncpg.prepared_stmt import PreparedStatement  # type: ignore[import-untyped]
    except ImportError:
        return
    connection_class = asyncpg.connection.Connection
    execute, execute_args = connection_class.execute, connection_class._execute
    execute_many = connection_class._executemany
    bind_execute = PreparedStatement._PreparedStatement__bind_execute
    prepared_many = PreparedStatement.executemany

    async def counted_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:  # a simple query (with arguments it goes through _execute, counted there)
            count(query)
        return await execute(self, query, *args, **kwargs)

    async def counted_execute_args(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        count(query)
        return await execute_args(self, query, *args, **kwargs)

    async def counted_execute_many(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        count(query)
        return await execute_many(self, query, *args, **kwargs)

    async def counted_bind_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        count(self.get_query())
        return await bind_execute(self, *args, **kwargs)

    async def counted_prepared_many(self: Any, *args: Any, **kwargs: Any) -> Any:
        count(self.get_query())
        return await prepared_many(self, *args, **kwargs)

    connection_class.execute = counted_execute
    connection_class._execute = counted_execute_args
    connection_class._executemany = counted_execute_many
    PreparedStatement._PreparedStatement__bind_execute = counted_bind_execute
    PreparedStatement.executemany = counted_prepared_many


def _install_profiler(counts_path: Path) -> None:
    profiler: list[cProfile.Profile] = []
    written = [0]

    def toggle(_signum: int, _frame: Any) -> None:
        if not profiler:
            profiler.append(cProfile.Profile())
            profiler[0].enable()
            return
        done = profiler.pop()
        done.disable()
        written[0] += 1
        done.dump_stats(f"{counts_path}.prof{written[0]}")

    signal.signal(signal.SIGUSR2, toggle)


class _Counter:
    """Adds one to a statement's kind; with a trace file, also writes the statement there."""

    def __init__(self, counts: memoryview, trace: Path | None) -> None:
        self._counts = counts
        self._trace = trace.open("a", buffering=1) if trace else None

    def __call__(self, sql: str) -> None:
        self._counts[_kind(sql)] += 1
        if self._trace is not None:
            self._trace.write(" ".join(sql.split())[:300] + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("counts", type=Path, help="the counters' file (created)")
    parser.add_argument("config", help="agentid's config file")
    parser.add_argument("--profile", action="store_true", help="SIGUSR2 starts/stops cProfile")
    parser.add_argument("--trace", type=Path, help="also append every statement to this file")
    args = parser.parse_args(argv)
    args.counts.write_bytes(bytes(counts_size()))
    with args.counts.open("r+b") as handle:
        counts = memoryview(mmap.mmap(handle.fileno(), counts_size())).cast("q")
    count = _Counter(counts, args.trace)
    _install_sqlite(count)
    _install_asyncpg(count)
    if args.profile:
        _install_profiler(args.counts)
    from agentid_server.cli import main as cli

    return int(cli(["serve", "--config", args.config]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Engine creation (SQLite pragmas, PostgreSQL pool) and Alembic migrations at start."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Row, Select, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from agentid_server.config import loopback_host
from agentid_server.domain.errors import Unavailable
from agentid_server.storage.private_files import private_sqlite_file

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class Engines:
    """The async engine (reads, migrations, PostgreSQL writes) and, for SQLite, the synchronous
    engine the journal writes through."""

    main: AsyncEngine
    sqlite_writer: Engine | None

    async def dispose(self) -> None:
        await self.main.dispose()
        if self.sqlite_writer is not None:
            self.sqlite_writer.dispose()


# The journal is the only writer of a SQLite file, so it waits for a lock only when another
# process holds one; when it writes on the event loop that wait stalls every call, so it is short
# (the batch then fails as UNAVAILABLE: no decision is answered without its record).
INLINE_WRITER_BUSY_TIMEOUT = 0.2


def create_engines(
    url: str,
    *,
    sqlite_synchronous: str = "NORMAL",
    busy_timeout: float = 5.0,
    writer_busy_timeout: float | None = None,
) -> Engines:
    """Engines for ``url``. For SQLite the file's folder is created, and WAL, a busy timeout and
    the chosen `synchronous` level are set on every connection. A new file and its folder are
    private to this user (0600 in 0700: see private_files). Statement parameters (sealed keys,
    audit contexts) are kept out of error messages and logs."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        main = create_async_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=10,
            hide_parameters=True,
            connect_args=postgres_connect_args(parsed),
        )
        return Engines(main, None)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        private_sqlite_file(Path(database))
    main = create_async_engine(url, connect_args={"timeout": busy_timeout}, hide_parameters=True)
    writer_timeout = busy_timeout if writer_busy_timeout is None else writer_busy_timeout
    writer = create_engine(
        parsed.set(drivername="sqlite"),
        connect_args={"timeout": writer_timeout, "check_same_thread": False},
        hide_parameters=True,
    )
    _set_pragmas(main.sync_engine, sqlite_synchronous.upper(), int(busy_timeout * 1000))
    _set_pragmas(writer, sqlite_synchronous.upper(), int(writer_timeout * 1000))
    return Engines(main, writer)


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """asyncpg, as libpq, uses TLS whenever the server offers it (sslmode "prefer"), checking
    nothing. To a server on this machine's loopback TLS protects nothing (what could read that
    traffic could read the database's files), and it costs every statement its encryption on the
    event loop: about 9 µs of the loop per warm Check (docs/benchmarks.md). There the connection
    tries plaintext first and TLS only if the server insists (sslmode "allow"). The URL's own
    ``ssl``/``sslmode`` or ``PGSSLMODE`` decides instead, as does a URL naming its hosts in the
    query (several hosts, or a Unix socket)."""
    if url.get_driver_name() != "asyncpg" or os.environ.get("PGSSLMODE"):
        return {}
    if {"ssl", "sslmode", "host"} & set(url.query) or not loopback_host((url.host or "").lower()):
        return {}
    return {"ssl": "allow"}


def _set_pragmas(engine: Engine, synchronous: str, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Applies every pending Alembic migration."""
    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "head"))


async def read_all(engine: AsyncEngine, statement: Select[Any]) -> list[Row[Any]]:
    """Runs a read on its own pooled connection. Shielded: streams are cancelled whenever their
    caller goes away, and a cancellation must never abandon a connection in mid-query. A
    database that cannot be reached (or went away) is UNAVAILABLE, not an internal error."""

    async def run() -> list[Row[Any]]:
        async with engine.connect() as connection:
            return list((await connection.execute(statement)).all())

    try:
        return await asyncio.shield(run())
    except _OUR_FAULT:
        raise  # a statement the database refuses is a bug here: INTERNAL
    except (DBAPIError, OSError) as exc:  # unreachable, refusing connections, gone mid-query
        raise Unavailable(
            "the database is unavailable; try again", reason="STORE_UNAVAILABLE"
        ) from exc


_OUR_FAULT = (ProgrammingError, IntegrityError, DataError, NotSupportedError)

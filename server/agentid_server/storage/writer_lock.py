"""One writer per chain. Two writers of one audit chain would fork it (and, on SQLite, number
records alike), so a writer claims what it writes before writing anything:

* SQLite: an exclusive lock on ``<database>.lock`` beside the file, held until the writer stops
  (the kernel drops it when the process dies, so a crashed server never blocks its restart);
* PostgreSQL: a session advisory lock on the chain id, held by the writer's connection.

``advisory_lock`` serves other single-holder roles too (the Shared Signals transmitter: one
replica delivers to each receiver).
"""

from __future__ import annotations

import fcntl
import hashlib
import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


class WriterInUse(Exception):
    """Another server already writes this database's audit chain (see Journal.claim)."""


def lock_beside(database: str | None) -> int | None:
    """Takes the exclusive writer lock of a SQLite file (None for an in-memory database)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = f"{database}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WriterInUse(
            f"{database} is written by another agentid server (it holds {path});"
            " SQLite takes one server: use PostgreSQL to run several"
        ) from None
    return fd


async def advisory_lock(engine: AsyncEngine, label: bytes) -> tuple[AsyncConnection, int] | None:
    """PostgreSQL: a new connection holding the session advisory lock named by ``label`` (its
    key: the first 8 bytes of its SHA-256), and its server process id; None when another
    connection holds it. The lock lasts as long as the connection."""
    key = int.from_bytes(hashlib.sha256(label).digest()[:8], "big", signed=True)
    connection = await engine.connect()
    try:
        acquired, pid = (
            await connection.execute(
                text("SELECT pg_try_advisory_lock(:key), pg_backend_pid()"), {"key": key}
            )
        ).one()
        await connection.commit()  # the lock is the session's; the transaction can end
    except BaseException:
        await connection.close()
        raise
    if not acquired:
        await connection.close()
        return None
    return connection, int(pid)


async def claim_chain(engine: AsyncEngine, chain_id: str) -> tuple[AsyncConnection, int]:
    """PostgreSQL: a new connection holding the advisory lock of ``chain_id``, and its server
    process id; WriterInUse when another connection holds it."""
    claimed = await advisory_lock(engine, b"agentid.audit-chain:" + chain_id.encode())
    if claimed is None:
        raise WriterInUse(
            f"audit chain {chain_id!r} is written by another server on this database;"
            " give each replica its own audit.chain_id"
        )
    return claimed

"""Alembic environment. agentid runs migrations itself at start (storage/database.py), handing
Alembic an open connection; `alembic` on the command line works too with -x url=..."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from agentid_server.storage.tables import metadata

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit(
            "pass the database URL: alembic -x url=sqlite:///var/agentid.db upgrade head"
        )
    engine = create_engine(url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg"))
    with engine.connect() as conn:
        run_migrations(conn)

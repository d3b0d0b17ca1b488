"""Which PostgreSQL URLs get plaintext first (sslmode "allow"), and which keep what the URL or
the environment says: a pure decision, tried here on the URLs a user may write. The integration
tests (test_postgres.py) show what the connections then do on a real server."""

from __future__ import annotations

import pytest
from agentid_server.storage.database import postgres_connect_args
from sqlalchemy.engine import make_url

ALLOW = {"ssl": "allow"}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://u:p@127.0.0.1:5432/d", ALLOW),
        ("postgresql+asyncpg://u:p@127.0.0.2/d", ALLOW),  # all of 127.0.0.0/8
        ("postgresql+asyncpg://u:p@[::1]:5432/d", ALLOW),
        ("postgresql+asyncpg://u:p@localhost/d", ALLOW),
        ("postgresql+asyncpg://u:p@LocalHost/d", ALLOW),  # names are case-insensitive
        # Another host: asyncpg's own default (TLS when offered), or what the URL asks.
        ("postgresql+asyncpg://u:p@db.example:5432/d", {}),
        ("postgresql+asyncpg://u:p@10.0.0.5/d", {}),
        ("postgresql+asyncpg://u:p@localhost.example/d", {}),
        ("postgresql+asyncpg://u:p@127.0.0.1.example/d", {}),
        # The URL decides.
        ("postgresql+asyncpg://u:p@127.0.0.1/d?ssl=require", {}),
        ("postgresql+asyncpg://u:p@127.0.0.1/d?ssl=verify-full", {}),
        ("postgresql+asyncpg://u:p@localhost/d?sslmode=require", {}),
        # Hosts in the query: a Unix socket, or several hosts.
        ("postgresql+asyncpg://u:p@/d?host=/var/run/postgresql", {}),
        ("postgresql+asyncpg://u:p@/d?host=127.0.0.1:5432&host=db.example:5432", {}),
        # Not asyncpg: its driver has its own options.
        ("postgresql+psycopg://u:p@127.0.0.1/d", {}),
    ],
)
def test_only_a_plain_loopback_url_gets_plaintext_first(
    url: str, expected: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    assert postgres_connect_args(make_url(url)) == expected


def test_pgsslmode_in_the_environment_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "require")
    assert postgres_connect_args(make_url("postgresql+asyncpg://u:p@127.0.0.1/d")) == {}
    monkeypatch.setenv("PGSSLMODE", "")  # set but empty: as if unset, as for libpq
    assert postgres_connect_args(make_url("postgresql+asyncpg://u:p@127.0.0.1/d")) == ALLOW

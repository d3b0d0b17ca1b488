"""Initial schema: counters, sessions, revocations, signing keys, audit records.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger)),
        [{"name": "session_serial", "value": 0}],
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("serial", sa.BigInteger, nullable=False, unique=True),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("parent_id", sa.String(40), nullable=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("audiences", sa.JSON, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("jkt", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
    )
    op.create_index("ix_sessions_user", "sessions", ["user_id", "expires_at"])
    op.create_index("ix_sessions_parent", "sessions", ["parent_id"])
    op.create_table(
        "revocations",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("serial", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_revocations_expires", "revocations", ["expires_at"])
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("sealed_private_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("retired_at", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "audit_records",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("time_us", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.SmallInteger, nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("actor_kind", sa.SmallInteger, nullable=False),
        sa.Column("actor_id", sa.String(256), nullable=False),
        sa.Column("action", sa.String(512), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("decision", sa.SmallInteger, nullable=False),
        sa.Column("reason", sa.SmallInteger, nullable=False),
        sa.Column("parent_session_id", sa.String(40), nullable=False),
        sa.Column("step_up_id", sa.String(40), nullable=False),
        sa.Column("context", sa.JSON, nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_session", "audit_records", ["session_id", "id"])
    op.create_index("ix_audit_user_actor", "audit_records", ["user_id", "actor_kind", "id"])
    op.create_index("ix_audit_parent", "audit_records", ["parent_session_id", "id"])


def downgrade() -> None:
    for table in ("audit_records", "signing_keys", "revocations", "sessions", "counters"):
        op.drop_table(table)

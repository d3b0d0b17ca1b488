"""Signed checkpoints of the audit chains' heads, and (SQLite) a durable high-water mark of audit
record ids, so ids of deleted records are never handed out again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("chain_id", sa.String(64), primary_key=True),
        sa.Column("record_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.Column("time_us", sa.BigInteger, nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_audit_checkpoints_record", "audit_checkpoints", ["record_id"])
    op.execute(
        "INSERT INTO counters (name, value)"
        " SELECT 'audit_next_id', COALESCE(MAX(id), 0) + 1 FROM audit_records"
    )


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name = 'audit_next_id'")
    op.drop_index("ix_audit_checkpoints_record", "audit_checkpoints")
    op.drop_table("audit_checkpoints")

"""The audit hash chain: chain id, previous hash and hash on every record (existing records are
chained in id order on the chain "main").

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from agentid_server.storage.audit_chain import GENESIS, canonical_bytes, link

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (
    "time_us", "event_type", "session_id", "user_id", "scopes", "agent_id", "actor_kind",
    "actor_id", "action", "resource", "decision", "reason", "parent_session_id", "step_up_id",
    "context", "detail",
)  # fmt: skip


def upgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(
            sa.Column("chain_id", sa.String(64), nullable=False, server_default="main")
        )
        batch.add_column(sa.Column("prev_hash", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("hash", sa.LargeBinary, nullable=True))
    connection = op.get_bind()
    # The JSON columns are read as their stored text (a driver may parse json columns, and
    # encoding them again need not give the same bytes).
    selected = ", ".join(f"CAST({c} AS TEXT)" if c in ("scopes", "context") else c for c in COLUMNS)
    rows = connection.execute(
        sa.text(f"SELECT id, {selected} FROM audit_records ORDER BY id")  # noqa: S608
    ).all()
    head = GENESIS
    for row in rows:
        digest = link(head, canonical_bytes(row[0], "main", list(row[1:])))
        connection.execute(
            sa.text("UPDATE audit_records SET prev_hash = :p, hash = :h WHERE id = :i"),
            {"p": head, "h": digest, "i": row[0]},
        )
        head = digest
    op.create_index("ix_audit_chain", "audit_records", ["chain_id", "id"])
    op.create_index("ix_audit_time", "audit_records", ["time_us"])


def downgrade() -> None:
    op.drop_index("ix_audit_time", "audit_records")
    op.drop_index("ix_audit_chain", "audit_records")
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("chain_id")

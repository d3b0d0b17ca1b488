"""DPoP proofs spent, so that several replicas on one database accept each proof once (one server
alone keeps them in memory). The jti is kept only as its SHA-256.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spent_proofs",
        sa.Column("jkt", sa.String(64), primary_key=True),
        sa.Column("jti_sha256", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_spent_proofs_expires", "spent_proofs", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_spent_proofs_expires", table_name="spent_proofs")
    op.drop_table("spent_proofs")

"""The revocation sequence counter: global, gap-free, persistent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        sa.text(
            "INSERT INTO counters (name, value) "
            "SELECT 'revocation_sequence', COALESCE(MAX(sequence), 0) FROM revocations"
        )
    )
    op.create_index("ix_revocations_session", "revocations", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_revocations_session", "revocations")
    op.execute(sa.text("DELETE FROM counters WHERE name = 'revocation_sequence'"))

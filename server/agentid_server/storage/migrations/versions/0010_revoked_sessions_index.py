"""Revoked sessions by expiry: the revocation set is built from the sessions (which keep every
revocation) rather than from the revocation history (which is pruned), so a history pruned by a
clock that ran ahead can no longer make a revoked session live again after a restart.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

REVOKED = sa.text("revoked_at IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_sessions_revoked",
        "sessions",
        ["expires_at"],
        sqlite_where=REVOKED,
        postgresql_where=REVOKED,
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_revoked", table_name="sessions")

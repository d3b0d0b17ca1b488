"""A user's sessions by serial: a Revoke of the user pages through their live sessions in slices
ordered by serial; with only (user_id, expires_at) each slice read and sorted every live session
of the user again, quadratic in their number.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sessions_user_serial", "sessions", ["user_id", "serial"])


def downgrade() -> None:
    op.drop_index("ix_sessions_user_serial", table_name="sessions")

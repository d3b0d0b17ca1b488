"""ListSessions' indexes: newest first by (created_at, serial) for a user, an agent or everyone
(every session, ended ones too), and the sessions not expired yet of an agent or of everyone (live
sessions only; a user's are ix_sessions_user). See storage/session_listing.py.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-14
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_sessions_user_created": ["user_id", "created_at", "serial"],
    "ix_sessions_agent_created": ["agent_id", "created_at", "serial"],
    "ix_sessions_created": ["created_at", "serial"],
    "ix_sessions_agent_expires": ["agent_id", "expires_at"],
    "ix_sessions_expires": ["expires_at"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "sessions", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="sessions")

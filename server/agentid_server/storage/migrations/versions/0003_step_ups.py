"""Step-ups: one-time human approvals bound to (session, action, resource, context digest).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_ups",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("action", sa.String(512), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("context", sa.JSON, nullable=True),
        sa.Column("context_digest", sa.String(64), nullable=False),
        sa.Column("binding_message", sa.Text, nullable=False),
        sa.Column("state", sa.SmallInteger, nullable=False),
        sa.Column("risk_rule", sa.String(256), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("resolved_at", sa.BigInteger, nullable=True),
    )
    op.create_index(
        "ix_step_ups_binding",
        "step_ups",
        ["session_id", "action", "resource", "context_digest", "created_at_us"],
    )
    op.create_index("ix_step_ups_user_state", "step_ups", ["user_id", "state"])
    op.create_index("ix_step_ups_state_expiry", "step_ups", ["state", "expires_at"])


def downgrade() -> None:
    op.drop_table("step_ups")

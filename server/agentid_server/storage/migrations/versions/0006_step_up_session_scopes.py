"""A step-up keeps its session's scopes and parent, so the record of its resolution carries the
three identifiers every audit record has (session, delegating user, scopes) like the others.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("step_ups") as batch:
        batch.add_column(sa.Column("scopes", sa.Text, nullable=False, server_default="[]"))
        batch.add_column(
            sa.Column("parent_session_id", sa.String(40), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("step_ups") as batch:
        batch.drop_column("parent_session_id")
        batch.drop_column("scopes")

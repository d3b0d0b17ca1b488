"""The index of sub-agent delegations holds DELEGATE records only: "what did session S do" looks
up the DELEGATE records whose parent is S, and every other record (a Check, most of all) no
longer pays for an entry in it (one B-tree page fewer per commit).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DELEGATE = sa.text("event_type = 1")  # EventType.DELEGATE, written as a literal on purpose


def upgrade() -> None:
    op.drop_index("ix_audit_parent", table_name="audit_records")
    op.create_index(
        "ix_audit_parent",
        "audit_records",
        ["parent_session_id", "id"],
        sqlite_where=DELEGATE,
        postgresql_where=DELEGATE,
    )


def downgrade() -> None:
    op.drop_index("ix_audit_parent", table_name="audit_records")
    op.create_index("ix_audit_parent", "audit_records", ["parent_session_id", "id"])

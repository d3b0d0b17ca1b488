"""The audit record's scopes and context as plain text: they are the JSON texts hashed into the
chain, stored byte for byte. 0001 created them as JSON, which PostgreSQL keeps as a json column
(refusing the text the journal writes, and free to differ from the hashed bytes on the way
back); SQLite's JSON was text already, so only PostgreSQL changes (json::text keeps the text).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("audit_records", "scopes", type_=sa.Text, existing_type=sa.JSON)
    op.alter_column("audit_records", "context", type_=sa.Text, existing_type=sa.JSON)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in ("scopes", "context"):
        op.alter_column(
            "audit_records",
            column,
            type_=sa.JSON,
            existing_type=sa.Text,
            postgresql_using=f"{column}::json",
        )

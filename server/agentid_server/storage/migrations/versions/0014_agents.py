"""agents: the registry as data (api.md "Agent lifecycle"). `revision` orders its changes: each
write takes the next value of the counter `agent_revision` in its transaction, so replicas read
what changed after the revision they hold.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("owners", sa.JSON, nullable=False),
        sa.Column("max_scopes", sa.JSON, nullable=False),
        sa.Column("max_ttl", sa.Integer, nullable=False),
        sa.Column("state", sa.SmallInteger, nullable=False),
        sa.Column("jwks_json", sa.Text, nullable=False),
        sa.Column("jwks_url", sa.Text, nullable=False),
        sa.Column("source", sa.SmallInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
        sa.Column("disabled_us", sa.BigInteger, nullable=True),
        sa.Column("disabled_reason", sa.Text, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_agents_revision", "agents", ["revision"], unique=True)
    counters = sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger))
    op.bulk_insert(counters, [{"name": "agent_revision", "value": 0}])


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name = 'agent_revision'")
    op.drop_index("ix_agents_revision", table_name="agents")
    op.drop_table("agents")

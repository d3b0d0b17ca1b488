"""ssf_cursors: per Shared Signals receiver (`[[signals_out]]`), the last revocation sequence
delivered to it (or given up on), so a restart resumes where delivery stopped. Keyed by the
SHA-256 of the receiver's audience: the URL may change, the cursor stays.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ssf_cursors",
        sa.Column("receiver", sa.String(64), primary_key=True),
        sa.Column("audience", sa.Text, nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ssf_cursors")

"""signing_keys.withdrawn_at: a key retired in an emergency (RetireSigningKey), which verifies no
more at once, unlike a rotated key (retired_at), which verifies until its tokens expire.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("signing_keys") as batch:
        batch.add_column(sa.Column("withdrawn_at", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("signing_keys") as batch:
        batch.drop_column("withdrawn_at")

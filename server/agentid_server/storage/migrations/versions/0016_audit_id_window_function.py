"""agentid_take_audit_ids(window_key, n), PostgreSQL only: the audit id window's shared lock,
taken at session level, then n ids from the records' sequence, in that order, in one statement.
The journal's Check batches take their ids with it and commit their records in the INSERT's own
transaction (two round trips on the answer's path instead of four); the lock is let go after
the commit (storage/visibility.py).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION agentid_take_audit_ids(window_key bigint, n integer)
        RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM pg_advisory_lock_shared(window_key);
            RETURN QUERY SELECT nextval('audit_records_id_seq') FROM generate_series(1, n);
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION agentid_take_audit_ids(bigint, integer)")

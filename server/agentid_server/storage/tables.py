"""The schema, as SQLAlchemy Core tables. Alembic migrations (migrations/versions) create it; this
module is what the repositories query. Portable SQL only: SQLite and PostgreSQL both run it."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

# A 64-bit autoincrementing key that SQLite also treats as its rowid alias.
Id = BigInteger().with_variant(Integer(), "sqlite")

counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("serial", BigInteger, nullable=False, unique=True),
    Column("user_id", String(256), nullable=False),
    Column("agent_id", String(128), nullable=False),
    Column("parent_id", String(40), nullable=True),
    Column("scopes", JSON, nullable=False),
    Column("audiences", JSON, nullable=False),
    Column("task", Text, nullable=False),
    Column("jkt", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("revoke_reason", Text, nullable=True),
    Index("ix_sessions_user", "user_id", "expires_at"),
    Index("ix_sessions_parent", "parent_id"),
    # A user's sessions by serial (migration 0011): a Revoke of the user pages through them in
    # slices by serial, each slice a range read instead of a sort of all their sessions.
    Index("ix_sessions_user_serial", "user_id", "serial"),
    # ListSessions (migration 0012): newest first, ended sessions too, for a user, an agent or
    # everyone; and the live ones (not expired yet) of an agent or of everyone.
    Index("ix_sessions_user_created", "user_id", "created_at", "serial"),
    Index("ix_sessions_agent_created", "agent_id", "created_at", "serial"),
    Index("ix_sessions_created", "created_at", "serial"),
    Index("ix_sessions_agent_expires", "agent_id", "expires_at"),
    Index("ix_sessions_expires", "expires_at"),
    # Revoked sessions by expiry (migration 0010): the revocation set is built from them.
    Index(
        "ix_sessions_revoked",
        "expires_at",
        sqlite_where=text("revoked_at IS NOT NULL"),
        postgresql_where=text("revoked_at IS NOT NULL"),
    ),
)

revocations = Table(
    "revocations",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("session_id", String(40), nullable=False),
    Column("serial", BigInteger, nullable=False),
    Column("user_id", String(256), nullable=False),
    Column("reason", Text, nullable=False),
    Column("revoked_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_revocations_expires", "expires_at"),
    Index("ix_revocations_session", "session_id"),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("retired_at", BigInteger, nullable=True),
    # RetireSigningKey (compromised): verifies no more, on no replica. The row stays, for the
    # audit trail's sake and so that no replica takes the key back.
    Column("withdrawn_at", BigInteger, nullable=True),
)

audit_records = Table(
    "audit_records",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("time_us", BigInteger, nullable=False),
    Column("event_type", SmallInteger, nullable=False),
    Column("session_id", String(40), nullable=False),
    Column("user_id", String(256), nullable=False),
    Column("scopes", Text, nullable=False),  # JSON text, exactly as hashed into the chain
    Column("agent_id", String(128), nullable=False),
    Column("actor_kind", SmallInteger, nullable=False),
    Column("actor_id", String(256), nullable=False),
    Column("action", String(512), nullable=False),
    Column("resource", String(512), nullable=False),
    Column("decision", SmallInteger, nullable=False),
    Column("reason", SmallInteger, nullable=False),
    Column("parent_session_id", String(40), nullable=False),
    Column("step_up_id", String(40), nullable=False),
    Column("context", Text, nullable=True),  # JSON text, exactly as hashed into the chain
    Column("detail", Text, nullable=False),
    Column("chain_id", String(64), nullable=False),
    Column("prev_hash", LargeBinary, nullable=True),
    Column("hash", LargeBinary, nullable=True),
    Index("ix_audit_session", "session_id", "id"),
    Index("ix_audit_user_actor", "user_id", "actor_kind", "id"),
    # DELEGATE records only (event_type 1): the sub-agents a session created (migration 0008).
    Index(
        "ix_audit_parent",
        "parent_session_id",
        "id",
        sqlite_where=text("event_type = 1"),
        postgresql_where=text("event_type = 1"),
    ),
    Index("ix_audit_chain", "chain_id", "id"),
    Index("ix_audit_time", "time_us"),
)

# Signed heads of each audit chain (storage/checkpoints.py; migration 0009).
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("chain_id", String(64), primary_key=True),
    Column("record_id", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary, nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("kid", String(64), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Index("ix_audit_checkpoints_record", "record_id"),
)

# counters row: above every audit id ever handed out on SQLite (PostgreSQL has its sequence).
AUDIT_ID_MARK = "audit_next_id"

step_ups = Table(
    "step_ups",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("session_id", String(40), nullable=False),
    Column("user_id", String(256), nullable=False),
    Column("agent_id", String(128), nullable=False),
    Column("action", String(512), nullable=False),
    Column("resource", String(512), nullable=False),
    Column("context", JSON, nullable=True),
    Column("context_digest", String(64), nullable=False),
    Column("binding_message", Text, nullable=False),
    Column("state", SmallInteger, nullable=False),
    Column("risk_rule", String(256), nullable=False),
    Column("comment", Text, nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("resolved_at", BigInteger, nullable=True),
    Column("scopes", Text, nullable=False),  # the session's scopes, JSON text (for the audit)
    Column("parent_session_id", String(40), nullable=False),
    Index(
        "ix_step_ups_binding", "session_id", "action", "resource", "context_digest", "created_at_us"
    ),
    Index("ix_step_ups_user_state", "user_id", "state"),
    Index("ix_step_ups_state_expiry", "state", "expires_at"),
)

spent_proofs = Table(
    "spent_proofs",
    metadata,
    Column("jkt", String(64), primary_key=True),
    Column("jti_sha256", String(64), primary_key=True),  # the proof's jti, hashed
    Column("expires_at", BigInteger, nullable=False),  # when it may be forgotten
    Index("ix_spent_proofs_expires", "expires_at"),
)

# The agent registry (migration 0014); times in microseconds since the epoch.
agents = Table(
    "agents",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("display_name", Text, nullable=False),
    Column("description", Text, nullable=False),
    Column("owners", JSON, nullable=False),
    Column("max_scopes", JSON, nullable=False),
    Column("max_ttl", Integer, nullable=False),  # seconds; 0: tokens.max_ttl
    Column("state", SmallInteger, nullable=False),
    Column("jwks_json", Text, nullable=False),
    Column("jwks_url", Text, nullable=False),
    Column("source", SmallInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("disabled_us", BigInteger, nullable=True),
    Column("disabled_reason", Text, nullable=False),
    Column("revision", BigInteger, nullable=False),  # counter agent_revision, in commit order
    Index("ix_agents_revision", "revision", unique=True),
)

# Shared Signals out (migration 0015): per receiver, the last revocation sequence delivered or
# given up on. ``receiver`` is the SHA-256 (hex) of its audience.
ssf_cursors = Table(
    "ssf_cursors",
    metadata,
    Column("receiver", String(64), primary_key=True),
    Column("audience", Text, nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

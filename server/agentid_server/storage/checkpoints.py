"""The audit checkpoint key and the checkpoint table's rows (domain/checkpoint.py says what a
checkpoint is).

The key is Ed25519, derived from the key-encryption key with HKDF-SHA256 under its own label, so
it is never stored anywhere and every replica sharing the KEK derives the same one. Ed25519 rather
than an HMAC: the public key (logged at start, its thumbprint in every checkpoint) lets an auditor
check kept checkpoints and an export offline without holding anything that could sign one.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Connection, select

from agentid_server.domain.checkpoint import Checkpoint
from agentid_server.storage import tables
from agentid_server.tokens.jwk import public_jwk, thumbprint

_HKDF_INFO = b"agentid audit checkpoint signing key v1"
COLUMNS = ("chain_id", "record_id", "hash", "time_us", "kid", "signature")


class CheckpointKey:
    """Signs checkpoints, and checks a checkpoint's signature."""

    def __init__(self, kek: bytes) -> None:
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(kek)
        self._private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        self._public = self._private.public_key()
        self.public_jwk = public_jwk(self._public)
        self.kid = thumbprint(self.public_jwk)

    def sign(self, checkpoint: Checkpoint) -> Checkpoint:
        signature = self._private.sign(checkpoint.signed_bytes())
        return Checkpoint(
            checkpoint.chain_id,
            checkpoint.record_id,
            checkpoint.hash,
            checkpoint.time_us,
            self.kid,
            signature,
        )

    def problem(self, checkpoint: Checkpoint) -> str | None:
        """Why the checkpoint's signature is not ours, or None when it is."""
        if checkpoint.kid != self.kid:
            return f"is signed by another key ({checkpoint.kid!r}, not {self.kid!r})"
        try:
            self._public.verify(checkpoint.signature, checkpoint.signed_bytes())
        except InvalidSignature:
            return "has a signature that does not verify"
        return None


def checkpoint_row(checkpoint: Checkpoint) -> tuple[Any, ...]:
    """The values in COLUMNS order."""
    c = checkpoint
    return (c.chain_id, c.record_id, c.hash, c.time_us, c.kid, c.signature)


def from_row(row: Any) -> Checkpoint:
    chain_id, record_id, digest, time_us, kid, signature = row
    return Checkpoint(chain_id, int(record_id), bytes(digest), int(time_us), kid, bytes(signature))


def newest(connection: Connection, chain_id: str) -> Checkpoint | None:
    """The chain's newest stored checkpoint (whatever its signature)."""
    c = tables.audit_checkpoints
    row = connection.execute(
        select(*(c.c[name] for name in COLUMNS))
        .where(c.c.chain_id == chain_id)
        .order_by(c.c.record_id.desc())
        .limit(1)
    ).first()
    return from_row(row) if row is not None else None

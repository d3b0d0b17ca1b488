"""Signed checkpoints of an audit chain's head: "chain C had record R with hash H", signed with a
key derived from the key-encryption key (never stored in the database). Someone who can write the
database but does not hold the KEK can recompute the hash chain (its algorithm is public), but
cannot sign a checkpoint; so a chain truncated below, or re-linked under, a checkpoint that
survives (in the database, in the log, or kept by a verifier) no longer matches it.

The text form is one line of JSON, keys in this order:

    {"v":1,"chain_id":"main","record_id":41,"hash":"<hex>","time_us":...,"kid":"...","sig":"..."}

`sig` is the Ed25519 signature (base64url, no padding) of `signed_bytes`; `kid` names the key
(the RFC 7638 thumbprint of its public key); `time_us` is the checkpointed record's time.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from agentid_server.domain.errors import InvalidArgument

FORMAT_VERSION = 1
MAX_KEPT = 64  # checkpoints in one VerifyAudit request
MAX_TEXT = 2048  # characters of one checkpoint's text
_LABEL = "agentid.audit.checkpoint"


class AuditProblem(IntEnum):
    """Why a verification failed; the numbers are the proto's AuditProblem."""

    NONE = 0
    BROKEN_LINK = 1
    CHECKPOINT_RECORD_MISSING = 2
    CHECKPOINT_MISMATCH = 3
    CHECKPOINT_FORGED = 4


@dataclass(frozen=True, slots=True)
class Checkpoint:
    chain_id: str
    record_id: int
    hash: bytes
    time_us: int
    kid: str = ""
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """What the signature covers: everything but the key id and the signature."""
        fields = [_LABEL, FORMAT_VERSION, self.chain_id, self.record_id, self.hash.hex()]
        return _dumps([*fields, self.time_us]).encode("utf-8")

    def text(self) -> str:
        """The one-line JSON form (logged, returned by VerifyAudit, kept by verifiers)."""
        return _dumps(
            {
                "v": FORMAT_VERSION,
                "chain_id": self.chain_id,
                "record_id": self.record_id,
                "hash": self.hash.hex(),
                "time_us": self.time_us,
                "kid": self.kid,
                "sig": base64.urlsafe_b64encode(self.signature).rstrip(b"=").decode("ascii"),
            }
        )


def parse_kept(texts: list[str] | tuple[str, ...]) -> tuple[Checkpoint, ...]:
    """Checkpoints a verifier sent back; InvalidArgument naming the bound or the bad one."""
    if len(texts) > MAX_KEPT:
        raise InvalidArgument.field("checkpoints", f"at most {MAX_KEPT} checkpoints")
    return tuple(parse(text, f"checkpoints[{n}]") for n, text in enumerate(texts))


def parse(text: str, field: str = "checkpoint") -> Checkpoint:
    """A checkpoint from its text form (signature not checked here)."""
    if len(text) > MAX_TEXT:
        raise InvalidArgument.field(field, f"longer than {MAX_TEXT} characters")
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
            raise ValueError("not a version 1 checkpoint")
        checkpoint = Checkpoint(
            chain_id=_typed(data, "chain_id", str),
            record_id=_typed(data, "record_id", int),
            hash=bytes.fromhex(_typed(data, "hash", str)),
            time_us=_typed(data, "time_us", int),
            kid=_typed(data, "kid", str),
            signature=_unbase64url(_typed(data, "sig", str)),
        )
    except (ValueError, binascii.Error) as exc:  # JSONDecodeError is a ValueError
        raise InvalidArgument.field(field, f"not a checkpoint ({exc})") from None
    if not 0 < checkpoint.record_id < 1 << 63 or len(checkpoint.hash) != 32:
        raise InvalidArgument.field(field, "not a checkpoint (record_id or hash out of range)")
    return checkpoint


def _typed(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key} missing or not a {kind.__name__}")
    return value


def _unbase64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

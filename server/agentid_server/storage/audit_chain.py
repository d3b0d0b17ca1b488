"""The audit hash chain: hash = SHA-256(prev_hash || canonical bytes of the record).

The canonical bytes are the UTF-8 of a JSON array, no whitespace, in this order:

    [1, id, chain_id, time_us, event_type, session_id, user_id, scopes_json, agent_id,
     actor_kind, actor_id, action, resource, decision, reason, parent_session_id, step_up_id,
     context_json, detail]

where `1` is the format version, integers are JSON numbers, `scopes_json` and `context_json` are
the JSON texts exactly as stored (strings; `context_json` is null when there is none), and every
other field is a JSON string. JSON strings are written as Python's json.dumps writes them with
ensure_ascii=False (docs/audit.md spells this out for auditors). The first record of a chain has
32 zero bytes as its prev_hash. Each writer keeps its own chain (chain_id), so several writers
never contend for one head.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import msgspec

FORMAT_VERSION = 1
GENESIS = bytes(32)


# json.dumps(value, ensure_ascii=False, separators=(",", ":")), without building an encoder per
# record; records are flat lists, so the circular-reference check has nothing to find. It is the
# reference: the fast encoder below must give exactly its bytes (tests/unit/test_audit_chain.py).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
# msgspec writes the same bytes for what a record holds (strings, integers of 64 bits, null),
# about ten times faster; anything else it might write otherwise goes to the reference.
_FAST = msgspec.json.Encoder()
_FAST_TYPES = frozenset((str, int, type(None)))


def canonical_bytes(record_id: int, chain_id: str, row: Sequence[Any]) -> bytes:
    """``row`` is the record's values in rows.AUDIT_COLUMNS order."""
    values = [FORMAT_VERSION, record_id, chain_id, *row]
    if _FAST_TYPES.issuperset(map(type, values)):
        try:
            return _FAST.encode(values)
        except (OverflowError, UnicodeError, msgspec.EncodeError):
            pass  # an integer past 64 bits, a lone surrogate: the reference decides
    return reference_bytes(record_id, chain_id, row)


def reference_bytes(record_id: int, chain_id: str, row: Sequence[Any]) -> bytes:
    """The canonical bytes through the json module, as documented (slower)."""
    return _ENCODER.encode([FORMAT_VERSION, record_id, chain_id, *row]).encode("utf-8")


def link(prev_hash: bytes, canonical: bytes) -> bytes:
    return hashlib.sha256(prev_hash + canonical).digest()

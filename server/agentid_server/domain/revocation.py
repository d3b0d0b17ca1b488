"""The in-memory revocation set the Check hot path consults: a Roaring bitmap of session serials.

The bitmap is the truth for "is this session revoked?" on this process. Entries remember their
token's expiry so they can be pruned once the token could no longer pass the `exp` check anyway.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pyroaring import BitMap

SERIAL_SPACE = 1 << 32


def serial_bit(serial: int) -> int:
    """The bit of a session serial in the bitmap (`sn` wraps after 2^32 sessions)."""
    return serial % SERIAL_SPACE


@dataclass(frozen=True, slots=True)
class Revocation:
    sequence: int
    session_id: str
    serial: int
    user_id: str
    reason: str
    revoked_at: float
    expires_at: int


class RevocationSet:
    """Revoked serials plus the sequence of the last revocation applied to them."""

    def __init__(self) -> None:
        self._bitmap = BitMap()
        self._expiries: list[tuple[int, int]] = []  # heap of (expires_at, bit)
        self.applied_sequence = 0

    def __contains__(self, serial: int) -> bool:
        return serial_bit(serial) in self._bitmap

    def __len__(self) -> int:
        return len(self._bitmap)

    def apply(self, revocation: Revocation) -> None:
        """Adds one revocation; sequences must be applied in order."""
        bit = serial_bit(revocation.serial)
        self._bitmap.add(bit)
        heapq.heappush(self._expiries, (revocation.expires_at, bit))
        self.applied_sequence = max(self.applied_sequence, revocation.sequence)

    def prune(self, now: float) -> int:
        """Forgets entries whose token has expired; returns how many bits were cleared."""
        cleared = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, bit = heapq.heappop(self._expiries)
            if bit in self._bitmap:
                self._bitmap.discard(bit)
                cleared += 1
        return cleared

    def serialize(self) -> bytes:
        """Portable Roaring serialization: what the Roaring libraries of other languages read."""
        return bytes(self._bitmap.serialize())

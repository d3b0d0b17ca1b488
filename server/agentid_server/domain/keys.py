"""Emergency retirement of a signing key (RetireSigningKey): for a key believed compromised. Unlike
a rotation, which lets the old key verify until its tokens expire, the key stops verifying at once
and leaves the JWKS; a new key signs if it was the one signing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agentid_server.domain.errors import InvalidArgument, NotFound
from agentid_server.domain.model import (
    ActorKind,
    AuditEvent,
    EventType,
    ServicePrincipal,
    unreadable,
)
from agentid_server.domain.ports import Clock
from agentid_server.domain.revoking import MAX_REASON_LENGTH

MAX_KID_LENGTH = 64  # signing_keys.kid (a thumbprint is 43)


@dataclass(frozen=True)
class KeyRetired:
    """The key retired and the key signing now (a new one when the retired key was signing)."""

    retired_kid: str
    signing_kid: str


class SigningKeys(Protocol):
    async def retire(self, kid: str, event: AuditEvent) -> KeyRetired | None:
        """Retires ``kid`` on every replica (this one before returning), recording ``event`` with
        it; a key retired already is left as it is, without a second record. None: no such key."""
        ...


class KeyRetirer:
    def __init__(self, keys: SigningKeys, clock: Clock) -> None:
        self._keys = keys
        self._clock = clock

    async def retire(self, caller: ServicePrincipal, kid: str, reason: str) -> KeyRetired:
        if not kid:
            raise InvalidArgument.field("kid", "is required")
        if len(kid) > MAX_KID_LENGTH or unreadable(kid) is not None:
            raise NotFound(f"no signing key {kid[:MAX_KID_LENGTH]!r}", reason="KEY_NOT_FOUND")
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidArgument.field("reason", f"at most {MAX_REASON_LENGTH} characters")
        if (problem := unreadable(reason)) is not None:
            raise InvalidArgument.field("reason", problem)
        event = AuditEvent(
            time=self._clock.now(),
            event_type=EventType.KEY_RETIRED,
            actor_kind=ActorKind.SERVICE,
            actor_id=caller.name,
            action="agentid.keys.retire",
            detail=f"{kid}: {reason}" if reason else kid,
        )
        retired = await self._keys.retire(kid, event)
        if retired is None:
            raise NotFound(f"no signing key {kid}", reason="KEY_NOT_FOUND")
        return retired

"""The Security Event Tokens agentid transmits (RFC 8417): one CAEP 1.0 ``session-revoked``
event per revoked agent session, its subject in the OpenID SSF 1.0 ``sub_id`` claim as a
``complex`` subject (RFC 9493 subject identifiers) naming both what an agent token carries:

* ``user``: ``iss_sub``, agentid's issuer and the token's ``sub`` (the delegating user);
* ``session``: ``opaque``, the session id (the token's ``jti`` and ``act.sid``).

The ``jti`` is deterministic per (receiver, revocation): a SET sent again (after a restart, or
by another replica taking over) carries the same ``jti``, so receivers dedupe by it (delivery is
at least once). The session id is in it too, so a database started afresh, whose sequences begin
at 1 again, never reuses one."""

from __future__ import annotations

import hashlib
from typing import Any

from agentid_server.domain.revocation import Revocation

SET_TYPE = "secevent+jwt"  # RFC 8417 §2.3: the header typ
SET_MEDIA_TYPE = "application/secevent+jwt"  # RFC 8935 §2: the body's Content-Type
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"


def set_jti(audience: str, revocation: Revocation) -> str:
    """The SET's ``jti``: the same for the same receiver and revocation, on every replica."""
    material = f"agentid.set\0{audience}\0{revocation.sequence}\0{revocation.session_id}"
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def session_revoked(
    revocation: Revocation, *, issuer: str, audience: str, now: float
) -> dict[str, Any]:
    """The claims of the ``session-revoked`` SET of one revocation, for one receiver."""
    return {
        "iss": issuer,
        "aud": audience,
        "iat": int(now),
        "jti": set_jti(audience, revocation),
        "sub_id": {
            "format": "complex",
            "user": {"format": "iss_sub", "iss": issuer, "sub": revocation.user_id},
            "session": {"format": "opaque", "id": revocation.session_id},
        },
        "events": {SESSION_REVOKED: {"event_timestamp": int(revocation.revoked_at)}},
    }

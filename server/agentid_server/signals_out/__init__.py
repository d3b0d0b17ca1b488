"""Shared Signals out (`[[signals_out]]`): CAEP ``session-revoked`` Security Event Tokens for
revoked agent sessions, pushed to receivers (RFC 8935) from the revocation stream, with a
durable cursor per receiver. What a SET says is in ``sets``; how it travels, in
``transmitter``; the cursors and leases live in storage/ssf_cursors.py."""

from agentid_server.signals_out.sets import SESSION_REVOKED, SET_TYPE, session_revoked, set_jti
from agentid_server.signals_out.transmitter import (
    Receiver,
    SignalTransmitter,
    load_authorization,
)

__all__ = [
    "SESSION_REVOKED",
    "SET_TYPE",
    "Receiver",
    "SignalTransmitter",
    "load_authorization",
    "session_revoked",
    "set_jti",
]

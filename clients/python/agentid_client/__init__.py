"""agentid Python client: delegate, check, revoke, and a synced local revocation set."""

from agentid.v1.agentid_pb2 import (
    CheckResponse,
    Decision,
    DelegateResponse,
    Reason,
    RevokeResponse,
    Session,
    SessionState,
)

from agentid_client._client import AgentIdClient, channel_options
from agentid_client._errors import AgentIdError
from agentid_client._revocations import RevocationWatcher, WatcherNotReady, WatcherStopped

__all__ = [
    "AgentIdClient",
    "AgentIdError",
    "CheckResponse",
    "Decision",
    "DelegateResponse",
    "Reason",
    "RevocationWatcher",
    "RevokeResponse",
    "Session",
    "SessionState",
    "WatcherNotReady",
    "WatcherStopped",
    "channel_options",
]

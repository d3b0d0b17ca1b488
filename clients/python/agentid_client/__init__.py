"""agentid Python client: delegate, check, revoke, the agent registry, and a synced local
revocation set."""

from agentid.v1.agentid_pb2 import (
    Agent,
    AgentSource,
    AgentState,
    CheckResponse,
    Decision,
    DelegateResponse,
    DisableAgentResponse,
    Reason,
    RetireSigningKeyResponse,
    RevokeResponse,
    Session,
    SessionState,
)

from agentid_client._client import AgentIdClient, ContextError, channel_options
from agentid_client._errors import AgentIdError
from agentid_client._revocations import RevocationWatcher, WatcherNotReady, WatcherStopped
from agentid_client.tokens import (
    Actor,
    AgentClaims,
    TokenRejected,
    TokenVerifier,
    jwk_thumbprint,
    parse_jwks,
)

__all__ = [
    "Actor",
    "Agent",
    "AgentClaims",
    "AgentIdClient",
    "AgentIdError",
    "AgentSource",
    "AgentState",
    "CheckResponse",
    "ContextError",
    "Decision",
    "DelegateResponse",
    "DisableAgentResponse",
    "Reason",
    "RetireSigningKeyResponse",
    "RevocationWatcher",
    "RevokeResponse",
    "Session",
    "SessionState",
    "TokenRejected",
    "TokenVerifier",
    "WatcherNotReady",
    "WatcherStopped",
    "channel_options",
    "jwk_thumbprint",
    "parse_jwks",
]

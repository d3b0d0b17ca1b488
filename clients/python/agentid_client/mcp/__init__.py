"""agentid for MCP (the ``mcp`` extra: the official ``mcp`` SDK).

A tool server: ``McpGuard`` verifies agent tokens locally (the SDK's token verifier and auth
settings, RFC 9728 metadata naming agentid), and has agentid Check every tool call (``ToolPolicy``
per tool), asking the user for a step-up when agentid wants one::

    guard = McpGuard(resource_url="https://mcp.example/mcp", server_name="payments",
                     issuer="https://agentid.example", client=AgentIdClient(target, check_key))
    server = guard.mcp_server()
    guard.declare("transfer", action="payments.transfer", resource="account/{account_id}",
                  context=["amount"])

An agent: ``exchange_token`` gets a token for one MCP server (``resource``), optionally bound to
its key (DPoP); ``AgentAuth`` sends it with the SDK's streamable HTTP client.
"""

from agentid_client.dpop import ProofRejected, ProofVerifier
from agentid_client.mcp._agent import (
    AgentAuth,
    ExchangedToken,
    TokenExchangeError,
    client_assertion,
    exchange_token,
)
from agentid_client.mcp._guard import TOOL_CALL_REFUSED, AgentTokenVerifier, McpGuard
from agentid_client.mcp._policy import ToolPolicy
from agentid_client.mcp._server import GuardedMCPServer, GuardExtension

__all__ = [
    "TOOL_CALL_REFUSED",
    "AgentAuth",
    "AgentTokenVerifier",
    "ExchangedToken",
    "GuardExtension",
    "GuardedMCPServer",
    "McpGuard",
    "ProofRejected",
    "ProofVerifier",
    "TokenExchangeError",
    "ToolPolicy",
    "client_assertion",
    "exchange_token",
]

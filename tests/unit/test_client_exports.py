"""The client's public names are pinned: adding one is a decision, removing one a break."""

import agentid_client


def test_public_names() -> None:
    assert sorted(agentid_client.__all__) == [
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
    for name in agentid_client.__all__:
        assert getattr(agentid_client, name) is not None


def test_client_modules_are_private() -> None:
    """Modules are private but for the documented ones: `tokens` (verifying agent tokens
    locally, also importable on its own), `dpop` (making and checking DPoP proofs: agentid's
    own verifier checks them with the same rule), and `mcp` (the `mcp` extra's MCP guard, an attribute
    of the package once something imported it)."""
    public = [
        n for n in dir(agentid_client) if not n.startswith("_") and n not in agentid_client.__all__
    ]
    assert sorted(set(public) - {"mcp"}) == ["dpop", "tokens"]

"""The client's public names are pinned: adding one is a decision, removing one a break."""

import agentid_client


def test_public_names() -> None:
    assert sorted(agentid_client.__all__) == [
        "Agent",
        "AgentIdClient",
        "AgentIdError",
        "AgentSource",
        "AgentState",
        "CheckResponse",
        "Decision",
        "DelegateResponse",
        "DisableAgentResponse",
        "Reason",
        "RetireSigningKeyResponse",
        "RevocationWatcher",
        "RevokeResponse",
        "Session",
        "SessionState",
        "WatcherNotReady",
        "WatcherStopped",
        "channel_options",
    ]
    for name in agentid_client.__all__:
        assert getattr(agentid_client, name) is not None


def test_client_modules_are_private() -> None:
    public = [
        n for n in dir(agentid_client) if not n.startswith("_") and n not in agentid_client.__all__
    ]
    assert public == []

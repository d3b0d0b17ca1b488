"""agentid: identity and authorization for AI agent sessions."""

__version__ = "0.1.0"

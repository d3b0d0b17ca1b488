"""agentid Python client."""

"""The agent's httpx2.Auth for an MCP server: the token (and a DPoP proof) go to that server's
origin only; a request anywhere else carries nothing of it."""

from __future__ import annotations

import httpx2
import jwt
from agentid_client.dpop import token_hash
from agentid_client.mcp import AgentAuth, ExchangedToken
from cryptography.hazmat.primitives.asymmetric import ec

TOKEN = "header.payload.signature"
RESOURCE = "https://tools.example/mcp"


def sent(auth: AgentAuth, url: str) -> httpx2.Request:
    request = httpx2.Request("POST", url)
    flow = auth.auth_flow(request)
    out = next(flow)
    flow.close()
    return out


def test_the_token_goes_to_its_servers_origin_only() -> None:
    exchanged = ExchangedToken(TOKEN, "Bearer", "tools.use", 0.0, RESOURCE)
    auth = AgentAuth(exchanged)
    assert sent(auth, RESOURCE).headers["Authorization"] == f"Bearer {TOKEN}"
    assert sent(auth, "https://TOOLS.example:443/other").headers["Authorization"] == (
        f"Bearer {TOKEN}"
    )  # the same origin, another path
    for elsewhere in (
        "https://evil.example/mcp",
        "http://tools.example/mcp",
        "https://tools.example:8443/mcp",
        "https://tools.example.evil/mcp",
    ):
        request = sent(auth, elsewhere)
        assert "Authorization" not in request.headers
        assert "DPoP" not in request.headers


def test_a_bound_token_gets_a_proof_at_its_server_and_nothing_elsewhere() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    auth = AgentAuth(TOKEN, proof_key=key, resource=RESOURCE)
    request = sent(auth, RESOURCE)
    assert request.headers["Authorization"] == f"DPoP {TOKEN}"
    claims = jwt.decode(request.headers["DPoP"], options={"verify_signature": False})
    assert (claims["htm"], claims["htu"], claims["ath"]) == ("POST", RESOURCE, token_hash(TOKEN))
    other = sent(auth, "https://evil.example/mcp")
    assert "Authorization" not in other.headers
    assert "DPoP" not in other.headers


def test_a_bare_token_without_a_resource_goes_with_every_request() -> None:
    """As documented: without a resource the auth cannot tell servers apart."""
    assert sent(AgentAuth(TOKEN), "https://anywhere.example/").headers["Authorization"] == (
        f"Bearer {TOKEN}"
    )

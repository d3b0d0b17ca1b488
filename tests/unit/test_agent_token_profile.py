"""The agent token's header typ and RFC 9068 client_id, as the verifier sees them: either typ we
issue is accepted (replicas during a change of tokens.typ), anything else is TOKEN_MALFORMED,
never an exception of ours; client_id, when present, must name the acting agent (act.sub)."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from agentid_server.domain.model import Reason
from agentid_server.domain.ports import TokenRejected
from agentid_server.tokens.agent_tokens import AgentTokenIssuer, AgentTokenVerifier
from agentid_server.tokens.keys import KeyRing, generate_signing_key

ISSUER = "https://agentid.test"
CLAIMS: dict[str, Any] = {
    "iss": ISSUER, "sub": "alice", "act": {"sub": "bot", "sid": "ses_1"}, "client_id": "bot",
    "scope": "tickets.read", "jti": "ses_1", "sn": 1, "iat": 1, "nbf": 1, "exp": 2,
}  # fmt: skip


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing([generate_signing_key("EdDSA", now=0)], "EdDSA", max_token_ttl=10)


def signed(ring: KeyRing, claims: dict[str, Any], typ: Any) -> str:
    """Signed with our own key (so only the header or the claims can be wrong)."""
    key = ring.signing_key(1)
    headers = {"kid": key.kid, "typ": typ}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)


@pytest.mark.parametrize("typ", ["agent+jwt", "at+jwt"])
def test_either_typ_we_issue_verifies(ring: KeyRing, typ: str) -> None:
    token = AgentTokenIssuer(ring, typ).issue(dict(CLAIMS))
    assert jwt.get_unverified_header(token)["typ"] == typ
    assert AgentTokenVerifier(ISSUER, ring, cache_size=8).verify(token).agent_id == "bot"


@pytest.mark.parametrize("typ", ["JWT", "application/at+jwt", "AT+JWT", None, ["at+jwt"], {}])
def test_any_other_typ_is_malformed(ring: KeyRing, typ: Any) -> None:
    with pytest.raises(TokenRejected) as refused:
        AgentTokenVerifier(ISSUER, ring, cache_size=8).verify(signed(ring, dict(CLAIMS), typ))
    assert refused.value.reason == Reason.TOKEN_MALFORMED


def test_the_issuer_refuses_an_unknown_typ(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="typ"):
        AgentTokenIssuer(ring, "JWT")


def test_a_client_id_other_than_the_acting_agent_is_malformed(ring: KeyRing) -> None:
    verifier = AgentTokenVerifier(ISSUER, ring, cache_size=8)
    for client_id in ("other-bot", "", 7):
        token = signed(ring, {**CLAIMS, "client_id": client_id}, "at+jwt")
        with pytest.raises(TokenRejected) as refused:
            verifier.verify(token)
        assert refused.value.reason == Reason.TOKEN_MALFORMED
    without = {k: v for k, v in CLAIMS.items() if k != "client_id"}  # issued before it existed
    assert verifier.verify(signed(ring, without, "agent+jwt")).agent_id == "bot"

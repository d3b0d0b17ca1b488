"""Agents with keys authenticate at the token and revocation endpoints with a client assertion
(RFC 7523 private_key_jwt), by the rule gRPC's Delegate applies to `actor_token`: one check in
the domain for both doors. A real OAuth library (Authlib) signs the assertion."""

from __future__ import annotations

import time
from urllib.parse import quote

import pytest
from agentid.v1 import agentid_pb2 as pb
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from tests.conftest import ISSUER, Harness
from tests.http.helpers import (
    JWT_TYPE,
    TOKEN_ENDPOINT,
    TOKEN_EXCHANGE,
    exchange_form,
    session_count,
)
from tests.http.helpers import post_form as post
from tests.security.test_client_assertions import AGENT, ATTACKS, AgentKeys

# The keyed agent's server and keys, as the gRPC tests of client assertions have them.
from tests.security.test_client_assertions import agent_keys as agent_keys
from tests.security.test_client_assertions import h as h

REVOCATION_ENDPOINT = ISSUER + "/oauth2/revoke"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def authenticated(form: dict[str, str], assertion: str) -> dict[str, str]:
    return {**form, "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}


async def test_an_agent_with_keys_must_authenticate_at_the_token_endpoint(
    h: Harness, agent_keys: AgentKeys
) -> None:
    form = exchange_form(h.idp.token(), client_id=AGENT)
    status, body, _ = await post(h, "/oauth2/token", form)
    assert (status, body["error"]) == (401, "invalid_client")
    assert "client assertion" in body["error_description"]
    assert session_count(h) == 0
    for audience in (TOKEN_ENDPOINT, ISSUER):  # RFC 7523 section 3: either names us
        assertion = agent_keys.assertion(aud=audience)
        status, body, _ = await post(h, "/oauth2/token", authenticated(form, assertion))
        assert status == 200, body
    status, body, _ = await post(h, "/oauth2/token", authenticated(form, assertion))
    assert (status, body["error"]) == (401, "invalid_client")  # its jti is spent
    assert assertion[:40] not in body["error_description"]
    wrong = agent_keys.assertion(aud="https://elsewhere.example/token")
    status, body, _ = await post(h, "/oauth2/token", authenticated(form, wrong))
    assert (status, body["error"]) == (401, "invalid_client")
    assert session_count(h) == 2


async def test_authlib_authenticates_with_private_key_jwt(
    h: Harness, agent_keys: AgentKeys
) -> None:
    pem = agent_keys.keys["agent-rsa"].private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    # Authlib's assertions live an hour unless told; http.md allows five minutes.
    auth = PrivateKeyJWT(
        TOKEN_ENDPOINT,
        claims={"exp": int(time.time()) + 120},
        headers={"kid": "agent-rsa"},
        alg="RS256",
    )
    async with AsyncOAuth2Client(
        client_id=AGENT,
        client_secret=pem.decode(),
        token_endpoint_auth_method=auth,
        scope="tickets.read",
    ) as client:
        token = await client.fetch_token(
            h.http_url + "/oauth2/token",
            grant_type=TOKEN_EXCHANGE,
            subject_token=h.idp.token(),
            subject_token_type=JWT_TYPE,
        )
    assert token["scope"] == "tickets.read"
    check = await h.check(token["access_token"], "tickets.read")
    assert check.decision == pb.DECISION_ALLOW


async def test_an_agent_with_keys_must_authenticate_to_revoke(
    h: Harness, agent_keys: AgentKeys
) -> None:
    """A leaked token alone revokes nothing for a client with keys: the revocation endpoint
    asks for the token endpoint's client authentication."""
    form = exchange_form(h.idp.token(), client_id=AGENT)
    assertion = agent_keys.assertion(aud=TOKEN_ENDPOINT)
    _, issued, _ = await post(h, "/oauth2/token", authenticated(form, assertion))
    token = issued["access_token"]
    revoke = {"token": token, "client_id": AGENT}
    status, body, _ = await post(h, "/oauth2/revoke", revoke)
    assert (status, body["error"]) == (401, "invalid_client")
    assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW
    for audience in (REVOCATION_ENDPOINT, TOKEN_ENDPOINT):
        status, body, _ = await post(
            h, "/oauth2/revoke", authenticated(revoke, agent_keys.assertion(aud=audience))
        )
        assert status == 200, body
    check = await h.check(token, "tickets.read")
    assert (check.decision, check.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)


# Over HTTP the token endpoint is an accepted audience: not an attack there. The shape checks
# the door makes itself (oversized, binary, not a JWS) answer before the Delegator is asked.
HTTP_ATTACKS = [name for name in ATTACKS if name != "the token endpoint over gRPC"]


@pytest.mark.parametrize("attack", HTTP_ATTACKS)
async def test_a_bad_assertion_is_invalid_client_with_nothing_stored(
    h: Harness, agent_keys: AgentKeys, attack: str
) -> None:
    """Every known JWT attack of the gRPC tests, at the token endpoint: 401 invalid_client,
    the description saying what is wrong but never the assertion, nothing stored."""
    make, _ = ATTACKS[attack]
    assertion = make(agent_keys)
    form = authenticated(exchange_form(h.idp.token(), client_id=AGENT), assertion)
    status, body, _ = await post(h, "/oauth2/token", form)
    assert (status, body["error"]) == (401, "invalid_client"), body
    assert assertion[:40] not in body["error_description"]
    assert quote(assertion[:40]) not in body["error_description"]
    assert session_count(h) == 0


async def test_an_agent_token_is_not_a_client_assertion(h: Harness) -> None:
    agent_token = (await h.delegate()).token
    form = authenticated(exchange_form(h.idp.token(), client_id=AGENT), agent_token)
    status, body, _ = await post(h, "/oauth2/token", form)
    assert (status, body["error"]) == (401, "invalid_client")
    assert session_count(h) == 1  # the gRPC delegation only

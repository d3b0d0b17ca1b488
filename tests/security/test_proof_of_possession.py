"""Sender-constrained agent tokens: a token bound to the agent's key (cnf.jkt) needs a DPoP proof
(RFC 9449) in every Check; without it, or with a wrong one, Check denies."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.tokens.jwk import public_jwk, thumbprint
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Harness

URI = "https://payments.example/transfers"


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def proof(key: ec.EllipticCurvePrivateKey, token: str, **overrides: Any) -> str:
    claims = {
        "jti": uuid.uuid4().hex,
        "htm": "POST",
        "htu": URI,
        "iat": int(time.time()),
        "ath": ath(token),
    }
    claims.update(overrides)
    header = {"typ": "dpop+jwt", "jwk": public_jwk(key.public_key())}
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None}, key, algorithm="ES256", headers=header
    )


@pytest.fixture
def agent_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def bound_token(h: Harness, key: ec.EllipticCurvePrivateKey) -> str:
    delegated = await h.delegate(
        scopes=["payments.transfer"], jkt=thumbprint(public_jwk(key.public_key()))
    )
    return delegated.token


async def check(
    h: Harness, token: str, pop: str, method: str = "POST", uri: str = URI
) -> pb.CheckResponse:
    return await h.check(token, "payments.transfer", pop_proof=pop, pop_method=method, pop_uri=uri)


async def test_a_good_proof_allows(harness: Harness, agent_key: ec.EllipticCurvePrivateKey) -> None:
    token = await bound_token(harness, agent_key)
    assert (await check(harness, token, proof(agent_key, token))).decision == pb.DECISION_ALLOW
    # The query string is not part of htu.
    response = await check(harness, token, proof(agent_key, token), uri=URI + "?page=2")
    assert response.decision == pb.DECISION_ALLOW


async def test_bad_proofs_are_denied(
    harness: Harness, agent_key: ec.EllipticCurvePrivateKey
) -> None:
    token = await bound_token(harness, agent_key)
    stranger = ec.generate_private_key(ec.SECP256R1())
    reused = proof(agent_key, token)
    assert (await check(harness, token, reused)).decision == pb.DECISION_ALLOW
    bad = {
        "missing": "",
        "replayed": reused,
        "another key": proof(stranger, token),
        "another method": proof(agent_key, token, htm="GET"),
        "another uri": proof(agent_key, token, htu="https://evil.example/transfers"),
        "another token": proof(agent_key, token, ath=ath("other")),
        "no ath": proof(agent_key, token, ath=None),
        "stale": proof(agent_key, token, iat=int(time.time()) - 3600),
        "garbage": "not.a.proof",
    }
    for name, pop in bad.items():
        response = await check(harness, token, pop)
        assert (response.decision, response.reason) == (
            pb.DECISION_DENY,
            pb.REASON_PROOF_OF_POSSESSION_FAILED,
        ), name


async def test_unbound_tokens_need_no_proof(harness: Harness) -> None:
    delegated = await harness.delegate(scopes=["payments.transfer"])
    assert (await harness.check(delegated.token, "payments.transfer")).decision == pb.DECISION_ALLOW


async def test_a_sub_agent_of_a_bound_session_stays_bound_to_the_same_key(
    harness: Harness, agent_key: ec.EllipticCurvePrivateKey
) -> None:
    """A stolen bound token is useless for Check without the key; it must not mint a child that
    is unbound or bound to the thief's key."""
    from agentid_server.tokens.agent_tokens import json_object

    from tests.conftest import error_info

    jkt = thumbprint(public_jwk(agent_key.public_key()))
    parent = await harness.delegate(scopes=["tickets.*", "agentid.delegate"], jkt=jkt)
    child = await harness.sub_delegate(parent.token)
    claims = json_object(child.token.split(".")[1])
    assert claims is not None
    assert claims["cnf"] == {"jkt": jkt}  # inherited
    assert (await harness.check(child.token, "tickets.read")).decision == pb.DECISION_DENY
    thief = thumbprint(public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sub_delegate(parent.token, scopes=["tickets.read"], jkt=thief)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "KEY_BINDING_ESCALATION"

"""Agents with keys authenticate with a client assertion (RFC 7523 private_key_jwt) at each
Delegate for them (`DelegateRequest.actor_token`): a real server, a real JWKS file of the agent's
RSA, EC P-256 and Ed25519 keys, and a regression test per known JWT attack."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import (
    ISSUER,
    FakeClock,
    Harness,
    IdpFixture,
    error_info,
    int_b64,
    running_harness,
)

AGENT = "keyed-bot"
KIDS = {"RS256": "agent-rsa", "PS256": "agent-rsa", "ES256": "agent-ec", "EdDSA": "agent-ed"}


def public_jwk(key: Any, kid: str) -> dict[str, str]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "kid": kid, "n": int_b64(numbers.n), "e": int_b64(numbers.e)}
    if isinstance(public, ec.EllipticCurvePublicKey):
        point = public.public_numbers()
        return {
            "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
            "x": b64(point.x.to_bytes(32, "big")), "y": b64(point.y.to_bytes(32, "big")),
        }  # fmt: skip
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "kid": kid, "crv": "Ed25519", "alg": "EdDSA", "x": b64(raw)}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class AgentKeys:
    """The keyed agent's private keys and its JWKS file (what `[[agents]] jwks_file` names)."""

    path: Path
    clock: FakeClock
    keys: dict[str, Any] = field(
        default_factory=lambda: {
            "agent-rsa": rsa.generate_private_key(65537, 2048),
            "agent-ec": ec.generate_private_key(ec.SECP256R1()),
            "agent-ed": ed25519.Ed25519PrivateKey.generate(),
        }
    )

    def __post_init__(self) -> None:
        self.write()

    def write(self) -> None:
        jwks = {"keys": [public_jwk(key, kid) for kid, key in self.keys.items()]}
        self.path.write_text(json.dumps(jwks))

    def assertion(
        self,
        alg: str = "ES256",
        *,
        kid: str | None = None,
        key: Any = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(self.clock.now())
        payload: dict[str, Any] = {
            "iss": AGENT, "sub": AGENT, "aud": ISSUER, "iat": now, "exp": now + 120,
            "jti": str(uuid.uuid4()),
        }  # fmt: skip
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        kid = kid or KIDS[alg]
        header = {k: v for k, v in {"kid": kid, **(headers or {})}.items() if v is not None}
        return jwt.encode(payload, key or self.keys[kid], algorithm=alg, headers=header)


def keyed(agent_keys: AgentKeys) -> Any:
    def mutate(config: dict[str, Any]) -> None:
        config["agents"].append(
            {"id": AGENT, "max_scopes": ["tickets.*"], "jwks_file": str(agent_keys.path)}
        )

    return mutate


@pytest.fixture
def agent_keys(tmp_path: Path, clock: FakeClock) -> AgentKeys:
    return AgentKeys(tmp_path / "agent-jwks.json", clock)


@pytest.fixture
async def h(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, agent_keys: AgentKeys
) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path, idp, clock, mutate=keyed(agent_keys)) as harness:
        yield harness


def recorded(h: Harness) -> tuple[int, int]:
    """Sessions and audit records in the store."""
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        sessions = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
        records = db.execute("SELECT count(*) FROM audit_records").fetchone()[0]
    return int(sessions), int(records)


async def refused(h: Harness, actor_token: str, *, agent_id: str = AGENT) -> str:
    """Delegates with the assertion, expecting PERMISSION_DENIED / ACTOR_UNAUTHENTICATED with
    nothing recorded; the message."""
    before = recorded(h)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.delegate(agent_id=agent_id, actor_token=actor_token)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "ACTOR_UNAUTHENTICATED"
    message = caught.value.details() or ""
    if actor_token:
        assert actor_token[:64] not in message  # never echoed, in part or whole
    assert recorded(h) == before
    return message


async def test_an_agent_with_keys_is_not_delegated_to_without_its_assertion(h: Harness) -> None:
    message = await refused(h, "")
    assert "actor_token" in message


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
async def test_a_valid_assertion_is_accepted_once(
    h: Harness, agent_keys: AgentKeys, alg: str
) -> None:
    assertion = agent_keys.assertion(alg)
    session = await h.delegate(agent_id=AGENT, actor_token=assertion)
    assert session.session_id
    assert "already used" in await refused(h, assertion)


async def test_the_audience_may_be_a_list_naming_the_issuer(
    h: Harness, agent_keys: AgentKeys
) -> None:
    await h.delegate(
        agent_id=AGENT, actor_token=agent_keys.assertion(aud=["https://other", ISSUER])
    )


def hs256_with_the_public_key(agent_keys: AgentKeys) -> str:
    """The key-confusion attack: HMAC keyed with the agent's public key (PEM), which anyone has."""
    public = agent_keys.keys["agent-rsa"].public_key()
    secret = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    now = int(agent_keys.clock.now())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "agent-rsa"}).encode())
    claims = {"iss": AGENT, "sub": AGENT, "aud": ISSUER, "exp": now + 60, "jti": "x"}
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def unsigned(agent_keys: AgentKeys) -> str:
    now = int(agent_keys.clock.now())
    claims = {"iss": AGENT, "sub": AGENT, "aud": ISSUER, "exp": now + 60, "jti": "y"}
    return jwt.encode(claims, None, algorithm="none", headers={"kid": "agent-ec"})


ATTACKS: dict[str, Any] = {
    "alg none": (unsigned, "must be signed with"),
    "HS256 keyed with the public key": (hs256_with_the_public_key, "must be signed with"),
    "expired": (lambda k: k.assertion(exp=int(k.clock.now()) - 60), "has expired"),
    "exp over 5 minutes ahead": (
        lambda k: k.assertion(exp=int(k.clock.now()) + 400),
        "expires more than 300 s ahead",
    ),
    "nbf in the future": (lambda k: k.assertion(nbf=int(k.clock.now()) + 60), "nbf"),
    "iat in the future": (lambda k: k.assertion(iat=int(k.clock.now()) + 60), "iat"),
    "exp not a number": (lambda k: k.assertion(exp="soon"), "exp"),
    "another audience": (lambda k: k.assertion(aud="https://elsewhere"), "audience"),
    "the token endpoint over gRPC": (
        lambda k: k.assertion(aud=f"{ISSUER}/oauth2/token"),
        "audience",
    ),
    "another issuer": (lambda k: k.assertion(iss="support-bot"), "issuer"),
    "another subject": (lambda k: k.assertion(sub="support-bot"), "subject"),
    "no jti": (lambda k: k.assertion(jti=None), "'jti'"),
    "no exp": (lambda k: k.assertion(exp=None), "'exp'"),
    "no aud": (lambda k: k.assertion(aud=None), "'aud'"),
    "an empty jti": (lambda k: k.assertion(jti=""), "jti"),
    "a jti too long": (lambda k: k.assertion(jti="j" * 129), "jti"),
    "a jti not a string": (lambda k: k.assertion(jti=7), "jti"),
    "no kid": (lambda k: k.assertion(headers={"kid": None}), "kid"),
    # PyJWT refuses unknown critical extensions as it reads the header; we refuse any anyway.
    "a crit header": (lambda k: k.assertion(headers={"crit": ["exp"]}), "not a compact JWS"),
    "typed as an agent token": (lambda k: k.assertion(headers={"typ": "agent+jwt"}), "typ"),
    "an EC kid with RS256": (
        lambda k: k.assertion("RS256", kid="agent-ec", key=k.keys["agent-rsa"]),
        "algorithm",
    ),
    "signed by a stranger's key under a known kid": (
        lambda k: k.assertion(key=ec.generate_private_key(ec.SECP256R1())),
        "signature",
    ),
    "oversized": (lambda k: "a" * 9000, "larger than 8192 bytes"),
    "binary": (lambda k: "\x00\xff\u2603" * 50, "not a compact JWS"),
    "not a JWT": (lambda k: "not.a.jwt", "not a compact JWS"),
}


@pytest.mark.parametrize("attack", ATTACKS)
async def test_a_bad_assertion_is_refused_with_nothing_recorded(
    h: Harness, agent_keys: AgentKeys, attack: str
) -> None:
    make, expected = ATTACKS[attack]
    assert expected in await refused(h, make(agent_keys))


async def test_an_agent_token_is_not_an_assertion(h: Harness) -> None:
    session = await h.delegate()  # support-bot's token, signed by agentid
    await refused(h, session.token)


async def test_a_failed_assertion_charges_nothing_to_the_rate_limit(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, agent_keys: AgentKeys
) -> None:
    def mutate(config: dict[str, Any]) -> None:
        keyed(agent_keys)(config)
        config["tokens"]["delegate_per_user_per_minute"] = 1
        config["tokens"]["delegate_per_user_burst"] = 1

    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        for _ in range(3):
            await refused(harness, agent_keys.assertion(exp=int(clock.now()) - 60))
        await harness.delegate(agent_id=AGENT, actor_token=agent_keys.assertion())


async def test_an_unknown_kid_is_looked_up_again_at_most_every_min_refresh(
    h: Harness, agent_keys: AgentKeys, clock: FakeClock
) -> None:
    new_key = ed25519.Ed25519PrivateKey.generate()

    def rotated() -> str:
        return agent_keys.assertion("EdDSA", kid="agent-ed-2", key=new_key)

    assert "unknown kid" in await refused(h, rotated())
    agent_keys.keys["agent-ed-2"] = new_key
    agent_keys.write()
    clock.advance(5)  # read at start moments ago: not again yet, however many unknown kids come
    assert "unknown kid" in await refused(h, rotated())
    clock.advance(30)  # AGENT_JWKS_MIN_REFRESH is up: the unknown kid re-reads the JWKS
    await h.delegate(agent_id=AGENT, actor_token=rotated())


async def test_an_agent_without_keys_is_a_public_client(h: Harness) -> None:
    session = await h.delegate(agent_id="support-bot")
    assert session.session_id


async def test_a_sub_agent_with_keys_needs_its_assertion_too(
    h: Harness, agent_keys: AgentKeys
) -> None:
    parent = await h.delegate(scopes=["tickets.read", "agentid.delegate"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.sub_delegate(parent.token, agent_id=AGENT)
    assert error_info(caught.value).reason == "ACTOR_UNAUTHENTICATED"
    child = await h.sub_delegate(parent.token, agent_id=AGENT, actor_token=agent_keys.assertion())
    assert child.parent_session_id == parent.session_id

"""Sender-constrained agent tokens: a token bound to the agent's key (cnf.jkt) needs a DPoP proof
(RFC 9449) in every Check (without it, or with a wrong one, Check denies) and whenever the agent
uses it as its own credential (then the call is UNAUTHENTICATED)."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.tokens.jwk import public_jwk, thumbprint
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import FakeClock, Harness, IdpFixture

URI = "https://payments.example/transfers"
# A proof for one of agentid's own methods names the method's path (any host).
STEP_UP = "/agentid.v1.AgentIdentityService/StepUp"
DELEGATE = "/agentid.v1.AgentIdentityService/Delegate"


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
    """A bound session's child is bound to the same key: never unbound, never rebound to another
    key (a thief without the key cannot call at all: see the next test)."""
    from agentid_server.tokens.agent_tokens import json_object

    from tests.conftest import bearer, error_info

    jkt = thumbprint(public_jwk(agent_key.public_key()))
    parent = await harness.delegate(scopes=["tickets.*", "agentid.delegate"], jkt=jkt)

    async def sub_delegate(**fields: Any) -> pb.DelegateResponse:
        pop = proof(agent_key, parent.token, htu=DELEGATE)
        request = pb.DelegateRequest(agent_id="sub-bot", scopes=["tickets.read"], **fields)
        return await harness.stub.Delegate(request, metadata=(*bearer(parent.token), ("dpop", pop)))

    child = await sub_delegate()
    claims = json_object(child.token.split(".")[1])
    assert claims is not None
    assert claims["cnf"] == {"jkt": jkt}  # inherited
    assert (await harness.check(child.token, "tickets.read")).decision == pb.DECISION_DENY
    other = thumbprint(public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sub_delegate(jkt=other)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "KEY_BINDING_ESCALATION"


async def test_a_bound_token_calls_agentid_only_with_a_proof(
    harness: Harness, agent_key: ec.EllipticCurvePrivateKey
) -> None:
    """A bound token as the caller's own credential (StepUp, sub-Delegate, Revoke...) needs its
    DPoP proof in the `dpop` metadata, as in Check: htm POST, htu naming the method's path."""
    from tests.conftest import bearer, error_info

    jkt = thumbprint(public_jwk(agent_key.public_key()))
    parent = await harness.delegate(scopes=["tickets.*", "agentid.delegate"], jkt=jkt)
    token = parent.token
    request = pb.StepUpRequest(action="tickets.read", resource="ticket/1")

    def with_proof(pop: str) -> tuple[tuple[str, str], ...]:
        return (*bearer(token), ("dpop", pop))

    stranger = ec.generate_private_key(ec.SECP256R1())
    good = proof(agent_key, token, htu="https://agentid.example" + STEP_UP)
    refused = {
        "no proof": bearer(token),
        "another method's proof": with_proof(proof(agent_key, token, htu=DELEGATE)),
        "another key's proof": with_proof(proof(stranger, token, htu=STEP_UP)),
        "a Check proof": with_proof(proof(agent_key, token)),
        "a stale proof": with_proof(proof(agent_key, token, htu=STEP_UP, iat=1)),
        "garbage": with_proof("not.a.proof"),
    }
    for name, metadata in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.stub.StepUp(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert error_info(caught.value).reason == "PROOF_OF_POSSESSION_FAILED", name
    assert (await harness.stub.StepUp(request, metadata=with_proof(good))).step_up.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # one use per proof
        await harness.stub.StepUp(request, metadata=with_proof(good))
    assert error_info(caught.value).reason == "PROOF_OF_POSSESSION_FAILED"
    # The host is the deployment's business: the path names the method.
    child = await harness.stub.Delegate(
        pb.DelegateRequest(agent_id="sub-bot", scopes=["tickets.read"]),
        metadata=with_proof(proof(agent_key, token, htu=DELEGATE)),
    )
    assert child.session_id


def test_a_full_replay_cache_refuses_new_proofs_rather_than_forget_live_ones() -> None:
    """Forgetting a proof that could still be replayed would let it be: when every remembered
    proof is still live, a new one is refused; once they expire, proofs pass again."""
    from agentid_server.domain.ports import TokenRejected
    from agentid_server.tokens.dpop import ENTRY_BYTES, DpopVerifier

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]
    room = 3 * (ENTRY_BYTES + 1)  # three proofs with one-character jtis
    verifier = DpopVerifier(max_age=60.0, cache_bytes=room, bytes_per_user=room)
    uri = "https://tickets.example/read"
    start = time.time() - 200  # proofs from the past: PyJWT refuses an iat in the future

    def use(key: ec.EllipticCurvePrivateKey, now: float, jti: str = "j") -> None:
        verifier.spend(
            verifier.verify(
                proof(key, "tok", jti=jti, iat=int(now), htu=uri),
                jkt=thumbprint(public_jwk(key.public_key())), method="POST", uri=uri,
                token="tok", now=now, owner="alice",
            ),
            now,
        )  # fmt: skip

    for key in keys[:3]:
        use(key, start)
    with pytest.raises(TokenRejected, match="too many"):
        use(keys[3], start + 1)
    with pytest.raises(TokenRejected, match="already used"):
        use(keys[0], start + 1)  # the first is remembered still
    use(keys[4], start + 121)  # all three have expired (2 x max_age): room again


def test_a_verified_proof_is_remembered_only_when_spent() -> None:
    """verify checks and refuses a spent proof but remembers nothing; spend remembers it."""
    from agentid_server.domain.ports import TokenRejected
    from agentid_server.tokens.dpop import DpopVerifier

    key = ec.generate_private_key(ec.SECP256R1())
    verifier = DpopVerifier()
    uri, now = "https://tickets.example/read", time.time() - 10
    pop = proof(key, "tok", iat=int(now), htu=uri)
    jkt = thumbprint(public_jwk(key.public_key()))
    first = verifier.verify(pop, jkt=jkt, method="POST", uri=uri, token="tok", now=now)
    again = verifier.verify(pop, jkt=jkt, method="POST", uri=uri, token="tok", now=now)
    verifier.spend(again, now)
    with pytest.raises(TokenRejected, match="already used"):
        verifier.verify(pop, jkt=jkt, method="POST", uri=uri, token="tok", now=now)
    with pytest.raises(TokenRejected, match="already used"):
        verifier.spend(first, now)


@pytest.mark.parametrize(
    ("htu", "same"),
    [
        ("https://payments.example/transfers", True),
        ("https://Payments.Example/transfers", True),
        ("HTTPS://payments.example:443/transfers", True),
        ("https://payments.example/a/../transfers?x=1#f", True),
        ("https://payments.example/%74ransfers", True),  # %74 is "t", unreserved
        ("https://payments.example:8443/transfers", False),
        ("http://payments.example/transfers", False),
        ("https://payments.example/Transfers", False),  # paths are case-sensitive
        ("https://payments.example.evil/transfers", False),
        ("https://payments.example/transfers/more", False),
        ("/transfers", False),
        ("https://payments.example\\@evil.example/transfers", False),  # parsers disagree
        ("https://user@payments.example/transfers", False),
    ],
)
def test_htu_is_compared_after_rfc_3986_normalisation(htu: str, same: bool) -> None:
    """RFC 9449 4.3: the htu matches the request's URI ignoring query and fragment, after
    syntax-based and scheme-based normalisation."""
    from agentid_server.domain.ports import TokenRejected
    from agentid_server.tokens.dpop import DpopVerifier

    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(public_jwk(key.public_key()))
    verify = DpopVerifier().verify
    uri = "https://payments.example/transfers"
    token_proof = proof(key, "tok", htu=htu)
    if same:
        verify(token_proof, jkt=jkt, method="POST", uri=uri, token="tok", now=time.time())
    else:
        with pytest.raises(TokenRejected, match="another URI"):
            verify(token_proof, jkt=jkt, method="POST", uri=uri, token="tok", now=time.time())


def test_one_users_agents_cannot_fill_the_replay_cache_for_every_other_user() -> None:
    """Keys cost nothing to make, users do: the cache is shared out by the user who delegated
    the session. Mallory's proofs, from as many keys as she likes, fill her share only; Alice's
    still pass (issue 12: 12 keys filled the whole cache, then Alice's agent was refused)."""
    from agentid_server.domain.ports import TokenRejected
    from agentid_server.tokens.dpop import ENTRY_BYTES, DpopVerifier

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(12)]
    alice_key = ec.generate_private_key(ec.SECP256R1())
    per_proof = ENTRY_BYTES + 2  # two-character jtis
    verifier = DpopVerifier(max_age=60.0, cache_bytes=20 * per_proof, bytes_per_user=5 * per_proof)
    uri = "https://tickets.example/read"
    now = time.time() - 200

    def use(key: ec.EllipticCurvePrivateKey, n: int, owner: str) -> None:
        verifier.spend(
            verifier.verify(
                proof(key, "tok", jti=f"j{n % 10}", iat=int(now), htu=uri),
                jkt=thumbprint(public_jwk(key.public_key())), method="POST", uri=uri,
                token="tok", now=now, owner=owner,
            ),
            now,
        )  # fmt: skip

    for n, key in enumerate(keys[:5]):
        use(key, n, "mallory")
    for n, key in enumerate(keys[5:]):
        with pytest.raises(TokenRejected, match="this user's agents"):
            use(key, n, "mallory")
    for n in range(5):
        use(alice_key, n, "alice")
    use(keys[0], 9, "bob")


CHECK_PATH = "/agentid.v1.AgentIdentityService/Check"


async def test_a_call_the_method_policy_refuses_spends_no_proof(
    harness: Harness, agent_key: ec.EllipticCurvePrivateKey
) -> None:
    """An agent calling Check (a service's method) with its proof is refused by the method
    policy, and the proof is not remembered: refused again the same way, never as a replay.
    Before, authentication remembered it first, so refused calls filled the replay cache."""
    from tests.conftest import bearer, error_info

    token = await bound_token(harness, agent_key)
    pop = proof(agent_key, token, htu=CHECK_PATH)
    request = pb.CheckRequest(token=token, action="payments.transfer")
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.stub.Check(request, metadata=(*bearer(token), ("dpop", pop)))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "CALLER_NOT_ALLOWED"


async def test_mallorys_agents_cannot_make_alices_proofs_fail(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """The replay cache is shared out by user: Mallory's agents, with a key each, calling what
    they may (StepUp) until their share is full and what they may not (Check) as often as they
    like, leave Alice's agent's proofs passing, in Check and as a caller."""
    from tests.conftest import ISSUER, bearer, error_info, running_harness, with_config

    tokens = {
        "issuer": ISSUER, "kek_file": str(tmp_path / "kek"),
        "dpop_replay_cache_bytes": 16384, "dpop_replay_bytes_per_user": 4096,
    }  # fmt: skip
    async with running_harness(tmp_path, idp, clock, mutate=with_config(tokens=tokens)) as h:
        mallory_keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
        mallory = [
            await h.delegate(h.idp.token(sub="mallory"), scopes=["tickets.read"], jkt=thumbprint(public_jwk(k.public_key())))
            for k in mallory_keys
        ]  # fmt: skip
        step_up = pb.StepUpRequest(action="tickets.read", resource="ticket/1")
        for n in range(20):  # 4096 bytes hold 11 proofs
            key, session = mallory_keys[n % 4], mallory[n % 4]
            pop = proof(key, session.token, htu=CHECK_PATH)
            with pytest.raises(grpc.aio.AioRpcError):  # refused by the method policy
                await h.stub.Check(
                    pb.CheckRequest(token=session.token, action="tickets.read"),
                    metadata=(*bearer(session.token), ("dpop", pop)),
                )
        refused = None
        for n in range(20):
            key, session = mallory_keys[n % 4], mallory[n % 4]
            metadata = (*bearer(session.token), ("dpop", proof(key, session.token, htu=STEP_UP)))
            try:
                await h.stub.StepUp(step_up, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                refused = error
                break
        assert refused is not None
        assert n == 11  # the policy-refused calls took no room
        assert error_info(refused).reason == "PROOF_OF_POSSESSION_FAILED"
        assert "this user's agents" in (refused.details() or "")
        alice_key = ec.generate_private_key(ec.SECP256R1())
        alice = await bound_token(h, alice_key)
        assert (await check(h, alice, proof(alice_key, alice))).decision == pb.DECISION_ALLOW
        metadata = (*bearer(alice), ("dpop", proof(alice_key, alice, htu=STEP_UP)))
        assert (
            await h.stub.StepUp(pb.StepUpRequest(action="payments.transfer"), metadata=metadata)
        ).step_up.id


async def test_a_proof_with_an_overlong_jti_is_refused(
    harness: Harness, agent_key: ec.EllipticCurvePrivateKey
) -> None:
    """A jti is remembered for two minutes: one longer than 128 characters is refused (2,600
    characters each made a full cache about 440 MB)."""
    token = await bound_token(harness, agent_key)
    response = await check(harness, token, proof(agent_key, token, jti="j" * 129))
    assert (response.decision, response.reason) == (
        pb.DECISION_DENY,
        pb.REASON_PROOF_OF_POSSESSION_FAILED,
    )
    assert "1 to 128 characters" in response.message
    assert (
        await check(harness, token, proof(agent_key, token, jti="j" * 128))
    ).decision == pb.DECISION_ALLOW


@pytest.mark.parametrize(("skew", "good"), [(-59, True), (30, True), (59, True), (61, False)])
def test_iat_may_be_max_age_either_side_of_the_verifiers_clock(skew: int, good: bool) -> None:
    """An agent's clock a little ahead is taken as one a little behind is (max_age, 60 s, either
    way), on the verifier's own clock: the wall clock is not consulted on the side."""
    from agentid_server.domain.ports import TokenRejected
    from agentid_server.tokens.dpop import DpopVerifier

    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(public_jwk(key.public_key()))
    uri, now = "https://tickets.example/read", 1_900_000_000.0  # not the wall clock
    pop = proof(key, "tok", iat=int(now) + skew, htu=uri)
    verify = DpopVerifier().verify
    if good:
        verify(pop, jkt=jkt, method="POST", uri=uri, token="tok", now=now)
    else:
        with pytest.raises(TokenRejected, match="stale or from the future"):
            verify(pop, jkt=jkt, method="POST", uri=uri, token="tok", now=now)

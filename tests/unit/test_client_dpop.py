"""The client's DPoP proof verifier (agentid_client.mcp.ProofVerifier, what the MCP guard spends
key-bound tokens' proofs with): a good proof once, and every way a proof is refused, the replay
cache's bounds with a clock the test moves."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from agentid_client import jwk_thumbprint
from agentid_client.dpop import dpop_proof, proof_uri, public_jwk, token_hash
from agentid_client.mcp import ProofRejected, ProofVerifier
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

URL = "https://tools.example/mcp"
TOKEN = "the.agent.token"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def verify(verifier: ProofVerifier, proof: str, key: Any, user: str = "alice", **what: str) -> None:
    expected = {"method": "POST", "url": URL, "access_token": TOKEN, **what}
    jkt = jwk_thumbprint(public_jwk(key))
    verifier.verify(proof, jkt=jkt, user=user, **expected)


def forged(key: Any, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """A proof with these claims (or header) changed, signed by ``key``."""
    payload = {
        "jti": "j-1",
        "htm": "POST",
        "htu": URL,
        "iat": int(time.time()),
        "ath": token_hash(TOKEN),
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    jws_header = {"typ": "dpop+jwt", "jwk": public_jwk(key), **(header or {})}
    algorithm = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256"
    return jwt.encode(payload, key, algorithm=algorithm, headers=jws_header)


@pytest.mark.parametrize("curve", ["P-256", "Ed25519"])
def test_a_good_proof_is_accepted_once(curve: str) -> None:
    key: Any = (
        ec.generate_private_key(ec.SECP256R1())
        if curve == "P-256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    verifier = ProofVerifier()
    proof = dpop_proof(key, "POST", URL + "?x=1#f", TOKEN)  # query and fragment are no part of htu
    verify(verifier, proof, key)
    with pytest.raises(ProofRejected, match="used already"):
        verify(verifier, proof, key)
    verify(verifier, dpop_proof(key, "post", "HTTPS://TOOLS.example:443/mcp", TOKEN), key)
    assert len(verifier) == 2


def test_every_mismatch_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    verifier = ProofVerifier()
    cases = {
        "required": "",
        "another method": dpop_proof(key, "GET", URL, TOKEN),
        "another URI": dpop_proof(key, "POST", "https://tools.example/other", TOKEN),
        "ath": dpop_proof(key, "POST", URL, "another.token"),
        "not the key the token is bound to": dpop_proof(other, "POST", URL, TOKEN),
        "stale": forged(key, iat=int(time.time()) - 120),
        "from the future": forged(key, iat=int(time.time()) + 120),
        "jti": forged(key, jti="j" * 129),
        "header is not acceptable": forged(key, header={"typ": "JWT"}),
        "does not verify": forged(key, jti=None),
        "too large": "x" * 5000,
        "well-formed": "not.a.jws",
    }
    for reason, proof in cases.items():
        with pytest.raises(ProofRejected, match=reason):
            verify(verifier, proof, key)
    # Signed by another key than the one its header shows: the signature does not verify.
    swapped = jwt.encode(
        {
            "jti": "j-2",
            "htm": "POST",
            "htu": URL,
            "iat": int(time.time()),
            "ath": token_hash(TOKEN),
        },
        other,
        algorithm="ES256",
        headers={"typ": "dpop+jwt", "jwk": public_jwk(key)},
    )
    with pytest.raises(ProofRejected, match="does not verify"):
        verify(verifier, swapped, key)
    assert len(verifier) == 0


def test_no_algorithm_but_the_agents_own(key: ec.EllipticCurvePrivateKey) -> None:
    jwk = public_jwk(key)
    unsigned = jwt.encode({"jti": "j", "htm": "POST", "htu": URL, "iat": 1}, None, algorithm="none")
    hmac = jwt.encode(
        {"jti": "j", "htm": "POST", "htu": URL, "iat": int(time.time())},
        "secret-secret-secret-secret-secret",
        algorithm="HS256",
        headers={"typ": "dpop+jwt", "jwk": jwk},
    )
    private = forged(key, header={"jwk": {**jwk, "d": "AAAA"}})
    for proof in (unsigned, hmac, private):
        with pytest.raises(ProofRejected):
            verify(ProofVerifier(), proof, key)


def test_the_replay_cache_is_bounded_and_never_forgets_a_live_proof(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    clock = Clock()
    verifier = ProofVerifier(max_age=60, max_proofs=3, max_proofs_per_user=2, clock=clock)
    verify(verifier, forged(key, jti="a1", iat=int(clock.now)), key, user="alice")
    verify(verifier, forged(key, jti="a2", iat=int(clock.now)), key, user="alice")
    with pytest.raises(ProofRejected, match="this user's agents"):  # alice's share
        verify(verifier, forged(key, jti="a3", iat=int(clock.now)), key, user="alice")
    verify(verifier, forged(key, jti="b1", iat=int(clock.now)), key, user="bob")
    with pytest.raises(ProofRejected, match="retry shortly"):  # full
        verify(verifier, forged(key, jti="c1", iat=int(clock.now)), key, user="carol")
    clock.now += 121  # every proof spent is now too old to verify: forgotten
    verify(verifier, forged(key, jti="c1", iat=int(clock.now)), key, user="carol")
    assert len(verifier) == 1


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        ("HTTPS://Tools.Example:443/mcp?q=1#x", "https://tools.example/mcp"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
        ("http://[::1]:80/a", "http://[::1]/a"),
    ],
)
def test_proof_uris_are_compared_normalised(url: str, uri: str) -> None:
    assert proof_uri(url) == uri


@pytest.mark.parametrize("url", ["ftp://x/y", "/mcp", "https://user:pw@x/y", "http://x:99999/"])
def test_a_proof_uri_is_an_absolute_http_url(url: str) -> None:
    with pytest.raises(ValueError, match=r"absolute http|Port"):
        proof_uri(url)

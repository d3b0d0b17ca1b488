"""The verified-token cache: bounded, and the tokens in use stay in it (least recently used go
first), so a busy token is not verified again while idle ones fill the cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
from agentid_server.domain.ports import TokenRejected
from agentid_server.tokens.agent_tokens import AgentTokenIssuer, AgentTokenVerifier
from agentid_server.tokens.keys import KeyRing, generate_signing_key

ISSUER = "https://agentid.test"


def token(issuer: AgentTokenIssuer, n: int, scope: str = "tickets.read") -> str:
    return issuer.issue(
        {
            "iss": ISSUER, "sub": "alice", "act": {"sub": "bot", "sid": f"ses_{n}"},
            "scope": scope, "jti": f"ses_{n}", "sn": n, "iat": 1, "nbf": 1, "exp": 2,
        }
    )  # fmt: skip


def test_the_least_recently_used_token_leaves_the_cache_first() -> None:
    ring = KeyRing([generate_signing_key("EdDSA", now=0)], "EdDSA", max_token_ttl=10)
    issuer = AgentTokenIssuer(ring)
    a, b, c = (token(issuer, n) for n in (1, 2, 3))
    verifier = AgentTokenVerifier(ISSUER, ring, cache_size=2)
    for used in (a, b, a, c):  # a is used again before c arrives: b is the least recently used
        verifier.verify(used)
    first = ring.signing_key(now=1)
    ring.update([replace(first, retired_at=100), generate_signing_key("EdDSA", now=100)], now=100)
    ring.drop_expired(now=1000)  # the key that signed a, b and c is gone: only cached ones pass
    assert verifier.verify(a).session_id == "ses_1"
    assert verifier.verify(c).session_id == "ses_3"
    with pytest.raises(TokenRejected):
        verifier.verify(b)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_signatures_of_the_wrong_length_or_bits_are_refused(alg: str) -> None:
    """Ed25519 is checked through libsodium, ES256 through `cryptography`: both refuse a
    signature cut short, lengthened, or with one bit flipped, as SIGNATURE_INVALID."""
    import base64

    from agentid_server.domain.model import Reason

    ring = KeyRing([generate_signing_key(alg, now=0)], alg, max_token_ttl=10)
    good = token(AgentTokenIssuer(ring), 1)
    head, body, signature = good.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    forged = [raw[:-1], raw + b"\0", bytes([raw[0] ^ 1]) + raw[1:], b"", bytes(64)]
    for bad in forged:
        part = base64.urlsafe_b64encode(bad).rstrip(b"=").decode()
        verifier = AgentTokenVerifier(ISSUER, ring, cache_size=8)
        with pytest.raises(TokenRejected) as caught:
            verifier.verify(f"{head}.{body}.{part}")
        assert caught.value.reason == Reason.SIGNATURE_INVALID
    assert AgentTokenVerifier(ISSUER, ring, cache_size=8).verify(good).session_id == "ses_1"


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_non_canonical_base64url_signatures_are_refused(alg: str) -> None:
    """A 64-byte signature is 86 base64url characters: the last carries 2 bits of data and 4
    unused ones. Setting those decodes to the same bytes, so 16 spellings of one token would
    verify; only the canonical one (unused bits zero) does, as PyJWT has it (malformed)."""
    from agentid_server.domain.model import Reason

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    ring = KeyRing([generate_signing_key(alg, now=0)], alg, max_token_ttl=10)
    good = token(AgentTokenIssuer(ring), 1)
    assert len(good.rpartition(".")[2]) % 4 == 2
    last = alphabet.index(good[-1])
    spellings = [good[:-1] + alphabet[last | unused] for unused in range(1, 16)]
    for spelling in spellings:
        with pytest.raises(TokenRejected) as caught:
            AgentTokenVerifier(ISSUER, ring, cache_size=8).verify(spelling)
        assert caught.value.reason == Reason.TOKEN_MALFORMED
    assert AgentTokenVerifier(ISSUER, ring, cache_size=8).verify(good).session_id == "ses_1"


def test_the_cache_is_bounded_in_bytes_not_only_in_tokens() -> None:
    """46,000 tokens of 7 KB took 900 MiB under a cap of 50,000 tokens: the cache is bounded by
    an over-estimate of its memory too (cached_bytes), the least recently used going first."""
    from agentid_server.tokens.agent_tokens import cached_bytes

    ring = KeyRing([generate_signing_key("EdDSA", now=0)], "EdDSA", max_token_ttl=10)
    issuer = AgentTokenIssuer(ring)
    scope = " ".join(f"tickets.{'x' * 100}{n}" for n in range(64))
    large = [token(issuer, n, scope) for n in range(10)]
    budget = 4 * cached_bytes(large[0], 64)
    verifier = AgentTokenVerifier(ISSUER, ring, cache_size=50_000, cache_bytes=budget)
    for used in large:
        verifier.verify(used)
    small = token(issuer, 99)
    verifier.verify(small)
    first = ring.signing_key(now=1)
    ring.update([replace(first, retired_at=100), generate_signing_key("EdDSA", now=100)], now=100)
    ring.drop_expired(now=1000)  # only cached tokens still pass
    assert verifier.verify(small).session_id == "ses_99"
    kept = [n for n, used in enumerate(large) if _passes(verifier, used)]
    assert kept == [7, 8, 9]  # three large ones and the small one fit the budget
    # A token larger than the whole budget is verified, and not remembered.
    tiny = AgentTokenVerifier(ISSUER, ring, cache_size=10, cache_bytes=100)
    fresh = token(AgentTokenIssuer(ring), 1)
    assert tiny.verify(fresh).session_id == "ses_1"
    assert not tiny._cache


def _passes(verifier: AgentTokenVerifier, used: str) -> bool:
    try:
        verifier.verify(used)
    except TokenRejected:
        return False
    return True

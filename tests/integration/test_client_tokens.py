"""The Python client's local token verification against a real server: its own tokens verify
(keys from GetJwks and from the HTTP door's jwks_uri), and every attack or stale token is refused
with the reason Check would give; a key published later is fetched when a token names it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_client import (
    AgentIdClient,
    AgentIdError,
    RevocationWatcher,
    TokenRejected,
    TokenVerifier,
    WatcherNotReady,
    jwk_thumbprint,
    parse_jwks,
)
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    ISSUER,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    running_harness,
)


def target(h: Harness) -> str:
    return f"127.0.0.1:{h.running.port}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(token: str, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """The token with its header or claims changed, the signature kept."""
    head, body, signature = token.split(".")
    if header is not None:
        head = b64(
            json.dumps({**json.loads(base64.urlsafe_b64decode(head + "==")), **header}).encode()
        )
    if claims:
        payload = json.loads(base64.urlsafe_b64decode(body + "=="))
        body = b64(json.dumps({**payload, **claims}).encode())
    return f"{head}.{body}.{signature}"


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def rejected(verify: Awaitable[object]) -> str:
    with pytest.raises(TokenRejected) as caught:
        await verify
    return caught.value.reason


async def test_a_token_verifies_with_keys_from_getjwks_and_from_jwks_uri(harness: Harness) -> None:
    issued = await harness.delegate(
        scopes=["tickets.read", "payments.transfer:account/42"], task="t1"
    )
    async with AgentIdClient(target(harness), CHECK_KEY) as service:
        by_rpc = TokenVerifier(ISSUER, service, clock=harness.clock.now)
        claims = await by_rpc.verify(issued.token)
        key_set = await service.jwk_set()
    by_url = TokenVerifier(
        ISSUER, f"{harness.http_url}/.well-known/jwks.json", clock=harness.clock.now
    )
    assert await by_url.verify(issued.token) == claims
    assert claims.sub == "alice"
    assert (claims.agent_id, claims.session_id) == ("support-bot", issued.session_id)
    assert claims.act.sid == issued.session_id
    assert claims.act.act is None
    assert claims.sn == issued.serial
    assert claims.scopes == tuple(issued.scopes)
    assert (claims.aud, claims.task, claims.jkt) == (None, "t1", None)
    assert claims.exp == issued.expires_at.seconds
    assert [key.key_id for key in key_set.keys] == [jwt.get_unverified_header(issued.token)["kid"]]


async def test_attacks_and_stale_tokens_are_refused_with_checks_reasons(harness: Harness) -> None:
    good = (await harness.delegate()).token
    async with AgentIdClient(target(harness), CHECK_KEY) as service:
        verifier = TokenVerifier(ISSUER, service, clock=harness.clock.now)
        jwks = json.loads(await service.jwks())
        # Tampered claims: the signature no longer covers them.
        assert (
            await rejected(verifier.verify(forge(good, scope="admin.all"))) == "SIGNATURE_INVALID"
        )
        # alg none, and HS256 keyed with the public key (the classic confusion).
        kid = jwks["keys"][0]["kid"]
        unsigned = jwt.encode(
            claims_of(good), None, algorithm="none", headers={"typ": "agent+jwt", "kid": kid}
        )
        assert await rejected(verifier.verify(unsigned)) == "SIGNATURE_INVALID"
        public = json.dumps(jwks["keys"][0]).encode()
        head = b64(json.dumps({"alg": "HS256", "typ": "agent+jwt", "kid": kid}).encode())
        body = b64(json.dumps(claims_of(good)).encode())
        mac = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
        confused = f"{head}.{body}.{b64(mac)}"
        assert await rejected(verifier.verify(confused)) == "SIGNATURE_INVALID"
        # Signed with a key of our own making, under a kid agentid never published.
        stranger = ed25519.Ed25519PrivateKey.generate()
        made_up = jwt.encode(
            claims_of(good), stranger, algorithm="EdDSA", headers={"typ": "agent+jwt", "kid": "x"}
        )
        assert await rejected(verifier.verify(made_up)) == "SIGNATURE_INVALID"
        # ... and under agentid's own kid.
        posing = jwt.encode(
            claims_of(good), stranger, algorithm="EdDSA", headers={"typ": "agent+jwt", "kid": kid}
        )
        assert await rejected(verifier.verify(posing)) == "SIGNATURE_INVALID"
        # Not tokens at all, binary, oversized, another typ.
        for junk in ("", "abc", "a.b.c", "\x00\xff.\x01.\x02", "e" * 20_000 + ".e.e"):
            assert await rejected(verifier.verify(junk)) == "TOKEN_MALFORMED"
        assert await rejected(verifier.verify(forge(good, header={"typ": "JWT"}))) == (
            "TOKEN_MALFORMED"
        )
        # Another issuer's verifier refuses it.
        other = TokenVerifier("https://elsewhere.test", service, clock=harness.clock.now)
        assert await rejected(other.verify(good)) == "TOKEN_MALFORMED"  # as Check says
        # Expired (no leeway on exp), and not yet valid (beyond the nbf leeway).
        exp = claims_of(good)["exp"]
        later = TokenVerifier(ISSUER, service, clock=lambda: float(exp))
        assert await rejected(later.verify(good)) == "TOKEN_EXPIRED"
        nbf = claims_of(good)["nbf"]
        earlier = TokenVerifier(ISSUER, service, clock=lambda: nbf - 6.0)
        assert await rejected(earlier.verify(good)) == "TOKEN_NOT_YET_VALID"
        assert (await TokenVerifier(ISSUER, service, clock=lambda: nbf - 4.0).verify(good)).jti


async def test_the_audience_must_be_this_services(harness: Harness) -> None:
    for_api = await harness.delegate(audiences=["https://api.test"])
    async with AgentIdClient(target(harness), CHECK_KEY) as service:
        api = TokenVerifier(ISSUER, service, audience="https://api.test", clock=harness.clock.now)
        assert (await api.verify(for_api.token)).aud == ("https://api.test",)
        mail = TokenVerifier(ISSUER, service, audience="https://mail.test", clock=harness.clock.now)
        assert await rejected(mail.verify(for_api.token)) == "AUDIENCE_MISMATCH"
        anyone = TokenVerifier(ISSUER, service, clock=harness.clock.now)
        assert await rejected(anyone.verify(for_api.token)) == "AUDIENCE_MISMATCH"
        # A token without aud is for any service.
        assert (await mail.verify((await harness.delegate()).token)).aud is None


async def test_a_revoked_session_is_refused_through_the_watcher(harness: Harness) -> None:
    kept, revoked = await harness.delegate(), await harness.delegate()
    async with AgentIdClient(target(harness), CHECK_KEY) as service:
        watcher = RevocationWatcher(harness.channel, CHECK_KEY)
        verifier = TokenVerifier(ISSUER, service, watcher=watcher, clock=harness.clock.now)
        with pytest.raises(WatcherNotReady):  # no snapshot yet: not "good"
            await verifier.verify(kept.token)
        watcher.start()
        try:
            await asyncio.wait_for(watcher.wait_for(0), 10)
            assert (await verifier.verify(revoked.token)).jti == revoked.session_id
            done = await harness.stub.Revoke(
                pb.RevokeRequest(session_id=revoked.session_id), metadata=bearer(ADMIN_KEY)
            )
            await asyncio.wait_for(watcher.wait_for(done.revocation_sequence), 10)
            assert await rejected(verifier.verify(revoked.token)) == "SESSION_REVOKED"
            assert (await verifier.verify(kept.token)).jti == kept.session_id
        finally:
            await watcher.stop()


def rotate_often(config: dict[str, Any]) -> None:
    """A key every 10 minutes, published a minute ahead; housekeeping every 20 ms."""
    config["tokens"]["rotation_period"] = "10m"
    config["tokens"]["publish_ahead"] = "1m"
    config["revocation"] = {"prune_interval": "20ms"}


async def test_a_key_published_later_is_fetched_when_a_token_names_it(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=rotate_often) as h:
        fetches = 0
        async with AgentIdClient(target(h), CHECK_KEY) as service:

            async def counted() -> jwt.PyJWKSet:
                nonlocal fetches
                fetches += 1
                return await service.jwk_set()

            verifier = TokenVerifier(ISSUER, counted, refetch_cooldown=0.0, clock=clock.now)
            before = await h.delegate()
            await verifier.verify(before.token)
            assert fetches == 1
            await verifier.verify(before.token)
            assert fetches == 1  # cached
            clock.advance(541)  # a minute before the period ends: the next key is published
            await until_published(service, 2)
            clock.advance(60)  # its time has come
            after = await until_signed_by_another_key(h, before.token)
            assert (await verifier.verify(after.token)).jti == after.session_id
            assert fetches == 2

            # With a cooldown, a made-up kid does not become a fetch per token.
            patient = TokenVerifier(ISSUER, counted, refetch_cooldown=3600.0, clock=clock.now)
            await patient.verify(after.token)
            fetches = 0
            for n in range(20):
                made_up = forge(after.token, header={"kid": f"nobody-{n}"})
                assert await rejected(patient.verify(made_up)) == "SIGNATURE_INVALID"
            assert fetches == 0


async def until_published(service: AgentIdClient, keys: int) -> None:
    for _ in range(250):
        if len((await service.jwk_set()).keys) == keys:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the JWKS never held {keys} keys")


async def until_signed_by_another_key(h: Harness, token: str) -> pb.DelegateResponse:
    kid = jwt.get_unverified_header(token)["kid"]
    for _ in range(250):
        issued = await h.delegate()
        if jwt.get_unverified_header(issued.token)["kid"] != kid:
            return issued
        await asyncio.sleep(0.02)
    raise AssertionError("the signing key never rotated")


async def test_a_failed_key_fetch_is_raised_not_taken_for_a_bad_token(harness: Harness) -> None:
    token = (await harness.delegate()).token
    nowhere = TokenVerifier(ISSUER, "http://127.0.0.1:9/jwks.json", clock=harness.clock.now)
    with pytest.raises(ConnectionError):
        await nowhere.verify(token)
    async with AgentIdClient("127.0.0.1:9", CHECK_KEY) as unreachable:
        with pytest.raises(AgentIdError) as caught:
            await TokenVerifier(ISSUER, unreachable).verify(token)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_rfc7638_thumbprint_of_its_own_example() -> None:
    # RFC 7638 §3.1's RSA key and its thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Qvz"
        "qY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZ"
        "u0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    assert jwk_thumbprint(
        {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    ) == ("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    assert jwk_thumbprint({**jwk, "kid": "ignored"}) == jwk_thumbprint(jwk)
    for bad in ({"kty": "oct", "k": "AA"}, {"kty": "EC", "crv": "P-256", "x": "AA"}):
        with pytest.raises(ValueError, match=r"unsupported key type|the JWK lacks 'y'"):
            jwk_thumbprint(bad)


def test_parse_jwks_takes_public_sets_only() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    private = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key))
    assert parse_jwks({"keys": [{**public, "kid": "k1"}]}).keys[0].key_id == "k1"
    bad: list[Any] = [
        "[]",
        "{}",
        {"keys": []},
        {"keys": [{**private, "kid": "k1"}]},
        {"keys": [{**public, "kid": f"k{n}"} for n in range(65)]},
        {"keys": [{"kty": "nonsense"}]},
    ]
    for document in bad:
        with pytest.raises(ValueError, match="JWK Set"):
            parse_jwks(document)


async def test_tokens_typed_at_jwt_verify_too(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A server issuing RFC 9068's at+jwt (tokens.typ) for generic validators: the client's
    verifier takes its tokens as Check does."""

    def at_jwt(config: dict[str, Any]) -> None:
        config["tokens"]["typ"] = "at+jwt"

    async with running_harness(tmp_path, idp, clock, mutate=at_jwt) as h:
        issued = await h.delegate()
        assert jwt.get_unverified_header(issued.token)["typ"] == "at+jwt"
        async with AgentIdClient(target(h), CHECK_KEY) as service:
            verifier = TokenVerifier(ISSUER, service, clock=clock.now)
            assert (await verifier.verify(issued.token)).jti == issued.session_id


async def test_a_failed_refetch_keeps_the_keys_held_and_waits_for_the_cooldown(
    harness: Harness,
) -> None:
    token = (await harness.delegate()).token
    attempts, failing = 0, False
    async with AgentIdClient(target(harness), CHECK_KEY) as service:

        async def flaky() -> jwt.PyJWKSet:
            nonlocal attempts
            attempts += 1
            if failing:
                raise ConnectionError("agentid is away")
            return await service.jwk_set()

        eager = TokenVerifier(ISSUER, flaky, max_key_age=0.0, refetch_cooldown=0.0)
        patient = TokenVerifier(ISSUER, flaky, max_key_age=0.0, refetch_cooldown=3600.0)
        await eager.verify(token)
        await patient.verify(token)
        assert attempts == 2
        failing = True
        with pytest.raises(ConnectionError):  # stale, the refetch fails: said, not a verdict
            await eager.verify(token)
        assert (await patient.verify(token)).jti  # stale, but tried within the cooldown
        assert attempts == 3
        failing = False
        assert (await eager.verify(token)).jti

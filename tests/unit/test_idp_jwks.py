"""The IdP JWKS cache: an unreachable source is logged without anything secret in its URL; and
the verified-token cache: an expired token or one whose key left the JWKS is refused again."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import socket
import time
from pathlib import Path

import pytest
from agentid_server.domain.errors import Unauthenticated
from agentid_server.tokens.idp import IdpVerifier, JwksCache

from tests.conftest import IdpFixture, make_settings


async def test_a_failed_fetch_logs_no_credentials_or_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = JwksCache("", f"http://user:hunter2@127.0.0.1:{port}/jwks?api_key=s3cret#frag", 30.0)
    with caplog.at_level(logging.WARNING):
        await cache.refresh()
        assert await cache.key("any") is None
    logged = caplog.text
    assert f"http://127.0.0.1:{port}/jwks" in logged
    for secret in ("hunter2", "s3cret", "user:", "frag"):
        assert secret not in logged


# -- verified tokens remembered ---------------------------------------------------------------


def _verifier(
    tmp_path: Path,
    idp: IdpFixture,
    *,
    cache_size: int = 16,
    cache_bytes: int = 1 << 20,
    **idp_settings: float,
) -> IdpVerifier:
    """A verifier of the test IdP without leeway (``idp_settings``: more of [[idp]]'s)."""
    settings = make_settings(tmp_path, idp)
    idps = [dataclasses.replace(s, leeway=0.0, **idp_settings) for s in settings.idps]
    return IdpVerifier(
        idps, settings.server.max_token_bytes, cache_size=cache_size, cache_bytes=cache_bytes
    )


async def test_a_remembered_token_is_refused_once_it_expires(
    tmp_path: Path, idp: IdpFixture
) -> None:
    verifier = _verifier(tmp_path, idp)
    await verifier.load()
    expires = int(time.time()) + 2
    token = idp.token(exp=expires)
    for _ in range(2):  # the second answer comes from the cache
        assert (await verifier.verify(token)).user_id == "alice"
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token)
    assert refused.value.reason == "TOKEN_EXPIRED"


async def test_a_remembered_token_is_refused_once_its_key_leaves_the_jwks(
    tmp_path: Path, idp: IdpFixture
) -> None:
    verifier = _verifier(tmp_path, idp)
    await verifier.load()
    token = idp.token(alg="ES256")
    assert (await verifier.verify(token)).user_id == "alice"
    document = idp.public_jwks()
    document["keys"] = [k for k in document["keys"] if k["kid"] != "ec-1"]
    idp.jwks_path.write_text(json.dumps(document))
    await verifier.load()  # the IdP rotated ec-1 out
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token)
    assert refused.value.reason == "UNKNOWN_KEY"
    idp.write_jwks()
    await verifier.load()  # back, as new key objects: the token verifies again
    assert (await verifier.verify(token)).user_id == "alice"


async def test_remembered_tokens_are_bounded_and_the_least_recently_used_goes_first(
    tmp_path: Path, idp: IdpFixture
) -> None:
    verifier = _verifier(tmp_path, idp, cache_size=2)
    await verifier.load()
    a, b, c = (idp.token(sub=sub) for sub in ("a", "b", "c"))
    for token in (a, b, a, c):
        await verifier.verify(token)
    assert set(verifier._verified) == {a, c}


async def test_remembered_tokens_are_bounded_in_bytes_too(tmp_path: Path, idp: IdpFixture) -> None:
    """Count alone let callers pick the memory: large tokens (many scopes) fill a byte budget
    (an over-estimate of their memory, cached_bytes) long before the count, oldest out first."""
    from agentid_server.tokens.agent_tokens import cached_bytes

    scope = " ".join(f"tickets.s{n}" for n in range(60))
    tokens = [idp.token(sub=f"u{n}", scope=scope) for n in range(8)]
    budget = 3 * cached_bytes(tokens[0], 60) + 100
    verifier = _verifier(tmp_path, idp, cache_size=100, cache_bytes=budget)
    await verifier.load()
    for token in tokens:
        await verifier.verify(token)
    assert list(verifier._verified) == tokens[-3:]
    await verifier.verify(tokens[-3])  # used again: the most recent, and nothing counted twice
    assert list(verifier._verified) == [tokens[-2], tokens[-1], tokens[-3]]
    assert verifier._bytes == sum(cached_bytes(t, 60) for t in tokens[-3:])


async def test_a_tampered_copy_of_a_remembered_token_is_still_refused(
    tmp_path: Path, idp: IdpFixture
) -> None:
    verifier = _verifier(tmp_path, idp)
    await verifier.load()
    token = idp.token(sub="alice")
    await verifier.verify(token)
    header, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["sub"] = "mallory"
    forged_part = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(f"{header}.{forged_part}.{signature}")
    assert refused.value.reason == "SIGNATURE_INVALID"


async def test_keys_are_read_again_once_old_so_a_removed_key_stops_working(
    tmp_path: Path, idp: IdpFixture
) -> None:
    cache = JwksCache(str(idp.jwks_path), "", min_refresh=0.01, max_age=0.3)
    await cache.refresh()
    assert await cache.key("rsa-1") is not None
    document = idp.public_jwks()
    document["keys"] = [k for k in document["keys"] if k["kid"] != "rsa-1"]
    idp.jwks_path.write_text(json.dumps(document))
    assert await cache.key("rsa-1") is not None  # a known kid: not read again before max_age
    await asyncio.sleep(0.35)
    assert await cache.key("rsa-1") is None


async def test_an_unreachable_jwks_keeps_the_last_keys_and_is_tried_once_per_min_refresh(
    tmp_path: Path, idp: IdpFixture, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(idp.jwks_path.read_text())
    cache = JwksCache(str(path), "", min_refresh=0.2, max_age=0.05)
    await cache.refresh()
    path.unlink()  # the IdP is unreachable from now on
    await asyncio.sleep(0.25)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # old keys and unknown kids: one attempt between them
            assert await cache.key("rsa-1") is not None
            assert await cache.key("rotated-in") is None
        assert caplog.text.count("could not load IdP JWKS") == 1
        await asyncio.sleep(0.25)
        assert await cache.key("rsa-1") is not None
        assert caplog.text.count("could not load IdP JWKS") == 2


async def test_a_remembered_token_is_refused_once_the_jwks_has_aged_without_its_key(
    tmp_path: Path, idp: IdpFixture
) -> None:
    """Only the remembered token is used: no other call makes the JWKS be read, yet once
    jwks_max_age is up the key's removal is seen."""
    verifier = _verifier(tmp_path, idp, jwks_min_refresh=0.01, jwks_max_age=0.2)
    await verifier.load()
    token = idp.token()
    assert (await verifier.verify(token)).user_id == "alice"
    document = idp.public_jwks()
    document["keys"] = [k for k in document["keys"] if k["kid"] != "rsa-1"]
    idp.jwks_path.write_text(json.dumps(document))
    await asyncio.sleep(0.25)
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token)
    assert refused.value.reason == "UNKNOWN_KEY"

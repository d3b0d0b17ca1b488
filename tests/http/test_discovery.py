"""Discovery (RFC 8414) and the JWKS over HTTP: contents, cache headers, what Vault's OIDC
discovery needs (docs/integrations.md), and JWKS consumers that know nothing of agentid (PyJWT's
PyJWKClient, Node's jose) verifying agent tokens from the URL alone, across a signing key
rotation."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from tests.conftest import ISSUER, FakeClock, Harness, IdpFixture, free_port, running_harness
from tests.integration.test_key_rotation import kid_of, rotate_often

REPO = Path(__file__).resolve().parents[2]


async def get(h: Harness, path: str) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.get(h.http_url + path) as response:
        return response.status, await response.json(), response.headers


def max_age(headers: Any) -> int:
    match = re.fullmatch(r"public, max-age=(\d+)", headers["Cache-Control"])
    assert match, headers["Cache-Control"]
    return int(match.group(1))


async def test_both_discovery_documents_are_the_same_rfc8414_metadata(harness: Harness) -> None:
    status, document, headers = await get(harness, "/.well-known/oauth-authorization-server")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert 0 < max_age(headers) <= 1800  # half of tokens.publish_ahead (1h)
    assert (await get(harness, "/.well-known/openid-configuration"))[1] == document
    assert document["issuer"] == ISSUER
    assert document["jwks_uri"] == ISSUER + "/.well-known/jwks.json"
    assert document["token_endpoint"] == ISSUER + "/oauth2/token"
    assert document["introspection_endpoint"] == ISSUER + "/oauth2/introspect"
    assert document["revocation_endpoint"] == ISSUER + "/oauth2/revoke"
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in document["grant_types_supported"]
    assert set(document["token_endpoint_auth_methods_supported"]) == {"private_key_jwt", "none"}
    for key in (
        "token_endpoint_auth_signing_alg_values_supported",
        "introspection_endpoint_auth_methods_supported",
        "revocation_endpoint_auth_methods_supported",
        "dpop_signing_alg_values_supported",
    ):
        assert document[key], key
    assert "none" not in document["token_endpoint_auth_signing_alg_values_supported"]


async def test_urls_are_built_from_public_url(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def behind_a_proxy(config: dict[str, Any]) -> None:
        config["http"]["public_url"] = "https://auth.example.com/agentid/"

    async with running_harness(tmp_path, idp, clock, mutate=behind_a_proxy) as h:
        document = (await get(h, "/.well-known/oauth-authorization-server"))[1]
        assert document["issuer"] == ISSUER  # the tokens' iss, always
        assert document["token_endpoint"] == "https://auth.example.com/agentid/oauth2/token"


async def test_the_jwks_is_getjwks_and_cacheable_for_half_of_publish_ahead(
    harness: Harness,
) -> None:
    status, jwks, headers = await get(harness, "/.well-known/jwks.json")
    assert status == 200
    assert jwks == json.loads((await harness.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    assert max_age(headers) <= 1800
    assert all("d" not in key for key in jwks["keys"])


async def rotated_tokens(
    h: Harness, clock: FakeClock, published: Callable[[str], Awaitable[None]] | None = None
) -> list[str]:
    """A token of the first key, then (the next key published, its time come) one of the
    next: both verify during the overlap. ``published`` is given the old token once the next
    key is in the JWKS, before it signs."""
    old = (await h.delegate()).token
    clock.advance(541)  # a minute before the 10-minute period ends: the next key is published
    for _ in range(200):
        if len(json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)["keys"]) == 2:
            break
        await asyncio.sleep(0.02)
    if published is not None:
        await published(old)
    clock.advance(60)
    new = (await h.delegate()).token
    assert kid_of(new) != kid_of(old)
    return [old, new]


def with_rotation(config: dict[str, Any]) -> None:
    rotate_often(config)
    config["http"] = {"listen": "127.0.0.1:0"}


async def test_pyjwkclient_verifies_agent_tokens_across_a_rotation(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=with_rotation) as h:
        _, _, headers = await get(h, "/.well-known/jwks.json")
        assert max_age(headers) <= 30  # publish_ahead 1m
        client = jwt.PyJWKClient(h.http_url + "/.well-known/jwks.json")
        fetched = 0

        async def fetch_and_verify(old: str) -> None:
            nonlocal fetched
            await verify_with(client, old)  # fetched and cached now: the next key is in it
            fetched = id(client.jwk_set_cache.get() if client.jwk_set_cache else None)

        old, new = await rotated_tokens(h, clock, fetch_and_verify)
        for token in (old, new):  # the new key signs now: the cached set already holds it
            claims = await verify_with(client, token, clock.now())
            assert claims["act"]["sub"] == "support-bot"
        assert client.jwk_set_cache is not None
        assert id(client.jwk_set_cache.get()) == fetched  # not fetched again


async def verify_with(
    client: jwt.PyJWKClient, token: str, now: float | None = None
) -> dict[str, Any]:
    """PyJWKClient reads the URL synchronously: off the event loop the server runs in. The
    signature with the fetched key; the times against ``now`` (the server's injected clock)."""

    def verify() -> dict[str, Any]:
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token, key.key, algorithms=["EdDSA", "ES256"], issuer=ISSUER,
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False,
                     "verify_iat": False},
        )  # fmt: skip
        if now is not None:
            assert claims["nbf"] <= now < claims["exp"]
        return dict(claims)

    return await asyncio.to_thread(verify)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_node_jose_verifies_agent_tokens_across_a_rotation(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    if not (REPO / "node_modules" / "jose").is_dir():
        pytest.fail("jose is not installed: run npm ci")
    async with running_harness(tmp_path, idp, clock, mutate=with_rotation) as h:
        tokens = await rotated_tokens(h, clock)
        env = {
            **os.environ,
            "AGENTID_JWKS_URL": h.http_url + "/.well-known/jwks.json",
            "AGENTID_ISSUER": ISSUER,
            "AGENTID_TOKENS": " ".join(tokens),
            "AGENTID_NOW": str(int(clock.now())),  # the server's injected clock
        }
        process = await asyncio.create_subprocess_exec(
            "node", "--test", "tests/node/jwks.test.mjs", cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, out.decode()
        assert "# pass 2" in out.decode(), out.decode()


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
async def test_discovery_is_what_vaults_oidc_discovery_url_needs(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, algorithm: str
) -> None:
    """docs/integrations.md: Vault's JWT auth with `oidc_discovery_url = <public_url>` fetches
    `<public_url>/.well-known/openid-configuration`, refuses it unless `issuer` is that URL
    exactly, verifies with the keys at `jwks_uri` as given, and `bound_issuer` must be the
    tokens' `iss`. Served where the issuer says (a free port) so no URL is rewritten here."""
    public_url = f"http://127.0.0.1:{free_port()}"

    def served_at_the_issuer(config: dict[str, Any]) -> None:
        config["http"]["listen"] = public_url.removeprefix("http://")
        config["tokens"]["issuer"] = public_url
        config["tokens"]["algorithm"] = algorithm

    async with running_harness(tmp_path, idp, clock, mutate=served_at_the_issuer) as h:
        assert h.http_url == public_url
        async with aiohttp.ClientSession() as session:
            discovery = public_url + "/.well-known/openid-configuration"
            async with session.get(discovery) as response:
                document = await response.json()
            assert document["issuer"] == public_url  # cap's NewOIDCDiscoveryKeySet: exactly
            assert document["jwks_uri"] == public_url + "/.well-known/jwks.json"
            # go-oidc's Provider.Verifier accepts these algorithms (RS256 alone without them)
            assert document["id_token_signing_alg_values_supported"] == [algorithm]
            async with session.get(document["jwks_uri"]) as response:
                jwks = await response.json()

        token = (await h.delegate(audiences=["vault"])).token
        verified = jose_jwt.decode(
            token,
            KeySet.import_key_set(jwks),
            algorithms=document["id_token_signing_alg_values_supported"],
        )
        assert verified.header["alg"] == algorithm
        assert verified.claims["iss"] == document["issuer"]  # Vault's bound_issuer
        assert verified.claims["aud"] == ["vault"]

"""`[[idp]] discovery`: the JWKS URL from the issuer's discovery document, served here by a
real HTTP server on a loopback port. The document must name the configured issuer exactly:
otherwise the start stops (a mistake no retry mends), and later the last keys stay in use."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agentid_server.app import build_server
from agentid_server.config import ConfigError
from agentid_server.domain.errors import Unauthenticated
from agentid_server.tokens.idp import MAX_DISCOVERY_BYTES, IdpVerifier, JwksCache
from aiohttp import web

from tests.conftest import IDP_AUDIENCE, FakeClock, IdpFixture, make_settings, with_config


class Issuer:
    """An IdP's discovery document and JWKS on 127.0.0.1, changeable by the test."""

    def __init__(self, idp: IdpFixture) -> None:
        self.idp = idp
        self.url = ""
        self.document: Any = None  # None: the right one for self.url
        self.jwks: Any = idp.public_jwks()
        self.reads: list[str] = []
        self.status = 200

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.reads.append(request.path)
        if self.status != 200:
            return web.Response(status=self.status)
        if request.path.endswith("/.well-known/openid-configuration"):
            base = str(request.url.origin()) + request.path.removesuffix(
                "/.well-known/openid-configuration"
            )
            document = self.document or {"issuer": base, "jwks_uri": self.url + "/jwks"}
            return web.json_response(document)
        if request.path == "/jwks":
            return web.json_response(self.jwks)
        if request.path == "/elsewhere":
            raise web.HTTPFound("http://idp.example.invalid/jwks")
        return web.Response(status=404)


@pytest.fixture
async def issuer(idp: IdpFixture) -> AsyncIterator[Issuer]:
    served = Issuer(idp)
    app = web.Application()
    app.router.add_get("/{tail:.*}", served.serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    served.url = f"http://127.0.0.1:{port}"
    try:
        yield served
    finally:
        await runner.cleanup()


def verifier(
    tmp_path: Path, idp: IdpFixture, ticks: list[float] | None = None, **table: Any
) -> tuple[IdpVerifier, str]:
    """A verifier of one [[idp]] (``table``), its fetches paced by ``ticks[0]`` if given."""
    settings = make_settings(tmp_path, idp, with_config(idp=[{"audience": IDP_AUDIENCE, **table}]))
    clock = (lambda: ticks[0]) if ticks is not None else time.monotonic
    return IdpVerifier(settings.idps, 8192, monotonic=clock), settings.source


async def test_discovery_finds_the_jwks_and_the_keys_verify(
    tmp_path: Path, idp: IdpFixture, issuer: Issuer
) -> None:
    users, source = verifier(tmp_path, idp, issuer=issuer.url)  # an issuer alone: discovery
    await users.load(source)
    assert issuer.reads == ["/.well-known/openid-configuration", "/jwks"]
    user = await users.verify(idp.token(iss=issuer.url))
    assert (user.user_id, user.issuer) == ("alice", issuer.url)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"issuer": "{url}/", "jwks_uri": "{url}/jwks"}, "names the issuer"),  # one slash more
        ({"issuer": "https://idp.evil.example", "jwks_uri": "{url}/jwks"}, "names the issuer"),
        ({"jwks_uri": "{url}/jwks"}, "names the issuer none"),
        ({"issuer": "{url}"}, "jwks_uri is missing"),
        ({"issuer": "{url}", "jwks_uri": "http://idp.example/jwks"}, "not https"),
        (["not", "an", "object"], "not a JSON object"),
    ],
)
async def test_a_document_that_does_not_fit_stops_the_start(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    issuer: Issuer,
    document: Any,
    problem: str,
) -> None:
    text = json.dumps(document).replace("{url}", issuer.url)
    issuer.document = json.loads(text)
    settings = make_settings(
        tmp_path,
        idp,
        with_config(idp=[{"issuer": issuer.url, "audience": IDP_AUDIENCE, "discovery": True}]),
    )
    with pytest.raises(ConfigError) as caught:
        await build_server(settings, clock=clock)
    assert caught.value.key == "idp[0].issuer"
    assert problem in caught.value.problem


async def test_an_unreachable_idp_does_not_stop_the_start_and_is_read_again(
    tmp_path: Path, idp: IdpFixture, issuer: Issuer
) -> None:
    issuer.status = 503
    users, source = verifier(tmp_path, idp, issuer=issuer.url, jwks_min_refresh="1ms")
    await users.load(source)  # logged, not raised: its users are refused meanwhile
    with pytest.raises(Unauthenticated) as caught:
        await users.verify(idp.token(iss=issuer.url))
    assert caught.value.reason == "UNKNOWN_KEY"
    issuer.status = 200
    assert (await users.verify(idp.token(iss=issuer.url))).user_id == "alice"


async def test_later_a_document_naming_another_issuer_keeps_the_last_keys(
    tmp_path: Path, idp: IdpFixture, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    ticks = [0.0]
    users, source = verifier(tmp_path, idp, ticks, issuer=issuer.url)
    await users.load(source)
    issuer.document = {"issuer": "https://idp.evil.example", "jwks_uri": issuer.url + "/jwks"}
    issuer.jwks = {"keys": []}  # were it read, every key would be gone
    ticks[0] = 601.0  # jwks_max_age later: read again
    with caplog.at_level(logging.WARNING):
        user = await users.verify(idp.token(iss=issuer.url))
    assert user.user_id == "alice"
    assert "refused the discovery document" in caplog.text
    assert "https://idp.evil.example" in caplog.text
    assert issuer.reads[-1] == "/.well-known/openid-configuration"  # the JWKS not read after it


async def test_the_document_and_the_jwks_are_read_again_when_old(
    tmp_path: Path, idp: IdpFixture, issuer: Issuer
) -> None:
    """The jwks_uri is followed where the document moves it (a key rotation by a new URL)."""
    ticks = [0.0]
    users, source = verifier(tmp_path, idp, ticks, issuer=issuer.url)
    await users.load(source)
    issuer.document = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks?v=2"}
    ticks[0] = 601.0  # jwks_max_age (10m) later
    await users.verify(idp.token(iss=issuer.url))
    assert issuer.reads[-2:] == ["/.well-known/openid-configuration", "/jwks"]
    assert len(issuer.reads) == 4


async def test_an_oversized_document_is_refused(
    tmp_path: Path, idp: IdpFixture, issuer: Issuer
) -> None:
    issuer.document = {
        "issuer": issuer.url,
        "jwks_uri": issuer.url + "/jwks",
        "padding": "x" * MAX_DISCOVERY_BYTES,
    }
    users, source = verifier(tmp_path, idp, issuer=issuer.url)
    await users.load(source)  # not a refusal of what it says: read again later
    assert issuer.reads == ["/.well-known/openid-configuration"]
    with pytest.raises(Unauthenticated):
        await users.verify(idp.token(iss=issuer.url))


async def test_a_redirect_to_plain_http_elsewhere_is_not_followed(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = JwksCache("", issuer.url + "/elsewhere", 30.0)
    with caplog.at_level(logging.WARNING):
        await cache.refresh()
    assert await cache.key("rsa-1") is None
    assert "HTTPError" in caplog.text


async def test_entra_tenants_each_read_their_own_document(
    tmp_path: Path, idp: IdpFixture, issuer: Issuer
) -> None:
    tenants = ["72f988bf-86f1-41af-91ab-2d7cd011db47", "9188040d-6c67-4c5b-b112-36a304b66dad"]
    users, source = verifier(
        tmp_path,
        idp,
        kind="entra",
        issuer=issuer.url + "/{tenantid}/v2.0",
        tenants=tenants,
        user_claim="sub",
    )
    await users.load(source)
    assert sorted(issuer.reads) == sorted(
        [f"/{t}/v2.0/.well-known/openid-configuration" for t in tenants] + ["/jwks", "/jwks"]
    )
    for tenant in tenants:
        iss = f"{issuer.url}/{tenant}/v2.0"
        user = await users.verify(idp.token(iss=iss, tid=tenant))
        assert user.issuer == iss

"""`[[idp]] discovery = true` against a real OpenID Provider: the dev IdP (devidp/server.mjs,
panva's oidc-provider, as test_console.py starts it). agentid reads the provider's discovery
document and its JWKS (no JWKS file configured); `agentid login` gets an access token from the
provider's token endpoint (a code flow with PKCE, signed in on its login page); that token
delegates over gRPC. A configured issuer that differs from the provider's by a slash stops the
start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agentid_server.app import build_server
from agentid_server.config import ConfigError

from tests.conftest import (
    IDP_AUDIENCE,
    FakeClock,
    Harness,
    IdpFixture,
    make_settings,
    running_harness,
    with_config,
)
from tests.http import test_cli_login, test_console
from tests.http.helpers import claims_of
from tests.http.test_cli_login import Cli, catch_up, login
from tests.http.test_console import Provider

provider = test_console.provider
pytestmark = test_console.pytestmark


def discovered(provider: Provider, **table: Any) -> dict[str, Any]:
    return {"issuer": provider.issuer, "audience": IDP_AUDIENCE, "discovery": True, **table}


@pytest.fixture
async def h(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, provider: Provider
) -> AsyncIterator[Harness]:
    # No JWKS file: the test IdP's file (same key) must not be what makes tokens verify.
    idp.jwks_path.write_text('{"keys": []}')
    mutate = with_config(idp=[discovered(provider)])
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        yield harness


async def test_a_token_the_provider_issued_delegates_with_discovered_keys(
    h: Harness, provider: Provider, tmp_path: Path
) -> None:
    cli = Cli(tmp_path, h)
    code, out, err = await login(cli, provider)
    assert code == 0, err
    assert f"signed in as alice at {provider.issuer}" in out
    token = cli.stored()["access_token"]
    claims = claims_of(token)
    assert (claims["iss"], claims["aud"], claims["sub"]) == (provider.issuer, IDP_AUDIENCE, "alice")
    catch_up(h.clock)
    granted = await h.delegate(token, scopes=["payments.transfer", "tickets.read"])
    assert granted.user_id == "alice"
    assert list(granted.scopes) == ["payments.transfer", "tickets.read"]


async def test_an_issuer_differing_from_the_providers_stops_the_start(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, provider: Provider
) -> None:
    # The same discovery URL (a trailing slash is dropped to build it); the issuer it names
    # is not the configured one.
    settings = make_settings(
        tmp_path, idp, with_config(idp=[discovered(provider, issuer=provider.issuer + "/")])
    )
    with pytest.raises(ConfigError) as caught:
        await build_server(settings, clock=clock)
    assert caught.value.key == "idp[0].issuer"
    assert f"names the issuer '{provider.issuer}'" in caught.value.problem


assert test_cli_login  # the helpers above are its: `agentid login` as the user runs it

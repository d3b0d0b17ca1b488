"""`agentid login` and the step-up approval's own fresh login, against the real dev OpenID
Provider (devidp/server.mjs in node, as in test_console.py). The command runs as a subprocess
with --no-browser and its config folder in tmp_path; the test is the browser: it reads the
printed URL, signs in on the provider's login page and follows the redirect to the command's
loopback listener."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.devidp import CLI_CLIENT, CONSOLE_CLIENT
from agentid_server.tokens.idp import JwksCache
from agentid_server.tokens.oidc import LoginFailed, validate_id_token

from tests.conftest import (
    IDP_AUDIENCE,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    running_harness,
    struct,
    with_config,
)
from tests.http import test_console
from tests.http.helpers import claims_of
from tests.http.test_console import Provider, browser, walk

# The real provider (a fixture), and the skip without node and oidc-provider, as the console's.
provider = test_console.provider
pytestmark = test_console.pytestmark


@pytest.fixture
async def h(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    provider: Provider,
) -> AsyncIterator[Harness]:
    def configure(config: dict[str, Any]) -> None:
        with_config(
            idp=[
                {
                    "issuer": provider.issuer,
                    "audience": IDP_AUDIENCE,
                    "jwks_file": str(idp.jwks_path),
                }
            ],
            risk=[
                {
                    "name": "large-transfer",
                    "action": "payments.transfer",
                    "when": "context.amount > 1000",
                }
            ],
            step_up={
                "pending_ttl": "10m",
                "approval_ttl": "5m",
                "max_auth_age": "5m",
                "accepted_acr": ["urn:mfa"],
            },
        )(config)

    async with running_harness(tmp_path, idp, clock, mutate=configure) as harness:
        yield harness


class Cli:
    """`agentid <args>` as the user runs it: no $AGENTID_*, its own config folder and cwd."""

    def __init__(self, tmp_path: Path, h: Harness) -> None:
        self.config = tmp_path / "config"
        self.cwd = tmp_path
        self.target = f"127.0.0.1:{h.running.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
        return {**env, "XDG_CONFIG_HOME": str(self.config)}

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentid_server", *args, env=self.env(), cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    @property
    def login_file(self) -> Path:
        return self.config / "agentid" / "login.json"

    def stored(self) -> dict[str, Any]:
        return dict(json.loads(self.login_file.read_text()))


async def sign_in_url(process: asyncio.subprocess.Process) -> tuple[str, bytes]:
    """The URL the command prints (on stderr), and what it printed up to it."""
    assert process.stderr is not None
    seen = b""
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, f"the command ended before printing a URL: {seen.decode()}"
        seen += line
        found = re.search(rb"sign in at your IdP: (\S+)", line)
        if found:
            return found.group(1).decode(), seen


async def finish(process: asyncio.subprocess.Process, seen: bytes) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), (seen + err).decode()


def redirect_uri(url: str) -> str:
    [uri] = parse_qs(urlsplit(url).query)["redirect_uri"]
    return uri


async def sign_in_at_provider(
    session: aiohttp.ClientSession, url: str, user: str, password: str, code: str | None = None
) -> str:
    """Signs in on the provider's page; the redirect to the command's listener (not followed)."""
    loopback = redirect_uri(url)
    status, page, url = await walk(session, url, loopback)
    assert status == 200, page
    action = re.search(r'action="([^"]+)"', page)
    assert action is not None
    form = {"login": user, "password": password, **({"code": code} if code else {})}
    async with session.post(
        urljoin(url, action.group(1)), data=form, allow_redirects=False
    ) as response:
        assert response.status in (302, 303), await response.text()
        url = urljoin(url, response.headers["Location"])
    status, page, url = await walk(session, url, loopback)
    assert status == 0, page
    return url


async def login(cli: Cli, provider: Provider, user: str = "alice") -> tuple[int, str, str]:
    process = await cli.start("login", "--no-browser", "--issuer", provider.issuer)
    url, seen = await sign_in_url(process)
    async with browser() as session:
        callback = await sign_in_at_provider(session, url, user, provider.users[user]["password"])
        async with session.get(callback) as response:
            assert response.status == 200
            assert "Signed in" in await response.text()
    return await finish(process, seen)


def assert_no_tokens(stored: dict[str, Any], *outputs: str) -> None:
    for name in ("access_token", "id_token", "refresh_token"):
        secret = stored.get(name)
        if secret:
            for output in outputs:
                assert secret not in output
                assert secret[-24:] not in output  # nor a piece of its signature


def catch_up(clock: FakeClock) -> None:
    """The server's clock to the wall clock: the provider's tokens carry the real time."""
    clock.advance(max(0.0, time.time() - clock.now()))


async def test_login_keeps_the_token_privately_and_agentid_accepts_it(
    h: Harness,
    provider: Provider,
    tmp_path: Path,
) -> None:
    cli = Cli(tmp_path, h)
    code, out, err = await login(cli, provider)
    assert code == 0, err
    assert f"signed in as alice at {provider.issuer}" in out
    assert stat.S_IMODE(cli.login_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.login_file.parent.stat().st_mode) == 0o700
    assert [p.name for p in cli.login_file.parent.iterdir()] == ["login.json"]  # no temporary
    stored = cli.stored()
    assert (stored["issuer"], stored["client_id"], stored["subject"]) == (
        provider.issuer,
        CLI_CLIENT,
        "alice",
    )
    assert stored["acr"] in (None, "urn:pwd")  # the ID token names it only when asked
    assert claims_of(stored["access_token"])["acr"] == "urn:pwd"
    assert abs(stored["auth_time"] - time.time()) < 60
    assert stored["expires_at"] > time.time()
    assert stored["id_token"]
    assert_no_tokens(stored, out, err)
    # The other commands use it, with neither --token nor $AGENTID_TOKEN.
    catch_up(h.clock)
    process = await cli.start("step-ups", "--target", cli.target, "list")
    code, out, err = await finish(process, b"")
    assert code == 0, err
    assert out.startswith("ID ")
    assert_no_tokens(stored, out, err)
    assert (await h.delegate(stored["access_token"], scopes=["payments.transfer"])).token


async def test_a_forged_state_is_refused_and_nothing_is_kept(
    h: Harness,
    provider: Provider,
    tmp_path: Path,
) -> None:
    cli = Cli(tmp_path, h)
    process = await cli.start("login", "--no-browser", "--issuer", provider.issuer)
    url, seen = await sign_in_url(process)
    async with browser() as session:
        forged = f"{redirect_uri(url)}?code=stolen-or-made-up&state=forged"
        async with session.get(forged) as response:
            assert response.status == 400
            assert "Refused" in await response.text()
    code, _, err = await finish(process, seen)
    assert code == 1
    assert "state" in err
    assert not cli.login_file.exists()


async def test_an_idp_error_is_refused_and_nothing_is_kept(
    h: Harness, provider: Provider, tmp_path: Path
) -> None:
    cli = Cli(tmp_path, h)
    process = await cli.start("login", "--no-browser", "--issuer", provider.issuer)
    url, seen = await sign_in_url(process)
    [state] = parse_qs(urlsplit(url).query)["state"]
    async with browser() as session:
        denied = f"{redirect_uri(url)}?error=access_denied%1b%5b2J&state={state}"
        async with session.get(denied) as response:
            assert response.status == 400
    code, _, err = await finish(process, seen)
    assert code == 1
    assert "the IdP did not sign you in: access_denied?[2J" in err
    assert "\x1b" not in err
    assert not cli.login_file.exists()


async def test_a_replayed_redirect_finds_nobody_listening(
    h: Harness,
    provider: Provider,
    tmp_path: Path,
) -> None:
    """The listener lives for one login: the same redirect again (a replay, or another tab)
    reaches nothing, and the kept login is the first one."""
    cli = Cli(tmp_path, h)
    process = await cli.start("login", "--no-browser", "--issuer", provider.issuer)
    url, seen = await sign_in_url(process)
    alice = provider.users["alice"]
    async with browser() as session:
        callback = await sign_in_at_provider(session, url, "alice", alice["password"])
        async with session.get(callback) as response:
            assert response.status == 200
        assert (await finish(process, seen))[0] == 0
        kept = cli.stored()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(callback):
                pass
    assert cli.stored() == kept


async def test_step_up_approval_runs_the_fresh_login_itself(
    h: Harness,
    provider: Provider,
    tmp_path: Path,
) -> None:
    """The kept login is password only (acr urn:pwd); agentid asks for urn:mfa (RFC 9470's
    INSUFFICIENT_USER_AUTHENTICATION): the command signs the user in again, with the one-time
    code, and the approval goes through on the new token."""
    cli = Cli(tmp_path, h)
    assert (await login(cli, provider))[0] == 0
    first = cli.stored()
    catch_up(h.clock)
    session = await h.delegate(first["access_token"], scopes=["payments.transfer"])
    request = pb.StepUpRequest(
        action="payments.transfer", resource="account/42", context=struct({"amount": 5000})
    )
    step_up = (await h.stub.StepUp(request, metadata=bearer(session.token))).step_up
    process = await cli.start(
        "step-ups", "--target", cli.target, "approve", step_up.id, "--no-browser"
    )
    url, seen = await sign_in_url(process)
    asked = parse_qs(urlsplit(url).query)
    assert (asked["prompt"], asked["acr_values"], asked["max_age"]) == (
        ["login"],
        ["urn:mfa"],
        ["300"],
    )
    alice = provider.users["alice"]
    await asyncio.sleep(1.1)  # auth_time has a one-second grain
    async with browser() as browsing:
        callback = await sign_in_at_provider(
            browsing, url, "alice", alice["password"], alice["code"]
        )
        catch_up(h.clock)
        async with browsing.get(callback) as response:
            assert response.status == 200
    code, out, err = await finish(process, seen)
    assert code == 0, err
    assert out.strip() == f"{step_up.id} is now APPROVED"
    assert "fresh login" in err
    second = cli.stored()
    assert second["acr"] == "urn:mfa"
    assert second["auth_time"] > first["auth_time"]
    assert_no_tokens(first, out, err)
    assert_no_tokens(second, out, err)


async def test_a_fresh_login_agentid_still_finds_too_old_is_refused(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, provider: Provider
) -> None:
    """The command retries once: when agentid refuses the new login too (here its clock has
    moved on past max_auth_age meanwhile), the approval is refused, the step-up stays pending."""
    configure = with_config(
        idp=[{"issuer": provider.issuer, "audience": IDP_AUDIENCE, "jwks_file": str(idp.jwks_path)}],
        risk=[{"name": "large-transfer", "action": "payments.transfer", "when": "context.amount > 1000"}],
        step_up={"max_auth_age": "1m", "accepted_acr": ["urn:mfa"]},
    )  # fmt: skip
    async with running_harness(tmp_path, idp, clock, mutate=configure) as h:
        cli = Cli(tmp_path, h)
        assert (await login(cli, provider))[0] == 0
        catch_up(h.clock)
        session = await h.delegate(cli.stored()["access_token"], scopes=["payments.transfer"])
        request = pb.StepUpRequest(
            action="payments.transfer", resource="account/42", context=struct({"amount": 5000})
        )
        step_up = (await h.stub.StepUp(request, metadata=bearer(session.token))).step_up
        process = await cli.start(
            "step-ups", "--target", cli.target, "approve", step_up.id, "--no-browser"
        )
        url, seen = await sign_in_url(process)
        assert parse_qs(urlsplit(url).query)["max_age"] == ["60"]
        alice = provider.users["alice"]
        async with browser() as browsing:
            callback = await sign_in_at_provider(
                browsing, url, "alice", alice["password"], alice["code"]
            )
            h.clock.advance(120)  # the login is 2 minutes old when agentid sees it
            async with browsing.get(callback) as response:
                assert response.status == 200  # the IdP's answer was good; agentid's is not
        code, out, err = await finish(process, seen)
        assert code == 1
        assert "still finds the new login too old" in err
        assert out == ""
        watch = h.stub.WatchStepUps(
            pb.WatchStepUpsRequest(step_up_id=step_up.id, current_only=True),
            metadata=bearer(session.token),
        )
        assert [m.step_up.state async for m in watch] == [pb.STEP_UP_STATE_PENDING]


async def test_an_id_token_for_another_client_is_refused(
    provider: Provider,
    idp: IdpFixture,
) -> None:
    """The CLI's ID token must name the CLI's client: one the IdP issued to the console (or any
    other client) is refused, as is one with another nonce."""
    keys = JwksCache("", provider.issuer + "/jwks", 0.0)
    now = time.time()

    async def reason(**claims: Any) -> str | None:
        base = {
            "iss": provider.issuer,
            "aud": CLI_CLIENT,
            "sub": "alice",
            "nonce": "n-1",
            "scope": None,
        }
        token = idp.token(**{**base, **claims})
        try:
            await validate_id_token(
                token, keys=keys, algorithms=["RS256"], issuer=provider.issuer, client_id=CLI_CLIENT,
                nonce="n-1", access_token=None, now=now, leeway=5,
            )  # fmt: skip
        except LoginFailed as failure:
            return failure.reason
        return None

    assert await reason() is None
    assert await reason(aud=CONSOLE_CLIENT) == "AUDIENCE_MISMATCH"
    assert await reason(nonce="n-2") == "NONCE_MISMATCH"

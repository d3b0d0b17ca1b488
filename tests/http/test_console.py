"""The console's OpenID Connect sign-in against a real OpenID Provider: devidp/server.mjs
(panva's oidc-provider) in a node subprocess, its files in tmp_path, signing with the test
IdP's RSA key (so the ID tokens crafted below verify against the provider's own JWKS). The
browser is an aiohttp session following redirects by hand and submitting the login form."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import grpc
import pytest
from agentid_server.devidp import CONSOLE_CLIENT, LOGIN_SCOPES, new_users, write_devidp
from agentid_server.tokens.idp import JwksCache
from agentid_server.web.console import CONSOLE, fresh_login_path
from agentid_server.web.console_sessions import SESSION_TTL, ConsoleUser
from agentid_server.web.oidc_client import LoginFailed, validate_id_token
from cryptography.hazmat.primitives import serialization

from tests.conftest import (
    IDP_AUDIENCE,
    FakeClock,
    Harness,
    IdpFixture,
    free_port,
    running_harness,
    with_config,
)
from tests.http.helpers import claims_of

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (REPO / "node_modules/oidc-provider").exists(),
    reason="node and `npm ci` (oidc-provider) are needed for the dev OpenID Provider",
)


@dataclass
class Provider:
    issuer: str
    users: dict[str, dict[str, str]]
    console_port: int  # agentid's HTTP door: the redirect URI registered at the provider


@pytest.fixture
async def provider(tmp_path: Path, idp: IdpFixture) -> AsyncIterator[Provider]:
    port, console_port = free_port(), free_port()
    pem = tmp_path / "idp-private.pem"
    pem.write_bytes(
        idp.rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    issuer = f"http://127.0.0.1:{port}"
    users = new_users()
    files = write_devidp(
        tmp_path / "devidp",
        issuer=issuer,
        port=port,
        audience=IDP_AUDIENCE,
        pem_file=pem,
        kid="rsa-1",
        console_redirect_uris=[f"http://127.0.0.1:{console_port}/console/callback"],
        users=users,
        access_token_ttl=300,
    )
    process = await asyncio.create_subprocess_exec(
        "node", str(REPO / "devidp/server.mjs"), str(files.config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    seen = b""
    try:
        while b"devidp ready" not in seen:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, f"the dev IdP exited: {seen.decode()}"
            seen += line
        yield Provider(issuer, users, console_port)
    finally:
        process.terminate()
        await process.wait()


@pytest.fixture
async def h(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, provider: Provider
) -> AsyncIterator[Harness]:
    mutate = with_config(**console_sections(tmp_path, idp, provider))
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        yield harness


def console_sections(tmp_path: Path, idp: IdpFixture, provider: Provider) -> dict[str, Any]:
    """The config sections of a console signing in at ``provider``: the HTTP door on the port
    its console client redirects to, and the one `[[idp]]` with that client."""
    door = f"127.0.0.1:{provider.console_port}"
    return {
        "http": {"listen": door, "public_url": f"http://{door}"},
        "idp": [
            {
                "issuer": provider.issuer,
                "audience": IDP_AUDIENCE,
                "jwks_file": str(idp.jwks_path),
                "client_id": CONSOLE_CLIENT,
                "client_secret_file": str(tmp_path / "devidp" / "console-secret"),
                "login_scopes": list(LOGIN_SCOPES),
            }
        ],
    }


class LoginRefused(Exception):
    """The provider refused the credentials (and showed its login page again)."""


def browser() -> aiohttp.ClientSession:
    # unsafe: cookies for an IP address host (127.0.0.1), as a browser keeps them
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def walk(session: aiohttp.ClientSession, url: str, stop: str) -> tuple[int, str, str]:
    """Follows redirects until a page (its status, text, URL) or a URL beginning ``stop``
    (status 0, "", that URL)."""
    for _ in range(12):
        if url.startswith(stop):
            return 0, "", url
        async with session.get(url, allow_redirects=False) as response:
            if response.status in (302, 303):
                url = urljoin(url, response.headers["Location"])
                continue
            return response.status, await response.text(), url
    raise AssertionError("too many redirects")


async def to_callback(
    session: aiohttp.ClientSession,
    h: Harness,
    user: str,
    password: str,
    *,
    code: str | None = None,
    start: str = "/console/login",
) -> str:
    """Begins a sign-in at agentid, signs in at the provider's login page; the callback URL
    the provider sends the browser to (not yet followed)."""
    callback = h.http_url + "/console/callback"
    async with session.get(h.http_url + start, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
        url = response.headers["Location"]
    status, page, url = await walk(session, url, callback)
    assert status == 200, page
    assert "Sign in" in page
    form = {"login": user, "password": password, **({"code": code} if code else {})}
    action = re.search(r'action="([^"]+)"', page)
    assert action is not None
    async with session.post(
        urljoin(url, action.group(1)), data=form, allow_redirects=False
    ) as response:
        if response.status == 401:  # the provider's login page again, with the problem
            raise LoginRefused(await response.text())
        assert response.status in (302, 303), await response.text()
        url = urljoin(url, response.headers["Location"])
    status, page, url = await walk(session, url, callback)
    assert status == 0, page
    return url


async def sign_in(
    session: aiohttp.ClientSession, h: Harness, user: str, password: str, **kw: str
) -> str:
    """Signs in; the session cookie's Set-Cookie header."""
    url = await to_callback(session, h, user, password, **kw)
    async with session.get(url, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
        assert response.headers["Location"] == "/console/"
        [cookie] = [c for c in response.headers.getall("Set-Cookie") if "agentid_console" in c]
        return cookie


def signed_in(h: Harness) -> list[ConsoleUser]:
    assert h.running.http is not None
    sessions = h.running.http.runner.app[CONSOLE].sessions
    return [u for u in sessions._sessions.values() if sessions.get(u.session_id) is not None]


async def home(session: aiohttp.ClientSession, h: Harness) -> str:
    async with session.get(h.http_url + "/console/") as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        return await response.text()


async def test_sign_in_shows_the_user_and_agentid_accepts_the_token(
    h: Harness, provider: Provider
) -> None:
    alice = provider.users["alice"]
    async with browser() as session:
        assert "Sign in" in await home(session, h)
        cookie = await sign_in(session, h, "alice", alice["password"])
        page = await home(session, h)
        assert "Signed in as <strong>alice</strong>" in page
    [user] = signed_in(h)
    assert cookie.startswith(f"agentid_console={user.session_id};")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP here; over TLS it is Secure
    claims = claims_of(user.access_token)
    assert claims["iss"] == provider.issuer
    assert claims["aud"] == IDP_AUDIENCE
    assert claims["scope"] == alice["scope"]
    assert claims["acr"] == "urn:pwd"
    assert abs(claims["auth_time"] - time.time()) < 60
    # the session's token is the user's credential at agentid
    response = await h.delegate(user.access_token, scopes=["payments.transfer"])
    assert response.token


async def test_wrong_password_signs_nobody_in(h: Harness, provider: Provider) -> None:
    async with browser() as session:
        with pytest.raises(LoginRefused, match="wrong password"):
            await to_callback(session, h, "alice", "not-the-password")
    assert signed_in(h) == []


async def test_fresh_login_is_forced_and_replaces_the_token(h: Harness, provider: Provider) -> None:
    """RFC 9470: a step-up's approval sends the user through a login at most max_age old with
    the acr asked; the IdP asks for the password again even with its session alive, and the
    console's session then holds the fresh token (the old session is gone)."""
    alice = provider.users["alice"]
    async with browser() as session:
        await sign_in(session, h, "alice", alice["password"])
        [before] = signed_in(h)
        await asyncio.sleep(1.1)  # auth_time has a one-second grain, on the provider's clock
        path = fresh_login_path("/console/", max_age=60, acr_values=["urn:mfa"])
        await sign_in(session, h, "alice", alice["password"], code=alice["code"], start=path)
        [after] = signed_in(h)
    assert after.session_id != before.session_id
    assert after.access_token != before.access_token
    assert before.auth_time is not None
    assert after.auth_time is not None
    assert after.auth_time > before.auth_time
    assert after.acr == "urn:mfa"
    claims = claims_of(after.access_token)
    assert claims["auth_time"] == after.auth_time
    assert claims["acr"] == "urn:mfa"


async def test_fresh_login_needs_the_second_factor(h: Harness, provider: Provider) -> None:
    alice = provider.users["alice"]
    async with browser() as session:
        path = fresh_login_path("/console/", max_age=60, acr_values=["urn:mfa"])
        with pytest.raises(LoginRefused, match="one-time code is wrong"):
            await to_callback(session, h, "alice", alice["password"], code="000000x", start=path)
    assert signed_in(h) == []


async def refused(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, allow_redirects=False) as response:
        assert response.status in (400, 403), response.status
        assert "agentid_console" not in response.cookies
        return response.headers["X-Agentid-Reason"]


async def test_a_sign_in_refuses_where_it_would_send_the_browser_and_bad_freshness(
    h: Harness, provider: Provider
) -> None:
    """Where the browser returns after sign-in is a path under /console/ only (never another
    host: no open redirect), and max_age / acr_values are bounded: each refused before the
    browser is sent to the IdP, no sign-in begun."""
    from urllib.parse import quote

    bad = [
        "next=" + quote("https://evil.example/"),
        "next=" + quote("//evil.example/console/"),
        "next=" + quote("/console//evil.example/"),
        "next=" + quote("/console/\\evil.example"),
        "next=" + quote("/elsewhere"),
        "max_age=soon",
        "max_age=-1",
        "max_age=86401",
        "acr_values=" + quote(" ".join(f"acr{n}" for n in range(9))),
        "acr_values=" + "a" * 129,
    ]
    async with browser() as session:
        for query in bad:
            url = f"{h.http_url}/console/login?{query}"
            async with session.get(url, allow_redirects=False) as response:
                assert response.status == 400, query
                assert "Location" not in response.headers, query
        ok = f"{h.http_url}/console/login?next=" + quote("/console/sessions")
        async with session.get(ok, allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"].startswith(provider.issuer)


async def test_forged_state_is_refused(h: Harness, provider: Provider) -> None:
    async with browser() as session:
        url = h.http_url + "/console/callback?code=abc&state=forged"
        assert await refused(session, url) == "STATE_UNKNOWN"
    assert signed_in(h) == []


async def test_replayed_state_is_refused(h: Harness, provider: Provider) -> None:
    alice = provider.users["alice"]
    async with browser() as session:
        url = await to_callback(session, h, "alice", alice["password"])
        async with session.get(url, allow_redirects=False) as response:
            assert response.status == 302
        assert await refused(session, url) == "STATE_UNKNOWN"
    assert len(signed_in(h)) == 1


async def test_state_from_another_browser_is_refused(h: Harness, provider: Provider) -> None:
    """Login CSRF: a callback URL begun in the attacker's browser, opened in the victim's."""
    alice = provider.users["alice"]
    async with browser() as attacker, browser() as victim:
        url = await to_callback(attacker, h, "alice", alice["password"])
        assert await refused(victim, url) == "STATE_UNBOUND"
        assert await refused(attacker, url) == "STATE_UNKNOWN"  # spent by the refusal
    assert signed_in(h) == []


async def test_an_expired_console_session_is_signed_out(
    h: Harness, provider: Provider, clock: FakeClock
) -> None:
    async with browser() as session:
        await sign_in(session, h, "bob", provider.users["bob"]["password"])
        assert "Signed in as <strong>bob</strong>" in await home(session, h)
        clock.advance(SESSION_TTL)  # more than the token's 300 s too
        assert "Sign in" in await home(session, h)
    assert signed_in(h) == []


async def test_logout_needs_the_csrf_token(h: Harness, provider: Provider) -> None:
    async with browser() as session:
        await sign_in(session, h, "bob", provider.users["bob"]["password"])
        logout = h.http_url + "/console/logout"
        async with session.post(logout, data={}, allow_redirects=False) as response:
            assert response.status == 403
            assert response.headers["X-Agentid-Reason"] == "CSRF"
        async with session.post(logout, data={"csrf_token": "guess"}) as response:
            assert response.status == 403
        [user] = signed_in(h)
        async with session.post(
            logout, data={"csrf_token": user.csrf_token}, allow_redirects=False
        ) as response:
            assert response.status == 303
        assert "Sign in" in await home(session, h)
    assert signed_in(h) == []


async def test_id_token_rules(h: Harness, provider: Provider, idp: IdpFixture) -> None:
    """ID tokens signed with the provider's own key (the test IdP's RSA key), verified against
    the provider's JWKS: each broken rule is refused with its reason."""
    keys = JwksCache("", provider.issuer + "/jwks", 0.0)
    now = time.time()

    async def check(
        reason: str | None,
        *,
        max_age: int | None = None,
        wanted: tuple[str, ...] = (),
        **claims: object,
    ) -> None:
        base: dict[str, object] = {
            "iss": provider.issuer, "aud": CONSOLE_CLIENT, "sub": "alice", "nonce": "n-1",
            "iat": int(now), "exp": int(now) + 300, "auth_time": int(now) - 10, "scope": None,
        }  # fmt: skip
        token = idp.token(**{**base, **claims})  # type: ignore[arg-type]
        outcome: str | None = None
        try:
            await validate_id_token(
                token, keys=keys, algorithms=["RS256"], issuer=provider.issuer,
                client_id=CONSOLE_CLIENT, nonce="n-1", access_token=None, now=now, leeway=5,
                max_age=max_age, acr_values=wanted,
            )  # fmt: skip
        except LoginFailed as failure:
            outcome = failure.reason
        assert outcome == reason

    await check(None)
    await check(None, aud=["other", CONSOLE_CLIENT], azp=CONSOLE_CLIENT)
    await check("NONCE_MISMATCH", nonce="n-2")
    await check("NONCE_MISMATCH", nonce=None)
    await check("AUDIENCE_MISMATCH", aud="another-client")
    await check("AUDIENCE_MISMATCH", aud=["other", CONSOLE_CLIENT], azp="other")
    await check("ID_TOKEN_INVALID", iss="http://127.0.0.1:1")
    await check("ID_TOKEN_INVALID", exp=int(now) - 60)
    await check("LOGIN_NOT_FRESH", max_age=5)
    await check(None, max_age=60)
    await check("ACR_NOT_MET", wanted=("urn:mfa",), acr="urn:pwd")
    await check(None, wanted=("urn:mfa",), acr="urn:mfa")
    await check("ID_TOKEN_INVALID", alg="ES256")  # not one the provider offers


async def test_an_idp_error_signs_nobody_in(h: Harness, provider: Provider) -> None:
    async with browser() as session:
        async with session.get(h.http_url + "/console/login", allow_redirects=False) as response:
            state = re.search(r"state=([^&]+)", response.headers["Location"])
        assert state is not None
        url = f"{h.http_url}/console/callback?error=access_denied&state={state.group(1)}"
        assert await refused(session, url) == "IDP_REFUSED"
    assert signed_in(h) == []


async def test_the_token_carries_only_the_users_own_scopes(h: Harness, provider: Provider) -> None:
    async with browser() as session:
        await sign_in(session, h, "bob", provider.users["bob"]["password"])
        [user] = signed_in(h)
    with pytest.raises(grpc.aio.AioRpcError) as refusal:
        await h.delegate(user.access_token, scopes=["payments.transfer"])  # not bob's scope
    assert refusal.value.code() == grpc.StatusCode.PERMISSION_DENIED

"""The console's sign-in in a real browser (issue 14 point 7): Chromium follows the real
redirects to the dev IdP (devidp/server.mjs) and back, keeps the real cookies, and a person's
clicks and typing drive the pages. tests/http/test_console.py checks the same protocol over
plain HTTP, rule by rule; here it is what a person sees."""

from __future__ import annotations

import asyncio

from agentid_server.web.console import fresh_login_path

from tests.browser.conftest import MFA
from tests.browser.driver import Browser
from tests.browser.pages import (
    CODE_FIELD,
    HOME,
    LOGIN_PROBLEM,
    SIGN_IN_LINK,
    SIGN_OUT,
    at_idp_login,
    log_in_at_idp,
    sign_in,
)
from tests.conftest import Harness
from tests.http.test_console import Provider, signed_in


async def test_signing_in_through_the_idps_login_page(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    assert await browser.goto(h.http_url + HOME) == 200
    assert await browser.text(SIGN_IN_LINK) == "Sign in"
    await sign_in(browser, h, provider, "alice")
    assert "Signed in as alice." in await browser.text("body")
    [user] = signed_in(h)
    [cookie] = [c for c in await browser.cookies() if c["name"] == "agentid_console"]
    assert cookie["value"] == user.session_id
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Lax", "/console")
    # The session survives a reload: the cookie is sent back.
    assert await browser.reload() == 200
    assert "Signed in as alice." in await browser.text("body")


async def test_a_wrong_password_keeps_the_browser_at_the_idp(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    assert await browser.goto(h.http_url + "/console/login") == 200
    assert at_idp_login(provider, await browser.url())
    await browser.fill('input[name="login"]', "alice")
    await browser.fill('input[name="password"]', "not-the-password")
    url = await browser.click('button[type="submit"]', navigates=True)
    assert at_idp_login(provider, url)
    assert await browser.text(LOGIN_PROBLEM) == "Unknown user or wrong password."
    assert signed_in(h) == []


async def test_signing_out_with_the_pages_form(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    await sign_in(browser, h, provider, "bob")
    assert len(signed_in(h)) == 1
    url = await browser.click(SIGN_OUT, navigates=True)
    assert url == h.http_url + HOME
    assert await browser.text(SIGN_IN_LINK) == "Sign in"
    assert signed_in(h) == []
    assert [c for c in await browser.cookies() if c["name"] == "agentid_console"] == []


async def test_a_fresh_login_asks_for_the_password_and_the_code_again(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    """What approving a step-up does first (RFC 9470): the console sends the signed-in user to
    the IdP with max_age and acr_values; the IdP's own session is alive, yet it asks for the
    password again, and for the one-time code; a wrong code is refused on the page."""
    await sign_in(browser, h, provider, "alice")
    [before] = signed_in(h)
    assert before.acr != MFA  # a plain sign-in: the password alone
    await asyncio.sleep(1.1)  # auth_time has a one-second grain
    path = fresh_login_path(HOME, max_age=60, acr_values=[MFA])
    assert await browser.goto(h.http_url + path) == 200
    assert at_idp_login(provider, await browser.url())
    assert await browser.count(CODE_FIELD) == 1
    url = await log_in_at_idp(browser, provider, "alice", code="000000x")
    assert at_idp_login(provider, url)
    assert await browser.text(LOGIN_PROBLEM) == "The one-time code is wrong."
    url = await log_in_at_idp(browser, provider, "alice", code=provider.users["alice"]["code"])
    assert url == h.http_url + HOME
    page = await browser.text("body")
    assert "Signed in as alice." in page
    assert f"acr: {MFA}" in page
    [after] = signed_in(h)
    assert after.session_id != before.session_id
    assert (after.acr, after.auth_time is not None) == (MFA, True)
    assert before.auth_time is not None
    assert after.auth_time is not None
    assert after.auth_time > before.auth_time


async def test_max_age_zero_asks_for_the_password_again(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    """/console/login?max_age=0: a login now, whatever the IdP's session; no second factor
    when no acr is asked."""
    await sign_in(browser, h, provider, "bob")
    [before] = signed_in(h)
    await asyncio.sleep(1.1)
    assert await browser.goto(h.http_url + fresh_login_path(HOME, max_age=0)) == 200
    assert at_idp_login(provider, await browser.url())
    assert await browser.count(CODE_FIELD) == 0
    assert await log_in_at_idp(browser, provider, "bob") == h.http_url + HOME
    [after] = signed_in(h)
    assert after.session_id != before.session_id
    assert before.auth_time is not None
    assert after.auth_time is not None
    assert after.auth_time > before.auth_time

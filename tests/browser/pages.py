"""What a person does in the browser, as steps the tests share: sign in at the console through
the dev IdP's login page (devidp/server.mjs), and sign in again when the console asks for a
fresh login (RFC 9470)."""

from __future__ import annotations

from tests.browser.driver import Browser
from tests.conftest import Harness
from tests.http.test_console import Provider

HOME = "/console/"
SIGN_IN_LINK = 'a[href="/console/login"]'
SIGN_OUT = 'form[action="/console/logout"] button[type="submit"]'
# The dev IdP's login page
LOGIN_FIELD = 'input[name="login"]'
PASSWORD_FIELD = 'input[name="password"]'
CODE_FIELD = 'input[name="code"]'
LOGIN_SUBMIT = 'form[action$="/login"] button[type="submit"]'
LOGIN_PROBLEM = '[role="alert"]'


def at_idp_login(provider: Provider, url: str) -> bool:
    """Whether ``url`` is the dev IdP's login page (an interaction of the provider)."""
    return url.startswith(provider.issuer + "/interaction/")


async def log_in_at_idp(
    browser: Browser, provider: Provider, user: str, *, code: str | None = None
) -> str:
    """Fills in and submits the IdP's login page the browser is on; the URL the browser lands
    on after the redirects (the console, or the login page again with the problem)."""
    assert at_idp_login(provider, await browser.url()), await browser.url()
    await browser.fill(LOGIN_FIELD, user)
    await browser.fill(PASSWORD_FIELD, provider.users[user]["password"])
    if code is not None:
        await browser.fill(CODE_FIELD, code)
    return await browser.click(LOGIN_SUBMIT, navigates=True)


async def sign_in(browser: Browser, h: Harness, provider: Provider, user: str) -> None:
    """From the console's home page: its "Sign in" link, the IdP's login page (user and
    password), and back to the console's home page signed in."""
    assert await browser.goto(h.http_url + HOME) == 200
    url = await browser.click(SIGN_IN_LINK, navigates=True)
    assert at_idp_login(provider, url), url
    assert await browser.count(CODE_FIELD) == 0  # a plain sign-in asks for no second factor
    landed = await log_in_at_idp(browser, provider, user)
    assert landed == h.http_url + HOME, landed


async def sign_in_again_if_asked(
    browser: Browser, h: Harness, provider: Provider, user: str
) -> bool:
    """When the browser is on the IdP's login page (the console sent it for a fresh login),
    signs in with the password and the one-time code and checks it comes back to the console.
    Whether it was asked."""
    if not at_idp_login(provider, await browser.url()):
        return False
    assert await browser.count(PASSWORD_FIELD) == 1
    landed = await log_in_at_idp(browser, provider, user, code=provider.users[user]["code"])
    assert landed.startswith(h.http_url + HOME), landed
    return True

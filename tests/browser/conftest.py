"""Fixtures for the tests in a real browser: the dev OpenID Provider (tests/http/test_console.py's
``provider``: devidp/server.mjs in node), agentid with its console signing in there, risk rules
that ask for a step-up, and ``browser``: headless Chromium (tests/browser/driver.py).

Without chromium, node or `npm ci` the tests skip, saying what is missing; with
AGENTID_REQUIRE_BROWSER=1 (.ci/run sets it) they fail instead, so CI never passes by skipping.
When a test fails, the page's screenshot is saved under its tmp_path and the path printed.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.driver import (
    REQUIRE_BROWSER,
    Browser,
    BrowserError,
    launched_browser,
    missing_for_browser,
)
from tests.conftest import (
    FakeClock,
    Harness,
    IdpFixture,
    running_harness,
)
from tests.http.test_console import Provider, console_sections
from tests.http.test_console import provider as provider  # the fixture, shared as it is

RULES = [{"name": "large-transfer", "action": "payments.transfer", "when": "context.amount > 1000"}]
MFA = "urn:mfa"  # the dev IdP's acr for the password and the one-time code

REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps each phase's report on the test, for the browser fixture to see a failure."""
    report: pytest.TestReport = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    """First of all (before the IdP and the server start): skip, or fail under CI."""
    missing = missing_for_browser()
    if missing is None:
        return
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{REQUIRE_BROWSER}=1 but the browser tests cannot run: {missing}")
    pytest.skip(f"tests in a real browser: {missing}")


class WallClock(FakeClock):
    """The real clock. A browser test takes real seconds, and the IdP stamps its logins and
    tokens with real time: agentid must judge them on the same clock. ``advance`` does nothing
    here."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def clock() -> FakeClock:
    return WallClock()


@pytest.fixture
async def h(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, provider: Provider
) -> AsyncIterator[Harness]:
    """agentid on the HTTP port the provider's console client redirects to; a transfer above
    1000 needs a step-up, approved with a login at most 5 minutes old with the one-time code
    (acr urn:mfa; a plain sign-in is urn:pwd, so approving always asks for a fresh login)."""

    def mutate(config: dict[str, Any]) -> None:
        for name, section in console_sections(tmp_path, idp, provider).items():
            if isinstance(section, dict):
                config[name].update(section)
            else:
                config[name] = section
        config["risk"] = RULES
        config["step_up"] = {"pending_ttl": "10m", "max_auth_age": "5m", "accepted_acr": [MFA]}

    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        yield harness


@pytest.fixture
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    """Headless Chromium, a fresh profile; on failure a screenshot in tmp_path."""
    async with launched_browser(tmp_path) as opened:
        yield opened
        reports = request.node.stash.get(REPORTS, {})
        if "call" in reports and not reports["call"].failed:
            return
        try:
            path = await opened.screenshot(tmp_path / "failure.png")
            print(f"browser: the page at the failure, {await opened.url()}: {path}")
            for line in await opened.page_log():
                print(f"browser: {line}")
        except (BrowserError, TimeoutError) as error:
            print(f"browser: no screenshot ({error}); the driver's log: {opened.log_path}")

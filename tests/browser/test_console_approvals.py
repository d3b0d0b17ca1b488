"""The console's pages in a real browser (issue 14 point 7): a pending step-up appears live,
approving it asks for a fresh login and then allows the agent's next Check once; denying it
denies; revoking a session denies that agent's next Check.

Written against the pages' hooks as agreed with branch h9 (step-up rows carry
`data-step-up-id`, their buttons `data-testid="approve"` / `"deny"`; session rows carry
`data-session-id`, their button `data-testid="revoke"`, and the page one
`data-testid="revoke-all"`). The agent is a real one: delegated with the access token the dev IdP gave the console.
"""

from __future__ import annotations

import aiohttp
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.browser.conftest import MFA
from tests.browser.driver import Browser
from tests.browser.pages import at_idp_login, sign_in, sign_in_again_if_asked
from tests.conftest import Harness, bearer, struct
from tests.http.test_console import Provider, signed_in

STEP_UPS = "/console/step-ups"
SESSIONS = "/console/sessions"
ANY_STEP_UP = "[data-step-up-id]"
APPROVE = '[data-testid="approve"]'
DENY = '[data-testid="deny"]'
REVOKE = '[data-testid="revoke"]'
REVOKE_ALL = '[data-testid="revoke-all"]'
BINDING_MESSAGE = "Transfer 5000 EUR to account 42"
SAME_PAGE = "window.agentidTestPage"  # set once the page loaded: still there = no reload since


@pytest.fixture(autouse=True)
async def _console_pages(h: Harness) -> None:
    """Before any browser step: the pages exist (a 404 fails here, at once, not after a
    selector's timeout)."""
    async with aiohttp.ClientSession() as session:
        for path in (STEP_UPS, SESSIONS):
            async with session.get(h.http_url + path, allow_redirects=False) as response:
                assert response.status != 404, f"no console page {path} yet"


def step_up_row(step_up_id: str) -> str:
    return f'[data-step-up-id="{step_up_id}"]'


def session_row(session_id: str) -> str:
    return f'[data-session-id="{session_id}"]'


async def open_console_page(browser: Browser, h: Harness, path: str) -> None:
    """Opens a console page (200, not the sign-in) and marks the document, so a later
    ``still_the_same_page`` proves nothing reloaded it."""
    assert await browser.goto(h.http_url + path) == 200, f"{path}: no such console page yet"
    await browser.evaluate(f"{SAME_PAGE} = true")


async def still_the_same_page(browser: Browser) -> bool:
    return await browser.evaluate(f"{SAME_PAGE} === true") is True


async def delegated_agent(h: Harness) -> pb.DelegateResponse:
    """support-bot, delegated by the user signed in at the console with the access token the
    dev IdP issued to the console (as a CLI signed in at the same IdP would hold)."""
    [user] = signed_in(h)
    return await h.delegate(user.access_token, scopes=["payments.transfer"])


async def ask_for_step_up(h: Harness, agent: pb.DelegateResponse) -> pb.StepUp:
    request = pb.StepUpRequest(
        action="payments.transfer",
        resource="account/42",
        context=struct({"amount": 5000}),
        binding_message=BINDING_MESSAGE,
    )
    return (await h.stub.StepUp(request, metadata=bearer(agent.token))).step_up


async def transfer(h: Harness, agent: pb.DelegateResponse, amount: int = 5000) -> pb.CheckResponse:
    """The agent's Check for the transfer its step-up is about (above 1000: the risk rule)."""
    context = struct({"amount": amount})
    return await h.check(agent.token, "payments.transfer", "account/42", context=context)


async def state_of(h: Harness, agent: pb.DelegateResponse, step_up_id: str) -> int:
    """The step-up's state now, as the agent sees it (WatchStepUps, current state only)."""
    request = pb.WatchStepUpsRequest(step_up_id=step_up_id, current_only=True)
    async for response in h.stub.WatchStepUps(request, metadata=bearer(agent.token)):
        return int(response.step_up.state)
    raise AssertionError(f"WatchStepUps sent nothing for {step_up_id}")


async def resolve_in_browser(
    browser: Browser, h: Harness, provider: Provider, step_up_id: str, button: str
) -> None:
    """Clicks the row's Approve or Deny. Resolving needs a login at most step_up.max_auth_age
    old with the one-time code (acr urn:mfa; the sign-in was the password alone): the console
    sends the browser to the IdP, which asks for both."""
    row = step_up_row(step_up_id)
    await browser.click(f"{row} {button}", navigates=True)
    assert await sign_in_again_if_asked(browser, h, provider, "alice"), "no fresh login asked"
    # A POST does not survive the IdP's redirects: when the console shows the step-up again
    # after the fresh login, the person confirms with the same button, now without a login.
    if await browser.count(f"{row} {button}"):
        url = await browser.click(f"{row} {button}", navigates=True)
        assert not at_idp_login(provider, url), "a second fresh login asked"
    await browser.wait_for(f"{row} {button}", state="hidden")
    [user] = signed_in(h)
    assert user.acr == MFA


async def test_a_step_up_appears_live_and_its_approval_allows_one_check(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    await sign_in(browser, h, provider, "alice")
    agent = await delegated_agent(h)
    await open_console_page(browser, h, STEP_UPS)
    assert await browser.count(ANY_STEP_UP) == 0
    pending = await ask_for_step_up(h, agent)
    await browser.wait_for(step_up_row(pending.id))  # pushed (Server-Sent Events): no reload
    assert await still_the_same_page(browser)
    assert BINDING_MESSAGE in await browser.text(step_up_row(pending.id))
    assert (await transfer(h, agent)).decision == pb.DECISION_STEP_UP_REQUIRED  # not yet
    await resolve_in_browser(browser, h, provider, pending.id, APPROVE)
    assert await state_of(h, agent, pending.id) == pb.STEP_UP_STATE_APPROVED
    allowed = await transfer(h, agent)
    assert (allowed.decision, allowed.reason, allowed.step_up_id) == (
        pb.DECISION_ALLOW,
        pb.REASON_STEP_UP_APPROVED,
        pending.id,
    )
    again = await transfer(h, agent)  # once: the approval was consumed
    assert (again.decision, again.reason) == (pb.DECISION_STEP_UP_REQUIRED, pb.REASON_HIGH_RISK)


async def test_denying_a_step_up_denies_the_agents_check(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    await sign_in(browser, h, provider, "alice")
    agent = await delegated_agent(h)
    pending = await ask_for_step_up(h, agent)
    await open_console_page(browser, h, STEP_UPS)
    assert BINDING_MESSAGE in await browser.text(step_up_row(pending.id))  # listed on load too
    await resolve_in_browser(browser, h, provider, pending.id, DENY)
    assert await state_of(h, agent, pending.id) == pb.STEP_UP_STATE_DENIED
    for _ in range(2):
        denied = await transfer(h, agent)
        assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_STEP_UP_DENIED)


async def test_a_step_up_resolved_elsewhere_leaves_the_page_live(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    """Approved from another device (here: ResolveStepUp over gRPC with a fresh token of the
    same IdP): the open page drops its Approve button without a reload."""
    await sign_in(browser, h, provider, "alice")
    agent = await delegated_agent(h)
    pending = await ask_for_step_up(h, agent)
    await open_console_page(browser, h, STEP_UPS)
    await browser.wait_for(f"{step_up_row(pending.id)} {APPROVE}")
    fresh = h.idp.token(
        sub="alice",
        iss=provider.issuer,
        scope=provider.users["alice"]["scope"],
        auth_time=int(h.clock.now()),
        acr=MFA,
    )  # signed with the provider's own key (the test IdP's RSA key)
    request = pb.ResolveStepUpRequest(step_up_id=pending.id, approve=True)
    await h.stub.ResolveStepUp(request, metadata=bearer(fresh))
    await browser.wait_for(f"{step_up_row(pending.id)} {APPROVE}", state="hidden")
    assert await still_the_same_page(browser)


async def test_revoking_a_session_denies_that_agents_next_check(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    await sign_in(browser, h, provider, "alice")
    agent, other = await delegated_agent(h), await delegated_agent(h)
    for session in (agent, other):
        assert (await transfer(h, session, amount=50)).decision == pb.DECISION_ALLOW
    await open_console_page(browser, h, SESSIONS)
    row = session_row(agent.session_id)
    await browser.click(f"{row} {REVOKE}", navigates=True)
    await sign_in_again_if_asked(browser, h, provider, "alice")  # should revoking ask for one
    await browser.wait_for(f"{row} {REVOKE}", state="hidden")
    denied = await transfer(h, agent, amount=50)
    assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    assert (await transfer(h, other, amount=50)).decision == pb.DECISION_ALLOW


async def test_revoke_all_denies_every_agent_of_the_user(
    h: Harness, provider: Provider, browser: Browser
) -> None:
    await sign_in(browser, h, provider, "alice")
    agents = [await delegated_agent(h) for _ in range(2)]
    await open_console_page(browser, h, SESSIONS)
    await browser.click(REVOKE_ALL, navigates=True)
    await sign_in_again_if_asked(browser, h, provider, "alice")
    for agent in agents:
        await browser.wait_for(f"{session_row(agent.session_id)} {REVOKE}", state="hidden")
        denied = await transfer(h, agent, amount=50)
        assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)

"""The client-assertion verifier alone: the audiences a caller passes (the HTTP token endpoint
passes its URL too), the bounds of the replay cache, and the `[[agents]]` keys that configure it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentid_server.config import ConfigError, settings_from_mapping
from agentid_server.domain.errors import ResourceExhausted
from agentid_server.domain.ports import AssertionRejected
from agentid_server.tokens.client_assertion import (
    ENTRY_BYTES,
    REMEMBER_FOR,
    ClientAssertionVerifier,
    SpentAssertions,
)
from agentid_server.tokens.idp import JwksCache

from tests.conftest import ISSUER, FakeClock
from tests.security.test_client_assertions import AGENT, AgentKeys

TOKEN_ENDPOINT = f"{ISSUER}/oauth2/token"


def verifier(keys: AgentKeys, clock: FakeClock) -> ClientAssertionVerifier:
    cache = JwksCache(str(keys.path), "", 30.0, monotonic=clock.monotonic)
    return ClientAssertionVerifier({AGENT: cache}, clock)


async def test_the_token_endpoint_may_be_the_audience_when_the_caller_accepts_it(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    keys = AgentKeys(tmp_path / "jwks.json", clock)
    actors = verifier(keys, clock)
    assert actors.has_keys(AGENT)
    assert not actors.has_keys("support-bot")
    both = (ISSUER, TOKEN_ENDPOINT)
    await actors.verify(AGENT, keys.assertion(aud=TOKEN_ENDPOINT), both)
    await actors.verify(AGENT, keys.assertion(aud=ISSUER), both)
    with pytest.raises(AssertionRejected, match="audience"):
        await actors.verify(AGENT, keys.assertion(aud=TOKEN_ENDPOINT), (ISSUER,))


async def test_leeway_is_ten_seconds_each_way(tmp_path: Path) -> None:
    clock = FakeClock()
    keys = AgentKeys(tmp_path / "jwks.json", clock)
    actors = verifier(keys, clock)
    now = int(clock.now())
    await actors.verify(AGENT, keys.assertion(exp=now - 9, iat=now - 60), (ISSUER,))
    await actors.verify(AGENT, keys.assertion(exp=now + 309, nbf=now + 9), (ISSUER,))
    for claims in ({"exp": now - 10}, {"exp": now + 311}, {"iat": now + 11}):
        with pytest.raises(AssertionRejected):
            await actors.verify(AGENT, keys.assertion(**claims), (ISSUER,))


def test_each_agent_fills_only_its_own_share_and_a_full_cache_refuses() -> None:
    cost = ENTRY_BYTES + len("a") + len("j0000")
    spent = SpentAssertions(cache_bytes=5 * cost, bytes_per_agent=2 * cost)
    spent.spend("a", "j0000", 0.0)
    spent.spend("a", "j0001", 0.0)
    with pytest.raises(ResourceExhausted, match="agent 'a'") as caught:
        spent.spend("a", "j0002", 0.0)
    assert caught.value.reason == "ASSERTION_REPLAY_CACHE_FULL"
    spent.spend("b", "j0000", 0.0)  # the same jti of another agent is another assertion
    spent.spend("b", "j0001", 0.0)
    spent.spend("c", "j0000", 0.0)
    with pytest.raises(ResourceExhausted, match="too many client assertions at once"):
        spent.spend("d", "j0000", 0.0)  # full: live entries are never forgotten to make room
    with pytest.raises(AssertionRejected, match="already used"):
        spent.spend("a", "j0000", REMEMBER_FOR - 1)
    spent.spend("a", "j0002", REMEMBER_FOR)  # every earlier entry expired, and was forgotten
    spent.spend("d", "j0000", REMEMBER_FOR)


def agents_config(**agent: Any) -> dict[str, Any]:
    return {"agents": [{"id": AGENT, "max_scopes": ["tickets.*"], **agent}]}


@pytest.mark.parametrize(
    ("agent", "key", "problem"),
    [
        ({"jwks_file": "a.json", "jwks_url": "https://a.example/jwks"}, "jwks_file", "at most one"),
        ({"jwks_url": "http://agents.example/jwks"}, "jwks_url", "https"),
        ({"jwks": "a.json"}, "jwks", "unknown key"),
    ],
)
def test_agent_keys_config_errors_name_the_key(
    agent: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(agents_config(**agent), "x.toml", {})
    assert caught.value.key == f"agents[0].{key}"
    assert problem in caught.value.problem


def test_an_agent_has_at_most_one_source_of_keys() -> None:
    settings = settings_from_mapping(agents_config(jwks_url="https://a.example/jwks"), "x", {})
    assert (settings.agents[0].jwks_file, settings.agents[0].jwks_url) == (
        "",
        "https://a.example/jwks",
    )
    assert settings_from_mapping(agents_config(), "x", {}).agents[0].jwks_file == ""

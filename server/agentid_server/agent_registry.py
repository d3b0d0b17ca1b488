"""The config's `[[agents]]` as registry entries (source CONFIG), and the config agents whose
client-assertion keys are read again from their file or URL (like an IdP's JWKS)."""

from __future__ import annotations

from agentid_server.config import ConfigError, Settings
from agentid_server.domain.agents import Agent, AgentSource
from agentid_server.domain.ports import Clock
from agentid_server.tokens.agent_keys import MAX_AGENT_JWKS_BYTES, agent_jwks_problem
from agentid_server.tokens.client_assertion import AGENT_JWKS_MAX_AGE, AGENT_JWKS_MIN_REFRESH
from agentid_server.tokens.idp import JwksCache


def config_agents(settings: Settings, now: float) -> list[Agent]:
    """Each `[[agents]]` entry as an agent; a `jwks_file` is read now (its keys are shown as the
    agent's jwks_json) and must be a JWK Set of public keys, or the start fails naming it."""
    agents = []
    for index, entry in enumerate(settings.agents):
        jwks_json = ""
        if entry.jwks_file:
            key = f"agents[{index}].jwks_file"
            try:
                with open(entry.jwks_file, "rb") as handle:
                    raw = handle.read(MAX_AGENT_JWKS_BYTES + 1)
                jwks_json = raw.decode()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(settings.source, key, f"cannot read it: {exc}") from None
            if (problem := agent_jwks_problem(jwks_json)) is not None:
                raise ConfigError(settings.source, key, problem)
        agents.append(
            Agent(
                id=entry.id,
                max_scopes=entry.max_scopes,
                display_name=entry.display_name,
                description=entry.description,
                owners=entry.owners,
                max_ttl=int(entry.max_ttl),
                jwks_json=jwks_json,
                jwks_url=entry.jwks_url,
                source=AgentSource.CONFIG,
                created_at=now,
                updated_at=now,
            )
        )
    return agents


def fetched_keys(settings: Settings, clock: Clock) -> dict[str, JwksCache]:
    """The config agents with keys, read again (an unknown kid, or every AGENT_JWKS_MAX_AGE) from
    their file or URL, by agent id."""
    return {
        a.id: JwksCache(
            a.jwks_file,
            a.jwks_url,
            AGENT_JWKS_MIN_REFRESH,
            AGENT_JWKS_MAX_AGE,
            monotonic=clock.monotonic,
            owner=f"agent {a.id!r}",
        )
        for a in settings.agents
        if a.jwks_file or a.jwks_url
    }

"""A client assertion is accepted once across replicas sharing a PostgreSQL store: each replica
remembers only the jtis it saw, so the store records them (spent_proofs, namespaced apart from
DPoP proofs). Runs when AGENTID_TEST_POSTGRES_URL names a database the tests may wipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from agentid_server.config import AgentSettings, Settings

from tests.conftest import FakeClock, IdpFixture, error_info, running_harness
from tests.integration.test_postgres import URL, replica, wipe
from tests.security.test_client_assertions import AGENT, AgentKeys

pytestmark = pytest.mark.skipif(
    not URL, reason="set AGENTID_TEST_POSTGRES_URL to a database the tests may wipe"
)


async def test_a_jti_one_replica_accepted_is_refused_by_the_other(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    await wipe(URL)
    keys = AgentKeys(tmp_path / "agent-jwks.json", clock)
    agent = AgentSettings(AGENT, ("tickets.*",), 0.0, jwks_file=str(keys.path))

    def keyed(chain: str) -> Settings:
        settings = replica(tmp_path, idp, chain)
        return dataclasses.replace(settings, agents=(*settings.agents, agent))

    async with (
        running_harness(tmp_path, idp, clock, keyed("replica-a")) as a,
        running_harness(tmp_path, idp, clock, keyed("replica-b")) as b,
    ):
        assertion = keys.assertion("RS256")
        await a.delegate(agent_id=AGENT, actor_token=assertion)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await b.delegate(agent_id=AGENT, actor_token=assertion)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "ACTOR_UNAUTHENTICATED"
        assert "already used" in (caught.value.details() or "")
        await b.delegate(agent_id=AGENT, actor_token=keys.assertion("RS256"))

"""The agent registry's RPCs (api.md "Agent lifecycle"): proto -> AgentAdmin -> proto."""

from __future__ import annotations

from typing import Any

import grpc
from agentid.v1 import agentid_pb2 as pb
from google.protobuf import duration_pb2

from agentid_server.api.convert import timestamp, whole_seconds
from agentid_server.domain.agents import Agent, AgentAdmin, AgentDraft
from agentid_server.domain.errors import InvalidArgument
from agentid_server.domain.model import Principal

Context = grpc.aio.ServicerContext[Any, Any]
MAX_MASK_PATHS = 16


def agent_message(agent: Agent) -> pb.Agent:
    message = pb.Agent(
        id=agent.id,
        display_name=agent.display_name,
        description=agent.description,
        owners=agent.owners,
        max_scopes=agent.max_scopes,
        state=pb.AgentState.ValueType(agent.state),
        jwks_json=agent.jwks_json,
        jwks_url=agent.jwks_url,
        source=pb.AgentSource.ValueType(agent.source),
        create_time=timestamp(agent.created_at),
        update_time=timestamp(agent.updated_at),
        disabled_reason=agent.disabled_reason,
    )
    if agent.max_ttl:
        message.max_ttl.CopyFrom(duration_pb2.Duration(seconds=agent.max_ttl))
    if agent.disabled_at is not None:
        message.disable_time.CopyFrom(timestamp(agent.disabled_at))
    return message


def _max_ttl(agent: pb.Agent) -> int | None:
    """The agent's max_ttl in whole seconds (a fraction rounded up); None when unset."""
    seconds = whole_seconds(agent, "max_ttl", "agent.max_ttl")
    if seconds == 0:
        raise InvalidArgument.field("agent.max_ttl", "must be positive (unset: tokens.max_ttl)")
    return seconds


def _draft(agent: pb.Agent) -> AgentDraft:
    return AgentDraft(
        id=agent.id,
        display_name=agent.display_name,
        description=agent.description,
        owners=list(agent.owners),
        max_scopes=list(agent.max_scopes),
        max_ttl=_max_ttl(agent),
        jwks_json=agent.jwks_json,
    )


class AgentMethods:
    """Mixed into the servicer; ``_agents`` is set by it."""

    _agents: AgentAdmin

    async def CreateAgent(
        self, request: pb.CreateAgentRequest, context: Context, principal: Principal
    ) -> pb.CreateAgentResponse:
        if not request.HasField("agent"):
            raise InvalidArgument.field("agent", "is required")
        created = await self._agents.create(principal, _draft(request.agent))
        return pb.CreateAgentResponse(agent=agent_message(created))

    async def GetAgent(
        self, request: pb.GetAgentRequest, context: Context, principal: Principal
    ) -> pb.GetAgentResponse:
        return pb.GetAgentResponse(agent=agent_message(self._agents.get(principal, request.id)))

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context, principal: Principal
    ) -> pb.ListAgentsResponse:
        page = self._agents.list(
            principal, request.page_size, request.page_token, request.include_disabled
        )
        return pb.ListAgentsResponse(
            agents=[agent_message(agent) for agent in page.agents],
            next_page_token=page.next_page_token,
        )

    async def UpdateAgent(
        self, request: pb.UpdateAgentRequest, context: Context, principal: Principal
    ) -> pb.UpdateAgentResponse:
        if not request.HasField("agent"):
            raise InvalidArgument.field("agent", "is required")
        paths = list(request.update_mask.paths)
        if len(paths) > MAX_MASK_PATHS:
            raise InvalidArgument.field("update_mask", f"at most {MAX_MASK_PATHS} paths")
        updated = await self._agents.update(principal, _draft(request.agent), paths)
        return pb.UpdateAgentResponse(agent=agent_message(updated))

    async def DisableAgent(
        self, request: pb.DisableAgentRequest, context: Context, principal: Principal
    ) -> pb.DisableAgentResponse:
        disabled = await self._agents.disable(principal, request.id, request.reason)
        return pb.DisableAgentResponse(
            agent=agent_message(disabled.agent),
            revoked_session_ids=disabled.revoked_session_ids,
            revocation_sequence=disabled.revocation_sequence,
        )

    async def EnableAgent(
        self, request: pb.EnableAgentRequest, context: Context, principal: Principal
    ) -> pb.EnableAgentResponse:
        enabled = await self._agents.enable(principal, request.id)
        return pb.EnableAgentResponse(agent=agent_message(enabled))

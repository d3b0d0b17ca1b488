"""The MCP server side of the guard inside the SDK: an MCPServer built with the guard's auth
hooks and ``tools/call`` interceptor, whose streamable HTTP app has the guard in front; and
the interceptor, which runs a checked call and asks the user when agentid wants a step-up."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from agentid.v1 import agentid_pb2 as pb
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    CallToolRequestParams,
    CallToolResult,
    ElicitRequest,
    ElicitRequestURLParams,
    InputRequiredResult,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from agentid_client._errors import AgentIdError
from agentid_client.mcp._guard import CHECKED, Checked
from agentid_client.mcp._http import GuardLayer

if TYPE_CHECKING:
    from agentid_client.mcp._guard import McpGuard

log = logging.getLogger("agentid_client.mcp")

STEP_UP_PREFIX = "stp_"  # agentid's step-up ids


class GuardedMCPServer(MCPServer[Any]):
    """An MCPServer protected by an McpGuard (``guard.mcp_server(...)`` makes one): the SDK's
    token verifier hook and AuthSettings are the guard's, its ``tools/call`` goes through the
    guard's interceptor, and ``streamable_http_app()`` (and ``run("streamable-http")``) serve
    the guard in front of the SDK's app. A tool call that did not come through that HTTP layer
    (stdio, SSE) is refused: it was not checked."""

    def __init__(self, guard: McpGuard, name: str | None = None, **options: Any) -> None:
        for taken in ("token_verifier", "auth", "auth_server_provider"):
            if taken in options:
                raise TypeError(f"{taken} is the guard's: leave it out")
        extensions = [GuardExtension(guard), *options.pop("extensions", ())]
        super().__init__(
            name,
            token_verifier=guard.token_verifier,
            auth=guard.auth_settings,
            extensions=extensions,
            **options,
        )
        self.guard = guard

    def streamable_http_app(
        self,
        *,
        streamable_http_path: str = "/mcp",
        max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        **options: Any,
    ) -> Starlette:
        """The SDK's app, with the guard in front (outermost, before its authentication)."""
        if streamable_http_path != self.guard.path:
            raise ValueError(
                f"the endpoint's path ({streamable_http_path}) must be resource_url's "
                f"({self.guard.path}): agents' tokens and proofs name that URL"
            )
        app = super().streamable_http_app(
            streamable_http_path=streamable_http_path,
            max_request_body_size=max_request_body_size,
            **options,
        )
        app.add_middleware(GuardLayer, guard=self.guard, max_body_bytes=max_request_body_size)
        return app


class GuardExtension(Extension):
    """The guard's ``tools/call`` interceptor: the tool runs only for the call agentid
    answered ALLOW; for STEP_UP_REQUIRED, the agent is told to ask its user."""

    identifier = "dev.agentid/mcp-guard"

    def __init__(self, guard: McpGuard) -> None:
        self._guard = guard

    async def intercept_tool_call(
        self,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        checked = _checked(ctx)
        if (
            checked is None
            or checked.call.request_id != ctx.request_id
            or checked.call.name != params.name
            or checked.call.arguments != (params.arguments or {})
        ):
            log.warning("mcp guard: a tools/call reached the server unchecked: refused")
            message = "this tools/call was not checked by agentid: serve the guard's app"
            raise MCPError(INVALID_REQUEST, message)
        if checked.answer.decision == pb.DECISION_ALLOW:
            return await call_next(ctx)
        return await self._ask_user(checked, params, ctx)

    async def _ask_user(
        self,
        checked: Checked,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
    ) -> HandlerResult:
        """STEP_UP_REQUIRED: a step-up at agentid, asked with the agent's own token, and the
        agent told to have its user approve it (a URL-mode elicitation when its client said it
        handles one, else a tool error naming the step-up and the page)."""
        guard, binding, tool = self._guard, checked.binding, checked.call.name
        on = f"{tool} on {guard.server_name}"
        answered = [key for key in (params.input_responses or {}) if key.startswith(STEP_UP_PREFIX)]
        if answered:
            # The retry after the user was shown the page, still not approved: no new step-up.
            url = _approval_url(guard.public_url, answered[0])
            return _tool_error(
                f"Your user's approval is needed for {on}: agentid step-up {answered[0]} is not "
                f"approved yet, to approve at {url}. Call the tool again once it is approved."
            )
        if checked.claims.jkt is not None:
            # A StepUp with a key-bound token needs a proof of the agent's key for agentid's own
            # URL, which this server cannot make: the agent asks itself, for the same binding.
            return _tool_error(
                f"Your user's approval is needed for {on}. This token is bound to a key: ask "
                f"agentid's StepUp yourself (action {binding.action}, resource "
                f'"{binding.resource}", the same arguments as context), then call again once it '
                "is approved."
            )
        named = f"{tool} on MCP server {guard.server_name}"
        try:
            async with guard.agent_client(checked.presented) as agent:
                step_up = await agent.step_up(
                    binding.action,
                    binding.resource,
                    context=binding.context,
                    binding_message=f"{named} ({binding.resource})" if binding.resource else named,
                )
        except AgentIdError as error:
            log.warning(
                "mcp guard: StepUp for %s failed: %s %s", tool, error.code.name, error.reason
            )
            message = f"agentid could not decide this call ({error.code.name})"
            raise MCPError(INTERNAL_ERROR, message) from None
        url = _approval_url(guard.public_url, step_up.id)
        text = (
            f"Your user's approval is needed for {on}: agentid step-up {step_up.id}, to approve "
            f"at {url}. Call the tool again once it is approved."
        )
        capabilities = ctx.session.client_capabilities
        elicitation = capabilities.elicitation if capabilities is not None else None
        if elicitation is not None and elicitation.url is not None:
            if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
                # 2026-07-28: the elicitation rides in the result, keyed by the step-up id; the
                # client asks its user and calls again with the answer.
                request = ElicitRequest(params=ElicitRequestURLParams(message=text, url=url))
                return InputRequiredResult(input_requests={step_up.id: request})
            # The spec's URLElicitationRequiredError (-32042), the step-up id its elicitationId.
            elicit = ElicitRequestURLParams(message=text, url=url, elicitation_id=step_up.id)
            raise UrlElicitationRequiredError(
                [elicit], f"step-up {step_up.id} needs the user's approval"
            )
        return _tool_error(text)


def _checked(ctx: ServerRequestContext[Any, Any]) -> Checked | None:
    request = ctx.request
    if not isinstance(request, HTTPConnection):
        return None
    checked = request.scope.get(CHECKED)
    return checked if isinstance(checked, Checked) else None


def _approval_url(public_url: str, step_up_id: str) -> str:
    return f"{public_url}/console/step-ups?step_up={step_up_id}"


def _tool_error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=text)], is_error=True)

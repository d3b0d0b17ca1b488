"""A small async client for the agentid service."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
import jwt
from agentid.v1 import agentid_pb2 as pb
from agentid.v1 import agentid_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2

from agentid_client._errors import AgentIdError
from agentid_client.dpop import ProofKey, dpop_proof, proof_algorithm
from agentid_client.tokens import parse_jwks

SERVICE_PATH = "/agentid.v1.AgentIdentityService/"
try:  # opentelemetry-api is optional (the `otel` extra): without it, calls carry no trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:
    _TRACE_CONTEXT: TraceContextTextMapPropagator | None = None
else:
    _TRACE_CONTEXT = TraceContextTextMapPropagator()


def channel_options(
    *, keepalive_time: float = 30.0, keepalive_timeout: float = 10.0
) -> list[tuple[str, int]]:
    """gRPC channel options for agentid: HTTP/2 keepalive pings while a call is open, so a
    stream on a network path that died without a word (a RevocationWatcher's, quiet between
    revocations) fails within ``keepalive_time`` + ``keepalive_timeout`` seconds and is resumed,
    instead of waiting forever while revocations go unseen. agentid accepts a ping every 10 s
    (its ``server.min_client_ping_interval``); ask its operator before pinging more often.

    ``AgentIdClient`` uses them for the channels it makes; pass them to a channel of your own:
    ``grpc.aio.secure_channel(target, credentials, options=channel_options())``."""
    timeout_ms = max(1, round(keepalive_timeout * 1000))
    return [
        ("grpc.keepalive_time_ms", max(1, round(keepalive_time * 1000))),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),  # what gRPC core waits for a ping's ack
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that stays quiet
    ]


def is_local_target(target: str) -> bool:
    """Is this gRPC target on this machine: a loopback address, localhost or a Unix socket?
    Accepts host:port, [v6]:port and the resolver forms dns:///host:port, ipv4:…, ipv6:…"""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if "," in target:  # ipv4:/ipv6: lists: one remote address among them is enough to refuse
        return False
    address = target.rsplit("/", 1)[-1]  # dns:///host:port, dns://resolver/host:port
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        address = address.removeprefix(scheme)
    if address.startswith("["):
        host = address[1 : address.find("]")]
    elif address.count(":") == 1:
        host = address.rsplit(":", 1)[0]
    else:
        host = address  # no port, or a bare IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AgentIdClient:
    """Calls agentid with one credential (a user's IdP token, an agent token or an API key).

    The connection: ``tls`` (``grpc.ssl_channel_credentials(...)``: the CA that signed agentid's
    certificate, and this caller's certificate where agentid wants mTLS), or plaintext, which is
    allowed to a target on this machine only (``plaintext=True`` lifts that, for a network that
    encrypts by itself, such as a service mesh): the credential travels with every call. Or a
    ``channel`` of your own.

    ``proof_key``: for an agent token bound to the agent's key (Delegate's ``jkt``), that private
    key (P-256 or Ed25519); every call then carries a fresh DPoP proof of it (RFC 9449), which
    agentid requires of a bound token.

    Use as an async context manager, or call ``close()``.
    """

    def __init__(
        self,
        target: str,
        credential: str,
        *,
        tls: grpc.ChannelCredentials | None = None,
        plaintext: bool = False,
        channel: grpc.aio.Channel | None = None,
        proof_key: ProofKey | None = None,
    ) -> None:
        if channel is None:
            if tls is not None:
                channel = grpc.aio.secure_channel(target, tls, options=channel_options())
            elif plaintext or is_local_target(target):
                channel = grpc.aio.insecure_channel(target, options=channel_options())
            else:
                raise ValueError(
                    f"{target} is not on this machine: connect with TLS (tls=...), or say "
                    "plaintext=True if the network encrypts by itself; the credential would "
                    "travel in the clear"
                )
            self._own_channel = True
        else:
            self._own_channel = False
        self._target = target
        self._channel = channel
        self._stub = agentid_pb2_grpc.AgentIdentityServiceStub(self._channel)
        self._credential = credential
        self._proof_key = proof_key
        if proof_key is not None:
            proof_algorithm(proof_key)  # ValueError now for a key that cannot sign proofs
            # agentid checks the path of a proof's htu; the host is the target's (a gRPC target
            # may carry a resolver scheme, as in dns:///host:port, which is no part of a URL).
            self._htu = f"https://{target.rsplit('/', 1)[-1]}{SERVICE_PATH}"

    async def __aenter__(self) -> AgentIdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close(None)

    def with_credential(
        self, credential: str, *, proof_key: ProofKey | None = None
    ) -> AgentIdClient:
        """A client on this one's connection with another credential (say, the agent token a
        service was shown, to ask StepUp for that agent). Closing it leaves the connection
        open; it lives as long as this client's."""
        return AgentIdClient(self._target, credential, channel=self._channel, proof_key=proof_key)

    async def delegate(
        self,
        agent_id: str,
        scopes: Sequence[str],
        *,
        ttl: timedelta | None = None,
        task: str = "",
        audiences: Sequence[str] = (),
        jkt: str = "",
        actor_token: str = "",
    ) -> pb.DelegateResponse:
        """A new agent session with a subset of the caller's scopes. ``actor_token``: the
        agent's client assertion (RFC 7523), required when the agent has keys."""
        request = pb.DelegateRequest(
            agent_id=agent_id,
            scopes=list(scopes),
            task=task,
            audiences=list(audiences),
            jkt=jkt,
            actor_token=actor_token,
        )
        if ttl is not None:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl.total_seconds())))
        response: pb.DelegateResponse = await self._call("Delegate", request)
        return response

    async def check(
        self,
        token: str,
        action: str,
        resource: str = "",
        *,
        context: Mapping[str, Any] | None = None,
        min_revocation_sequence: int = 0,
        pop_proof: str = "",
        pop_method: str = "",
        pop_uri: str = "",
    ) -> pb.CheckResponse:
        """May the agent holding ``token`` do ``action`` on ``resource``? For a token bound to
        the agent's key (``cnf.jkt``), ``pop_proof`` is the DPoP proof the agent sent with it,
        for the request's ``pop_method`` and ``pop_uri``."""
        request = pb.CheckRequest(
            token=token,
            action=action,
            resource=resource,
            min_revocation_sequence=min_revocation_sequence,
            pop_proof=pop_proof,
            pop_method=pop_method,
            pop_uri=pop_uri,
        )
        if context is not None:
            request.context.CopyFrom(_struct(context))
        response: pb.CheckResponse = await self._call("Check", request)
        return response

    async def revoke(
        self, *, session_id: str = "", user_id: str = "", agent_id: str = "", reason: str = ""
    ) -> pb.RevokeResponse:
        """Revokes a session and its descendants, every live session of a user, or every live
        session of an agent (role admin, or one of its owners). One target: naming two is a
        ValueError here (the request holds one), naming none the server's INVALID_ARGUMENT."""
        targets = {"session_id": session_id, "user_id": user_id, "agent_id": agent_id}
        named = {name: value for name, value in targets.items() if value}
        if len(named) > 1:
            raise ValueError(f"revoke names one target, not {' and '.join(named)}")
        request = pb.RevokeRequest(reason=reason, **named)
        response: pb.RevokeResponse = await self._call("Revoke", request)
        return response

    async def list_sessions(
        self,
        *,
        user_id: str = "",
        agent_id: str = "",
        include_ended: bool = False,
        page_size: int = 0,
    ) -> AsyncGenerator[pb.Session, None]:
        """Sessions the caller may see, newest first, page after page (``page_size`` per call,
        0 = the server's 100): a user's own, an agent's own and its descendants', or, with role
        audit or admin, anyone's; live ones only unless ``include_ended``."""
        request = pb.ListSessionsRequest(
            user_id=user_id, agent_id=agent_id, include_ended=include_ended, page_size=page_size
        )
        while True:
            response: pb.ListSessionsResponse = await self._call("ListSessions", request)
            for session in response.sessions:
                yield session
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def create_agent(
        self,
        agent_id: str,
        max_scopes: Sequence[str],
        *,
        display_name: str = "",
        description: str = "",
        owners: Sequence[str] = (),
        max_ttl: timedelta | None = None,
        jwks_json: str = "",
    ) -> pb.Agent:
        """Registers a new agent (role admin): the scopes it may ever be granted, its sessions'
        longest lifetime (None: the server's ``tokens.max_ttl``), the users accountable for it,
        and the JWK Set its client assertions are signed with ("": none)."""
        agent = pb.Agent(
            id=agent_id,
            max_scopes=list(max_scopes),
            display_name=display_name,
            description=description,
            owners=list(owners),
            jwks_json=jwks_json,
        )
        if max_ttl is not None:
            agent.max_ttl.FromTimedelta(max_ttl)
        response: pb.CreateAgentResponse = await self._call(
            "CreateAgent", pb.CreateAgentRequest(agent=agent)
        )
        return response.agent

    async def get_agent(self, agent_id: str) -> pb.Agent:
        """One agent (role admin or audit, or one of its owners)."""
        response: pb.GetAgentResponse = await self._call(
            "GetAgent", pb.GetAgentRequest(id=agent_id)
        )
        return response.agent

    async def list_agents(
        self, *, include_disabled: bool = False, page_size: int = 0
    ) -> AsyncGenerator[pb.Agent, None]:
        """The registered agents, page after page (``page_size`` per call, 0 = the server's
        default); disabled ones only with ``include_disabled``."""
        request = pb.ListAgentsRequest(include_disabled=include_disabled, page_size=page_size)
        while True:
            response: pb.ListAgentsResponse = await self._call("ListAgents", request)
            for agent in response.agents:
                yield agent
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def update_agent(self, agent: pb.Agent, update_mask: Sequence[str]) -> pb.Agent:
        """Changes the fields of ``agent`` (found by its ``id``) named in ``update_mask``
        (field names: ``display_name``, ``max_scopes``, ...), and only those: a field named but
        left empty in ``agent`` is cleared. An agent defined in the config is refused."""
        request = pb.UpdateAgentRequest(agent=agent)
        request.update_mask.paths.extend(update_mask)
        response: pb.UpdateAgentResponse = await self._call("UpdateAgent", request)
        return response.agent

    async def disable_agent(self, agent_id: str, reason: str = "") -> pb.DisableAgentResponse:
        """The kill switch: the agent can no longer be delegated to, and every live session of
        it (with their descendants) is revoked before the answer, which names them."""
        request = pb.DisableAgentRequest(id=agent_id, reason=reason)
        response: pb.DisableAgentResponse = await self._call("DisableAgent", request)
        return response

    async def enable_agent(self, agent_id: str) -> pb.Agent:
        """A disabled agent may be delegated to again (its revoked sessions stay revoked)."""
        response: pb.EnableAgentResponse = await self._call(
            "EnableAgent", pb.EnableAgentRequest(id=agent_id)
        )
        return response.agent

    async def retire_signing_key(self, kid: str, reason: str = "") -> pb.RetireSigningKeyResponse:
        """Withdraws a compromised signing key (role admin): its tokens stop verifying and it
        leaves the JWKS; if it was signing, a new key signs from now on."""
        request = pb.RetireSigningKeyRequest(kid=kid, reason=reason)
        response: pb.RetireSigningKeyResponse = await self._call("RetireSigningKey", request)
        return response

    async def step_up(
        self,
        action: str,
        resource: str = "",
        *,
        context: Mapping[str, Any] | None = None,
        binding_message: str = "",
    ) -> pb.StepUp:
        """As an agent: asks the delegating user to approve one high-risk action."""
        request = pb.StepUpRequest(
            action=action, resource=resource, binding_message=binding_message
        )
        if context is not None:
            request.context.CopyFrom(_struct(context))
        response: pb.StepUpResponse = await self._call("StepUp", request)
        return response.step_up

    async def resolve_step_up(
        self, step_up_id: str, *, approve: bool, comment: str = ""
    ) -> pb.StepUp:
        """As the delegating user (with a fresh IdP login): approves or denies a step-up."""
        request = pb.ResolveStepUpRequest(step_up_id=step_up_id, approve=approve, comment=comment)
        response: pb.ResolveStepUpResponse = await self._call("ResolveStepUp", request)
        return response.step_up

    async def watch_step_ups(
        self, step_up_id: str = "", *, current_only: bool = False
    ) -> AsyncIterator[pb.StepUp]:
        """The caller's step-ups (a user's inbox, an agent's own): current state, then changes."""
        request = pb.WatchStepUpsRequest(step_up_id=step_up_id, current_only=current_only)
        try:
            metadata = self._metadata("WatchStepUps")
            async for response in self._stub.WatchStepUps(request, metadata=metadata):
                yield response.step_up
        except grpc.aio.AioRpcError as error:
            raise AgentIdError.from_rpc_error(error) from None

    async def audit(self, request: pb.AuditRequest) -> AsyncIterator[pb.AuditRecord]:
        """Audit records matching ``request`` (by session, by user, filters, cursor, follow)."""
        try:
            async for response in self._stub.Audit(request, metadata=self._metadata("Audit")):
                yield response.record
        except grpc.aio.AioRpcError as error:
            raise AgentIdError.from_rpc_error(error) from None

    async def verify_audit(
        self,
        from_id: int = 0,
        to_id: int = 0,
        *,
        checkpoints: Sequence[str] = (),
        checkpoint_now: bool = False,
    ) -> pb.VerifyAuditResponse:
        """Recomputes the hash chain over [from_id, to_id] (0 = from the first / to the last)
        and checks its checkpoints, and ``checkpoints`` kept from earlier (their one-line JSON);
        ``checkpoint_now`` signs the server's chain head first (returned in the answer)."""
        request = pb.VerifyAuditRequest(
            from_id=from_id, to_id=to_id, checkpoints=checkpoints, checkpoint_now=checkpoint_now
        )
        response: pb.VerifyAuditResponse = await self._call("VerifyAudit", request)
        return response

    async def jwks(self) -> str:
        """The JWK Set (JSON) that verifies agent tokens."""
        response: pb.GetJwksResponse = await self._call("GetJwks", pb.GetJwksRequest())
        return response.jwks_json

    async def jwk_set(self) -> jwt.PyJWKSet:
        """The JWK Set that verifies agent tokens, parsed: PyJWT keys by ``kid``
        (``agentid_client.tokens.TokenVerifier`` verifies tokens with them)."""
        return parse_jwks(await self.jwks())

    async def _call(self, name: str, request: Any) -> Any:
        method = getattr(self._stub, name)
        try:
            return await method(request, metadata=self._metadata(name))
        except grpc.aio.AioRpcError as error:
            raise AgentIdError.from_rpc_error(error) from None

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        metadata = [("authorization", f"Bearer {self._credential}")]
        if self._proof_key is not None:
            metadata.append(("dpop", self._proof(method)))
        # The caller's trace, when it has one (OpenTelemetry), so agentid's span of this call
        # joins it: W3C traceparent/tracestate only, never baggage.
        if _TRACE_CONTEXT is not None:
            trace_context: dict[str, str] = {}
            _TRACE_CONTEXT.inject(trace_context)
            metadata.extend(trace_context.items())
        return tuple(metadata)

    def _proof(self, method: str) -> str:
        """A DPoP proof for one call: htm POST, htu the method's URL, ath the token's hash."""
        assert self._proof_key is not None
        return dpop_proof(self._proof_key, "POST", self._htu + method, self._credential)


class ContextError(TypeError):
    """A ``context`` that google.protobuf.Struct cannot carry (``path`` says where): raised
    before anything is sent, never an empty or changed context in its place."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"context{path}: {what} cannot be sent in a google.protobuf.Struct")
        self.path = path


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Check or StepUp ``context``: JSON's values only (str keys; str, finite numbers,
    bool, None, lists and mappings of them), as agentid records it."""
    _check_context(values, "")
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct


def _check_context(value: Any, path: str, depth: int = 0) -> None:
    if depth > 64:
        raise ContextError(path, "nesting deeper than 64")
    if value is None or isinstance(value, str | bool):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ContextError(path, f"{value!r} (not a finite number)")
        return
    if isinstance(value, int):
        if abs(value) > 2**53:  # a Struct's numbers are doubles: it would arrive changed
            raise ContextError(path, f"{value} (an integer beyond 2**53)")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ContextError(path, f"the key {key!r} (keys must be strings)")
            _check_context(item, f"{path}.{key}", depth + 1)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_context(item, f"{path}[{index}]", depth + 1)
        return
    raise ContextError(path, f"a {type(value).__name__}")

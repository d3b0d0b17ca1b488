"""The Python MCP guard (agentid_client.mcp) with the official `mcp` SDK on both sides: its own
Client over streamable HTTP (the 2026-07-28 protocol, and the handshake era with mode="legacy")
against an MCPServer protected by McpGuard and served by uvicorn, and a real agentid (gRPC for
Check, StepUp and the watcher; its HTTP door for the JWKS and token exchange)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx2
import jwt
import pytest
import uvicorn
from agentid.v1 import agentid_pb2 as pb
from agentid_client import AgentIdClient, RevocationWatcher
from agentid_client.dpop import dpop_proof
from agentid_client.mcp import (
    TOOL_CALL_REFUSED,
    AgentAuth,
    ExchangedToken,
    McpGuard,
    TokenExchangeError,
    exchange_token,
)
from agentid_server.tokens.callers import api_key_digest
from cryptography.hazmat.primitives.asymmetric import ec
from mcp import Client, MCPError
from mcp.client.context import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp_types import (
    URL_ELICITATION_REQUIRED,
    ElicitRequestParams,
    ElicitRequestURLParams,
    ElicitResult,
    ErrorData,
    TextContent,
)

from tests.conftest import (
    ADMIN_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    free_port,
    running_harness,
    with_config,
)
from tests.security.test_client_assertions import AGENT as KEYED_AGENT
from tests.security.test_client_assertions import AgentKeys, keyed

MCP_KEY = "test-mcp-checker-key-0123456789"
USER_SCOPES = "mcp.tools.* payments.transfer tickets.read"
AGENT_SCOPES = "mcp.tools.add mcp.tools.whoami payments.transfer"
RULES = [{"name": "large-transfer", "action": "payments.transfer", "when": "context.amount > 1000"}]


@dataclass
class World:
    """agentid, and the MCP server `tools` at ``url`` protected by ``guard``."""

    h: Harness
    url: str
    door: str
    guard: McpGuard
    ran: list[str] = field(default_factory=list)  # the tools that ran, in order

    def user_token(self, **claims: Any) -> str:
        return self.h.idp.token(scope=USER_SCOPES, **claims)

    async def agent_token(
        self, *, resource: str | None = None, proof_key: ec.EllipticCurvePrivateKey | None = None
    ) -> ExchangedToken:
        return await exchange_token(
            self.door + "/oauth2/token",
            client_id="support-bot",
            subject_token=self.user_token(),
            resource=resource or self.url,
            scope=AGENT_SCOPES,
            proof_key=proof_key,
        )

    @contextlib.asynccontextmanager
    async def client(
        self,
        auth: httpx2.Auth,
        answers: list[httpx2.Response] | None = None,
        **options: Any,
    ) -> AsyncIterator[Client]:
        """The SDK's Client over streamable HTTP, sending ``auth``; every HTTP answer it gets
        is appended to ``answers``."""
        seen = answers if answers is not None else []

        async def record(response: httpx2.Response) -> None:
            seen.append(response)

        async with (
            httpx2.AsyncClient(auth=auth, event_hooks={"response": [record]}) as http,
            Client(streamable_http_client(self.url, http_client=http), **options) as client,
        ):
            yield client

    async def resolve(self, step_up_id: str, approve: bool = True) -> None:
        """The user approves (or denies) with a fresh login, as the console or the CLI would."""
        fresh = self.user_token(auth_time=int(self.h.clock.now()))
        request = pb.ResolveStepUpRequest(step_up_id=step_up_id, approve=approve)
        await self.h.stub.ResolveStepUp(request, metadata=bearer(fresh))

    async def checks(self, session_id: str) -> list[pb.AuditRecord]:
        request = pb.AuditRequest(session_id=session_id, event_types=[pb.EVENT_TYPE_CHECK])
        stream = self.h.stub.Audit(request, metadata=bearer(ADMIN_KEY))
        return [answer.record async for answer in stream]


def mcp_config(url: str, door: str) -> Callable[[dict[str, Any]], None]:
    """The test config, plus the MCP server's checker service (audience: its URL), a risk rule,
    mcp.* for support-bot, and the HTTP door at a known port, its URL the issuer (the token
    endpoint's DPoP htu is built from it)."""

    def mutate(config: dict[str, Any]) -> None:
        with_config(
            http={"listen": door.removeprefix("http://")},
            tokens={"issuer": door},
            risk=RULES,  # type: ignore[arg-type]
        )(config)
        config["services"].append(
            {"name": "mcp-tools", "key_sha256": api_key_digest(MCP_KEY), "roles": ["check", "watch"],
             "audience": url}
        )  # fmt: skip
        config["agents"][0]["max_scopes"].append("mcp.*")

    return mutate


def tools_server(guard: McpGuard, ran: list[str]) -> Any:
    server = guard.mcp_server()

    @server.tool()
    def add(a: int, b: int) -> int:
        ran.append("add")
        return a + b

    @server.tool()
    def transfer(account_id: str, amount: float) -> str:
        ran.append("transfer")
        return f"sent {amount} to {account_id}"

    @server.tool()
    def delete_ticket(ticket_id: str) -> str:
        ran.append("delete_ticket")
        return f"deleted {ticket_id}"

    @server.tool()
    def whoami() -> str:
        token = get_access_token()
        assert token is not None
        return f"{token.subject} through {token.client_id}"

    guard.declare(
        "transfer", action="payments.transfer", resource="account/{account_id}", context=["amount"]
    )
    guard.declare("delete_ticket", action="tickets.delete", resource="ticket/{ticket_id}")
    return server


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # it failed to start: say why
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def world(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, *, watch: bool = True
) -> AsyncIterator[World]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    door = f"http://127.0.0.1:{free_port()}"
    async with (
        running_harness(tmp_path, idp, clock, mutate=mcp_config(url, door)) as h,
        AgentIdClient(f"127.0.0.1:{h.running.port}", MCP_KEY) as checker,
        grpc.aio.insecure_channel(f"127.0.0.1:{h.running.port}") as channel,
    ):
        watcher = RevocationWatcher(channel, MCP_KEY) if watch else None
        if watcher is not None:
            watcher.start()
            await watcher.wait_for(0)
        guard = McpGuard(
            resource_url=url,
            server_name="tools",
            issuer=door,
            client=checker,
            watcher=watcher,
        )
        ran: list[str] = []
        try:
            async with serving(tools_server(guard, ran).streamable_http_app(), sock):
                yield World(h, url, door, guard, ran)
        finally:
            if watcher is not None:
                await watcher.stop()


@pytest.fixture
async def w(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[World]:
    async with world(tmp_path, idp, clock) as the_world:
        yield the_world


def text_of(result: Any) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


def step_up_of(url: str) -> str:
    """The step-up id of an approval page's URL (the console's ?step_up=)."""
    return parse_qs(urlsplit(url).query)["step_up"][0]


async def test_the_metadata_names_agentid_and_no_token_is_401(w: World) -> None:
    async with httpx2.AsyncClient() as http:
        metadata = await http.get(w.guard.resource_metadata_url)
        refused = await http.post(w.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert metadata.status_code == 200
    assert w.guard.resource_metadata_url.endswith("/.well-known/oauth-protected-resource/mcp")
    assert metadata.json() == {
        "resource": w.url,
        "authorization_servers": [w.door],
        "bearer_methods_supported": ["header"],
        "resource_name": "tools",
        "dpop_signing_alg_values_supported": ["EdDSA", "ES256", "RS256", "PS256"],
    }
    assert refused.status_code == 401
    challenge = refused.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{w.guard.resource_metadata_url}"' in challenge


async def test_an_allowed_call_runs_and_a_denied_one_is_403(w: World) -> None:
    token = await w.agent_token()
    claims = jwt.decode(token.access_token, options={"verify_signature": False})
    assert claims["aud"] == [w.url]  # token exchange's resource is the token's audience
    answers: list[httpx2.Response] = []
    async with w.client(AgentAuth(token), answers) as client:
        assert client.protocol_version == "2026-07-28"
        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert not result.is_error
        assert result.structured_content == {"result": 5}
        assert text_of(await client.call_tool("whoami", {})) == "alice through support-bot"
        with pytest.raises(MCPError) as denied:
            await client.call_tool("delete_ticket", {"ticket_id": "7"})
    assert denied.value.code == TOOL_CALL_REFUSED
    assert denied.value.data["error"] == "insufficient_scope"
    assert denied.value.data["reason"] == "REASON_SCOPE_NOT_GRANTED"
    assert denied.value.data["scope"] == "tickets.delete:ticket/7"
    refusal = answers[-1]
    assert refusal.status_code == 403
    challenge = refusal.headers["WWW-Authenticate"]
    assert challenge.startswith(
        'Bearer error="insufficient_scope", scope="tickets.delete:ticket/7"'
    )
    assert f'resource_metadata="{w.guard.resource_metadata_url}"' in challenge
    assert token.access_token not in challenge
    assert w.ran == ["add"]
    # Every call was a Check: audited with the session, the user and the scope.
    records = await w.checks(claims["jti"])
    assert [(r.action, r.resource, r.decision) for r in records] == [
        ("mcp.tools.add", "", pb.DECISION_ALLOW),
        ("mcp.tools.whoami", "", pb.DECISION_ALLOW),
        ("tickets.delete", "ticket/7", pb.DECISION_DENY),
    ]
    assert {r.user_id for r in records} == {"alice"}
    assert list(records[0].scopes) == AGENT_SCOPES.split()


async def test_a_call_lacking_a_declared_argument_is_refused_without_a_check(w: World) -> None:
    token = await w.agent_token()
    answers: list[httpx2.Response] = []
    async with w.client(AgentAuth(token), answers) as client:
        for arguments in (
            {"amount": 5},  # no account_id for the resource
            {"account_id": "a/b", "amount": 5},  # two segments where the template has one
            {"account_id": "42", "amount": 2**60},  # a Check's context would round it
        ):
            with pytest.raises(MCPError) as refused:
                await client.call_tool("transfer", arguments)
            assert refused.value.code == -32602  # INVALID_PARAMS
            assert answers[-1].status_code == 400
    session = jwt.decode(token.access_token, options={"verify_signature": False})["jti"]
    assert await w.checks(session) == []
    assert w.ran == []


async def test_step_up_by_url_elicitation_then_approved_once(w: World) -> None:
    token = await w.agent_token()
    asked: list[ElicitRequestURLParams] = []
    approve = True

    async def elicit(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        assert isinstance(params, ElicitRequestURLParams)
        asked.append(params)
        if approve:  # the user opens the page and approves there (here: ResolveStepUp)
            await w.resolve(step_up_of(params.url))
        return ElicitResult(action="accept")

    async with w.client(AgentAuth(token), elicitation_callback=elicit) as client:
        sent = await client.call_tool("transfer", {"account_id": "42", "amount": 5000})
        assert text_of(sent) == "sent 5000.0 to 42"
        approve = False  # the approval was consumed: the same call needs a new one
        again = await client.call_tool("transfer", {"account_id": "42", "amount": 5000})
    assert again.is_error
    first, second = (step_up_of(p.url) for p in asked)
    assert first != second
    assert second in text_of(again)
    assert asked[0].url == f"{w.door}/console/step-ups?step_up={first}"
    assert w.ran == ["transfer"]
    session = jwt.decode(token.access_token, options={"verify_signature": False})["jti"]
    reasons = [r.reason for r in await w.checks(session)]
    assert reasons.count(pb.REASON_STEP_UP_APPROVED) == 1


async def test_step_up_in_the_handshake_era_is_a_url_elicitation_error(w: World) -> None:
    token = await w.agent_token()

    async def elicit(context: ClientRequestContext, params: ElicitRequestParams) -> ErrorData:
        raise AssertionError("the 2025-11-25 answer is an error, not a request")

    async with w.client(AgentAuth(token), mode="legacy", elicitation_callback=elicit) as client:
        assert client.protocol_version == "2025-11-25"
        arguments = {"account_id": "42", "amount": 5000}
        with pytest.raises(MCPError) as needed:
            await client.call_tool("transfer", arguments)
        assert needed.value.code == URL_ELICITATION_REQUIRED
        (elicitation,) = needed.value.data["elicitations"]
        step_up_id = elicitation["elicitationId"]
        assert elicitation["mode"] == "url"
        assert elicitation["url"] == f"{w.door}/console/step-ups?step_up={step_up_id}"
        await w.resolve(step_up_id)
        assert text_of(await client.call_tool("transfer", arguments)) == "sent 5000.0 to 42"
        with pytest.raises(MCPError) as again:
            await client.call_tool("transfer", arguments)
    assert again.value.data["elicitations"][0]["elicitationId"] != step_up_id
    assert w.ran == ["transfer"]


async def test_step_up_without_elicitation_is_a_tool_error_naming_it(w: World) -> None:
    token = await w.agent_token()
    async with w.client(AgentAuth(token)) as client:
        arguments = {"account_id": "42", "amount": 5000}
        needed = await client.call_tool("transfer", arguments)
        assert needed.is_error
        text = text_of(needed)
        step_up_id = text.split("agentid step-up ", 1)[1].split(",", 1)[0]
        assert f"{w.door}/console/step-ups?step_up={step_up_id}" in text
        await w.resolve(step_up_id, approve=False)  # the user says no
        with pytest.raises(MCPError) as denied:
            await client.call_tool("transfer", arguments)
    assert denied.value.data["reason"] == "REASON_STEP_UP_DENIED"
    assert w.ran == []


@pytest.mark.parametrize("watch", [True, False], ids=["watcher", "check"])
async def test_a_revoked_session_is_refused_on_its_next_call(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, watch: bool
) -> None:
    async with world(tmp_path, idp, clock, watch=watch) as w:
        token = await w.agent_token()
        session = jwt.decode(token.access_token, options={"verify_signature": False})["jti"]
        answers: list[httpx2.Response] = []
        async with w.client(AgentAuth(token), answers) as client:
            assert (await client.call_tool("add", {"a": 1, "b": 1})).structured_content
            revoked = await w.h.stub.Revoke(
                pb.RevokeRequest(session_id=session), metadata=bearer(w.user_token())
            )
            with pytest.raises(MCPError):
                await client.call_tool("add", {"a": 1, "b": 1})
        refusal = answers[-1]
        assert refusal.status_code == 401
        assert 'error="invalid_token"' in refusal.headers["WWW-Authenticate"]
        checks = await w.checks(session)
        # With the watcher, the server knew before asking: no Check for the refused call.
        assert len(checks) == (1 if watch else 2)
        assert revoked.session_ids == [session]


async def refused_at_connect(
    w: World, auth: httpx2.Auth, answers: list[httpx2.Response] | None = None
) -> list[int]:
    """Connecting with ``auth`` fails (the SDK's client raises the error of its first request
    out of its task group); the HTTP statuses it got (the answers in ``answers``)."""
    answers = [] if answers is None else answers
    with pytest.RaisesGroup(MCPError, flatten_subgroups=True):
        async with w.client(auth, answers):
            pass
    assert answers
    return [answer.status_code for answer in answers]


async def test_a_token_for_another_resource_is_refused_401(w: World) -> None:
    other = await w.agent_token(resource="https://other.example/mcp")
    assert set(await refused_at_connect(w, AgentAuth(other))) == {401}
    # No audience at all (a token for any service) is not one for this server either.
    anywhere = await w.h.delegate(w.user_token(), scopes=["mcp.tools.add"])
    assert set(await refused_at_connect(w, AgentAuth(anywhere.token))) == {401}
    assert w.ran == []


class ReplayingAuth(AgentAuth):
    """Sends the first DPoP proof it made with every later tools/call (a thief's replay)."""

    def __init__(self, token: ExchangedToken, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(token, proof_key=key)
        self.kept: str | None = None

    def auth_flow(self, request: httpx2.Request) -> Any:
        for sent in super().auth_flow(request):
            if b'"tools/call"' in sent.content:
                self.kept = self.kept or sent.headers["DPoP"]
                sent.headers["DPoP"] = self.kept
            yield sent


class OddProofAuth(AgentAuth):
    """A bound token sent with the scheme given and a proof of the wrong kind: none, one for
    another URL, or one for this URL made with another key."""

    def __init__(self, token: ExchangedToken, scheme: str, proof: str) -> None:
        super().__init__(token)
        self._scheme, self._proof, self._raw = scheme, proof, token.access_token

    def auth_flow(self, request: httpx2.Request) -> Any:
        request.headers["Authorization"] = f"{self._scheme} {self._raw}"
        if self._proof:
            request.headers["DPoP"] = self._proof
        yield request


async def test_a_dpop_bound_token_works_with_its_proofs_only(w: World) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = await w.agent_token(proof_key=key)
    assert token.token_type == "DPoP"
    async with w.client(AgentAuth(token, proof_key=key)) as client:
        assert (await client.call_tool("add", {"a": 20, "b": 22})).structured_content == {
            "result": 42
        }
    answers: list[httpx2.Response] = []
    async with w.client(ReplayingAuth(token, key), answers) as client:
        assert (await client.call_tool("add", {"a": 1, "b": 2})).structured_content
        with pytest.raises(MCPError):
            await client.call_tool("add", {"a": 1, "b": 2})
    assert answers[-1].status_code == 401
    assert (
        answers[-1]
        .headers["WWW-Authenticate"]
        .startswith(
            'DPoP error="invalid_dpop_proof", error_description="the DPoP proof was used already", '
            'algs="EdDSA ES256 RS256 PS256", resource_metadata="'
        )
    )
    session = jwt.decode(token.access_token, options={"verify_signature": False})["jti"]
    checks_made = len(await w.checks(session))
    thief = ec.generate_private_key(ec.SECP256R1())
    odd = {
        ("DPoP", ""): 'DPoP error="invalid_dpop_proof", error_description="the token is bound',
        ("Bearer", ""): 'DPoP error="invalid_token", error_description="a DPoP-bound token goes',
        ("DPoP", "elsewhere"): 'DPoP error="invalid_dpop_proof", error_description="the DPoP '
        "proof is for another URI",
        ("DPoP", "thief"): 'DPoP error="invalid_dpop_proof", error_description="the DPoP proof '
        "key is not the key the token is bound to",
    }
    for (scheme, kind), challenge in odd.items():
        proof = {
            "": "",
            "elsewhere": dpop_proof(
                key, "POST", "https://elsewhere.example/mcp", token.access_token
            ),
            "thief": dpop_proof(thief, "POST", w.url, token.access_token),
        }[kind]
        answers.clear()
        assert set(await refused_at_connect(w, OddProofAuth(token, scheme, proof), answers)) == {
            401
        }
        assert answers[0].headers["WWW-Authenticate"].startswith(challenge)
    assert w.ran == ["add", "add"]
    assert len(await w.checks(session)) == checks_made  # refused before any Check


async def test_agentid_unreachable_is_503_not_a_verdict_on_the_token(w: World) -> None:
    """The keys cannot be read: whether the token is good is not known, so the request is
    refused for now, not the token (no 401 an agent would take for a bad token)."""
    async with AgentIdClient(f"127.0.0.1:{w.h.running.port}", MCP_KEY) as client:
        blind = McpGuard(
            resource_url=w.url, server_name="tools", issuer=w.door, client=client,
            keys=f"http://127.0.0.1:{free_port()}/jwks.json",
        )  # fmt: skip
        app = blind.mcp_server().streamable_http_app()
        token = await w.agent_token()
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, auth=AgentAuth(token)) as http:
            answer = await http.post(w.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    assert answer.json()["error"] == "temporarily_unavailable"
    assert token.access_token not in answer.text


async def test_a_tool_call_that_bypasses_the_http_layer_is_refused(w: World) -> None:
    """In process (the SDK's in-memory transport), nothing was checked: the interceptor says no."""
    server = w.guard.mcp_server("in-process")

    @server.tool()
    def add(a: int, b: int) -> int:
        w.ran.append("add")
        return a + b

    async with Client(server) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("add", {"a": 1, "b": 2})
    assert "not checked by agentid" in refused.value.message
    assert w.ran == []


async def test_token_exchange_refusals_are_oauth_errors(w: World) -> None:
    with pytest.raises(TokenExchangeError) as refused:
        await exchange_token(
            w.door + "/oauth2/token",
            client_id="support-bot",
            subject_token=w.user_token(),
            resource=w.url,
            scope="payments.refund.everything",
        )
    assert refused.value.status == 400
    assert refused.value.error == "invalid_scope"


DOCS = Path(__file__).resolve().parents[2] / "docs" / "mcp.md"
SNIPPET = re.compile(
    r"^<!-- mcp-python: (\w+) -->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL
)


async def test_the_docs_python_snippets_run_as_written(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """docs/mcp.md's tool server and agent, as written, each its own process: the agent's
    call is checked and runs. Only the environment they read differs."""
    snippets = dict(SNIPPET.findall(DOCS.read_text()))
    assert set(snippets) == {"server", "agent"}
    port = free_port()
    url, door = f"http://127.0.0.1:{port}/mcp", f"http://127.0.0.1:{free_port()}"
    root = DOCS.parents[1]
    async with running_harness(tmp_path, idp, clock, mutate=mcp_config(url, door)) as h:
        for name, code in snippets.items():
            (tmp_path / f"{name}.py").write_text(code)
        env = {
            **os.environ,
            # This checkout's packages, wherever the interpreter's editable installs point.
            "PYTHONPATH": os.pathsep.join([str(root / "clients" / "python"), str(root / "server")]),
            "AGENTID_TARGET": f"127.0.0.1:{h.running.port}",
            "CHECK_KEY": MCP_KEY,
            "AGENTID_ISSUER": door,
            "MCP_URL": url,
            "PORT": str(port),
            "USER_TOKEN": idp.token(scope=USER_SCOPES),
        }
        log = tmp_path / "server.log"
        with log.open("wb") as server_log:
            server = await asyncio.create_subprocess_exec(
                sys.executable, "server.py", cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=server_log,
            )  # fmt: skip
        try:
            await listening(port, server, log)
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "agent.py", cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(agent.communicate(), 60)
            assert agent.returncode == 0, err.decode()
            assert out.decode() == "sent 50.0 to 42\n"
        finally:
            server.terminate()
            await server.wait()


async def listening(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    """Waits (30 s at most) until the process accepts connections on the port."""
    for _ in range(300):
        if process.returncode is not None:
            raise AssertionError(f"it exited: {log.read_text()}")  # noqa: ASYNC240
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()}")  # noqa: ASYNC240


@pytest.mark.parametrize("kid", ["agent-rsa", "agent-ec", "agent-ed"])
async def test_an_agent_with_keys_exchanges_with_its_client_assertion(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, kid: str
) -> None:
    agent_keys = AgentKeys(tmp_path / "agent-jwks.json", clock)
    url, door = "https://tools.example/mcp", f"http://127.0.0.1:{free_port()}"

    def mutate(config: dict[str, Any]) -> None:
        mcp_config(url, door)(config)
        keyed(agent_keys)(config)

    async with running_harness(tmp_path, idp, clock, mutate=mutate):
        ask = {
            "client_id": KEYED_AGENT, "subject_token": idp.token(scope=USER_SCOPES),
            "resource": url, "scope": "tickets.read",
        }  # fmt: skip
        with pytest.raises(TokenExchangeError) as refused:
            await exchange_token(door + "/oauth2/token", **ask)
        assert (refused.value.status, refused.value.error) == (401, "invalid_client")
        token = await exchange_token(
            door + "/oauth2/token", **ask, assertion_key=agent_keys.keys[kid], assertion_kid=kid
        )
    claims = jwt.decode(token.access_token, options={"verify_signature": False})
    assert (claims["act"]["sub"], claims["aud"], token.scope) == (
        KEYED_AGENT,
        [url],
        "tickets.read",
    )

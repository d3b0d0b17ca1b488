"""The TypeScript MCP guard (@agentid/client/mcp) with the official TypeScript MCP SDK, against
this real agentid server (gRPC for Check, StepUp and the revocation watcher; the HTTP door for
the JWKS, the token exchange and the console's URL): the `node --test` suite
clients/typescript/test/mcp.test.mjs (the SDK's own Client and StreamableHTTPClientTransport
against a protected McpServer it serves), and docs/mcp.md's TypeScript snippets as written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agentid_server.tokens.callers import api_key_digest

from tests.conftest import (
    ADMIN_KEY,
    ISSUER,
    FakeClock,
    IdpFixture,
    free_port,
    running_harness,
)
from tests.integration.test_typescript_client import PACKAGE, REPO, RISK, TIMEOUT, build, run

MCP_CHECK_KEY = "test-mcp-check-key-0123456789"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


class WallClock(FakeClock):
    """The server's clock is the machine's: the agent's client assertions and DPoP proofs are
    dated by the machine's clock while node runs (the fixture's clock stands still)."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@contextlib.asynccontextmanager
async def agentid_for_mcp(
    tmp_path: Path, idp: IdpFixture, mcp_port: int
) -> AsyncIterator[dict[str, str]]:
    """agentid with a checker service for the MCP server on `mcp_port` (its `audience` is the
    server's resource URL), the agent mcp-bot (tickets.* payments.* mcp.*), the risk rule
    large-transfer, and its HTTP door on a port chosen here, which is its public_url: where the
    agent exchanges tokens (its DPoP proofs' htu) and the console is. Yields the environment
    that tells node where everything is."""
    http_port = free_port()
    resource = f"http://127.0.0.1:{mcp_port}/mcp"
    public_url = f"http://127.0.0.1:{http_port}"

    def configure(config: dict[str, Any]) -> None:
        config["risk"] = RISK
        config["http"] = {"listen": f"127.0.0.1:{http_port}", "public_url": public_url}
        config["services"].append(
            {"name": "mcp-tools", "key_sha256": api_key_digest(MCP_CHECK_KEY),
             "roles": ["check"], "audience": resource}
        )  # fmt: skip
        config["agents"].append(
            {"id": "mcp-bot", "max_scopes": ["tickets.*", "payments.*", "mcp.*"], "max_ttl": "30m"}
        )

    async with running_harness(tmp_path, idp, WallClock(), mutate=configure) as h:
        yield {
            **os.environ,
            "AGENTID_TEST_TARGET": f"127.0.0.1:{h.running.port}",
            "AGENTID_TEST_PUBLIC_URL": public_url,
            "AGENTID_TEST_ISSUER": ISSUER,
            "AGENTID_TEST_MCP_CHECK_KEY": MCP_CHECK_KEY,
            "AGENTID_TEST_ADMIN_KEY": ADMIN_KEY,
            "AGENTID_TEST_MCP_PORT": str(mcp_port),
        }


async def test_typescript_mcp_guard_with_the_official_sdk(tmp_path: Path, idp: IdpFixture) -> None:
    await build()
    async with agentid_for_mcp(tmp_path, idp, free_port()) as env:
        # alice may grant mcp.* as well; a fresh IdP login (auth_time now) also approves.
        env["AGENTID_TEST_USER_TOKEN"] = idp.token(scope="tickets.* payments.transfer mcp.*")
        output = await run("node", "--test", "test/mcp.test.mjs", cwd=PACKAGE, env=env)
    assert re.search(r"^# fail 0$", output, re.M), output
    assert re.search(r"^# pass 10$", output, re.M), output


def doc_snippets() -> list[str]:
    """The ```js blocks of docs/mcp.md's "## TypeScript" section: the server, then the agent."""
    text = (REPO / "docs" / "mcp.md").read_text()
    section = text.split("\n## TypeScript\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```js\n(.*?)```", section, re.S)


async def test_the_docs_typescript_snippets_run_as_written(tmp_path: Path, idp: IdpFixture) -> None:
    await build()
    server_code, agent_code = doc_snippets()
    mcp_port = free_port()
    # Inside the package: `@agentid/client` is the package itself, the SDK its node_modules'.
    folder = PACKAGE / f".snippets-{os.getpid()}"
    folder.mkdir()
    try:
        (folder / "server.mjs").write_text(server_code)
        (folder / "agent.mjs").write_text(agent_code)
        async with agentid_for_mcp(tmp_path, idp, mcp_port) as test_env:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
            env.update(
                AGENTID_TARGET=test_env["AGENTID_TEST_TARGET"],
                AGENTID_API_KEY=MCP_CHECK_KEY,
                AGENTID_ISSUER=ISSUER,
                AGENTID_PUBLIC_URL=test_env["AGENTID_TEST_PUBLIC_URL"],
                MCP_URL=f"http://127.0.0.1:{mcp_port}/mcp",
                MCP_PORT=str(mcp_port),
                USER_TOKEN=idp.token(),
            )
            async with node_server(folder / "server.mjs", mcp_port, env):
                output = await run("node", "agent.mjs", cwd=folder, env=env)
    finally:
        shutil.rmtree(folder)
    lines = output.splitlines()
    assert lines[0] == "sent 50 from 42", output
    public_url = re.escape(test_env["AGENTID_TEST_PUBLIC_URL"])
    assert re.fullmatch(
        r"Your user's approval is needed for transfer on payments: agentid step-up (stp_\w+), "
        rf"to approve at {public_url}/console/step-ups\?step_up=\1\. "
        r"Call the tool again once it is approved\.",
        lines[1],
    ), output
    assert len(lines) == 2, output


@contextlib.asynccontextmanager
async def node_server(script: Path, port: int, env: dict[str, str]) -> AsyncIterator[None]:
    """`node script` running until the block ends, once it listens on `port`."""
    process = await asyncio.create_subprocess_exec(
        "node", script.name, cwd=script.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if process.returncode is not None:
                out = await process.stdout.read() if process.stdout else b""
                pytest.fail(f"{script.name} ended ({process.returncode}):\n{out.decode()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{script.name} did not listen on {port} within {TIMEOUT} s")
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        yield
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()

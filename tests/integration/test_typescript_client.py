"""The TypeScript client (clients/typescript, @agentid/client) against a real server: its
`node --test` suite, told where the server is and which credentials to use through AGENTID_TEST_*
variables; and the package as a user gets it (`npm pack`, installed into an empty project) running
the README's snippet."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    ISSUER,
    FakeClock,
    IdpFixture,
    run_command,
    running_harness,
)
from tests.integration.test_mtls import MtlsServer, mtls  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "clients" / "typescript"
RISK = [{"name": "large-transfer", "action": "payments.transfer", "when": "context.amount > 1000"}]
TIMEOUT = 300  # seconds, for each npm or node step

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def with_risk(config: dict[str, Any]) -> None:
    config["risk"] = RISK


async def run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """A command's output; the test fails when it fails or hangs."""
    return await run_command(*command, cwd=cwd, env=env, seconds=TIMEOUT)


async def build() -> None:
    """tsc (strict) into clients/typescript/dist, as `npm run build` and `npm pack` do."""
    if not (PACKAGE / "node_modules" / "typescript").is_dir():
        pytest.fail(
            "clients/typescript/node_modules is missing: run `make ts-check` (npm ci there)"
        )
    await run("npm", "run", "--silent", "build", cwd=PACKAGE)


async def test_typescript_client_against_a_real_server(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    mtls: MtlsServer,  # noqa: F811 (the fixture imported above)
) -> None:
    """Against a plaintext server on 127.0.0.1 and, for TLS, an mTLS one (test_mtls's: its
    certificate names localhost and 127.0.0.1, and it asks for a client certificate)."""
    await build()
    laptop = mtls.ca.issue("ts-client", x509.DNSName("ts-client.example.org"))
    pki = tmp_path / "pki"
    pki.mkdir()
    for name, data in (("ca.pem", mtls.ca.pem), ("me.pem", laptop.cert_pem),
                       ("me.key", laptop.key_pem)):  # fmt: skip
        (pki / name).write_bytes(data)
    plain = tmp_path / "plain"
    plain.mkdir()
    async with running_harness(plain, idp, clock, mutate=with_risk) as h:
        env = {
            **os.environ,
            "AGENTID_TEST_TARGET": f"127.0.0.1:{h.running.port}",
            # alice, with the test IdP's default scopes: tickets.* payments.transfer agentid.delegate
            "AGENTID_TEST_USER_TOKEN": idp.token(),
            "AGENTID_TEST_CHECK_KEY": CHECK_KEY,
            "AGENTID_TEST_ADMIN_KEY": ADMIN_KEY,
            "AGENTID_TEST_ISSUER": ISSUER,
            "AGENTID_TEST_JWKS_URL": h.http_url + "/.well-known/jwks.json",
            "AGENTID_TEST_TLS_TARGET": f"localhost:{mtls.port}",
            "AGENTID_TEST_TLS_CA": str(pki / "ca.pem"),
            "AGENTID_TEST_TLS_CERT": str(pki / "me.pem"),
            "AGENTID_TEST_TLS_KEY": str(pki / "me.key"),
        }
        # test/mcp.test.mjs has its own server (tests/integration/test_typescript_mcp.py).
        output = await run(
            "node", "--test", "test/client.test.mjs", "test/exports.test.mjs", cwd=PACKAGE, env=env
        )  # fmt: skip
    assert re.search(r"^# fail 0$", output, re.M), output
    assert re.search(r"^# pass 13$", output, re.M), output


def readme_snippet() -> str:
    """The README's TypeScript client snippet: the ```js block under "## TypeScript client"."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## TypeScript client\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```js\n(.*?)```", section, re.S)
    assert match, "no ```js block in the README's TypeScript client section"
    return match.group(1)


async def test_the_packed_client_installs_into_an_empty_project_and_runs_the_readme_snippet(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    packed = tmp_path / "packed"
    packed.mkdir()
    # prepack builds dist/; the tarball is what the registry would serve.
    await run("npm", "pack", "--silent", "--pack-destination", str(packed), cwd=PACKAGE)
    (tarball,) = packed.glob("agentid-client-*.tgz")
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "app", "private": True}))
    # Its dependencies come from the npm registry (or npm's cache), as for any user.
    await run(
        "npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefer-offline",
        str(tarball), cwd=project,
    )  # fmt: skip
    (project / "app.mjs").write_text(readme_snippet())
    server_path = tmp_path / "server"
    server_path.mkdir()
    async with running_harness(server_path, idp, clock) as h:
        session = await h.delegate(scopes=["tickets.read"])
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")},
            "AGENTID_TARGET": f"127.0.0.1:{h.running.port}",
            "AGENTID_API_KEY": CHECK_KEY,
            "AGENTID_ISSUER": ISSUER,
            "AGENT_TOKEN": session.token,
        }
        output = await run("node", "app.mjs", cwd=project, env=env)
    assert output.splitlines() == [
        "ALLOW GRANTED",
        "alice support-bot tickets.read",
        "PERMISSION_DENIED",
    ], output

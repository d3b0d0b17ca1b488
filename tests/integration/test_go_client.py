"""The Go client (clients/go) against real servers: `go test ./...` in a subprocess, told where the
servers are and which credentials to use through AGENTID_TEST_* variables. Three times: with this
machine's Go, with the oldest Go its go directive allows (the golang.org/toolchain module of that
release, from the module proxy) and with every dependency at its newest release (go get -u): the
versions go.mod requires are floors, and a caller's module may select newer ones."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    ISSUER,
    FakeClock,
    IdpFixture,
    run_command,
    running_harness,
)

GO_MODULE = Path(__file__).resolve().parents[2] / "clients" / "go"
GO_TEST_TIMEOUT = 600  # seconds; the first run downloads modules and builds gRPC
LOG_LINE = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")


def go_directive() -> str:
    """The go line of clients/go/go.mod: the oldest Go release the module builds with."""
    found = re.search(r"^go (\d+\.\d+(?:\.\d+)?)$", (GO_MODULE / "go.mod").read_text(), re.M)
    assert found, "clients/go/go.mod has no go line"
    return found.group(1)


def go_binary() -> str:
    found = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
    if found is None:
        pytest.fail(
            "Go not found (looked in PATH and /usr/local/go/bin): the Go client's tests need "
            "the Go toolchain (clients/go/go.mod says which release)"
        )
    return found


async def run_go(go: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    """`go ARGS` in cwd; its output, or the test fails."""
    return await run_command(go, *args, cwd=cwd, env=env, seconds=GO_TEST_TIMEOUT)


@pytest.mark.parametrize("variant", ["this-go", "oldest-go", "newest-modules"])
async def test_go_client_against_a_real_server(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, variant: str
) -> None:
    go = go_binary()
    module = GO_MODULE
    toolchain = {"this-go": "local", "oldest-go": f"go{go_directive()}"}.get(variant, "auto")
    env = {**os.environ, "GOTOOLCHAIN": toolchain}
    if variant == "newest-modules":
        # In a copy: every module the client's packages and tests use, at its newest release;
        # auto: a newer Go from the module proxy if one of them needs it.
        module = tmp_path / "module"
        shutil.copytree(GO_MODULE, module)
        await run_go(go, "get", "-u", "./...", cwd=module, env=env)
        await run_go(go, "mod", "tidy", cwd=module, env=env)
    version = await run_go(go, "version", cwd=module, env=env)
    if variant == "oldest-go":
        assert version.startswith(f"go version go{go_directive()} "), version
    # A second server with its own (empty) database: the Go watcher test moves a watcher there
    # to see it start over when the server's history ends before its sequence.
    other_path = tmp_path / "other"
    other_path.mkdir()
    async with (
        running_harness(tmp_path, idp, clock) as main,
        running_harness(other_path, idp, clock) as other,
    ):
        env |= {
            "AGENTID_TEST_TARGET": f"127.0.0.1:{main.running.port}",
            "AGENTID_TEST_OTHER_TARGET": f"127.0.0.1:{other.running.port}",
            # alice, with the test IdP's default scopes: tickets.* payments.transfer agentid.delegate
            "AGENTID_TEST_USER_TOKEN": idp.token(),
            "AGENTID_TEST_CHECK_KEY": CHECK_KEY,
            "AGENTID_TEST_ADMIN_KEY": ADMIN_KEY,
            "AGENTID_TEST_ISSUER": ISSUER,
            "AGENTID_TEST_JWKS_URL": main.http_url + "/.well-known/jwks.json",
        }
        output = await run_go(go, "test", "-count=1", "-timeout=300s", "./...", cwd=module, env=env)
    assert "ok  \tgithub.com/agentid-dev/agentid/clients/go/agentid" in output, output


def readme_recipe() -> list[str]:
    """The README's commands for depending on the module from another one, in order."""
    readme = (GO_MODULE.parents[1] / "README.md").read_text()
    block = readme.split("go mod init example.com/myservice", 1)[1].split("```", 1)[0]
    text = "go mod init example.com/myservice" + block.replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.strip()]


def readme_program() -> str:
    """The README's Go client program: the ```go block under "## Go client"."""
    readme = (GO_MODULE.parents[1] / "README.md").read_text()
    section = readme.split("\n## Go client\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```go\n(.*?)```", section, re.S)
    assert found, "no ```go block in the README's Go client section"
    return found.group(1)


@pytest.mark.parametrize("variant", ["this-go", "oldest-go"])
async def test_another_module_depends_on_the_client_as_the_readme_says(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, variant: str
) -> None:
    """The README's recipe in an empty module, then its program run there against a real
    server. With the oldest Go the module allows, the new module's go line stays that old."""
    go = go_binary()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")},
        "GOTOOLCHAIN": "local" if variant == "this-go" else f"go{go_directive()}",
    }
    commands = readme_recipe()
    assert [c.split()[:3] for c in commands] == [
        ["go", "mod", "init"],
        ["go", "mod", "edit"],
        ["go", "mod", "tidy"],
    ]
    service = tmp_path / "myservice"
    service.mkdir()
    (service / "main.go").write_text(readme_program())
    go_lines = []
    for command in commands:
        argv = command.replace("/path/to/agentid/clients/go", str(GO_MODULE)).split()[1:]
        await run_go(go, *argv, cwd=service, env=env)
        go_lines += re.findall(r"^go .*$", (service / "go.mod").read_text(), re.M)
    assert len(set(go_lines)) == 1, f"the recipe moved the module's go line: {go_lines}"
    if variant == "oldest-go":
        assert go_lines[0] == f"go {go_directive()}", go_lines
    server_path = tmp_path / "server"
    server_path.mkdir()
    async with running_harness(server_path, idp, clock) as h:
        session = await h.delegate(scopes=["tickets.read"])
        env |= {
            "AGENTID_TARGET": f"127.0.0.1:{h.running.port}",
            "AGENTID_API_KEY": CHECK_KEY,
            "AGENTID_ISSUER": ISSUER,
            "AGENT_TOKEN": session.token,
        }
        output = await run_go(go, "run", ".", cwd=service, env=env)
    # Less what the watcher logs (slog's default: the log package's date and time first).
    printed = [line for line in output.splitlines() if not LOG_LINE.match(line)]
    assert printed == [
        "DECISION_ALLOW REASON_GRANTED",
        "alice support-bot tickets.read",
        "PermissionDenied",
    ], output

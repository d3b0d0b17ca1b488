"""The Go client (clients/go) against real servers: `go test ./...` in a subprocess, told where the
servers are and which credentials to use through AGENTID_TEST_* variables."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, CHECK_KEY, FakeClock, IdpFixture, running_harness

GO_MODULE = Path(__file__).resolve().parents[2] / "clients" / "go"
GO_TEST_TIMEOUT = 600  # seconds; the first run downloads modules and builds gRPC


def go_binary() -> str:
    found = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin")
    if found is None:
        pytest.fail(
            "Go not found (looked in PATH and /usr/local/go/bin): the Go client's tests need "
            "the Go toolchain (clients/go/go.mod says which release)"
        )
    return found


async def test_go_client_against_a_real_server(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    go = go_binary()
    # A second server with its own (empty) database: the Go watcher test moves a watcher there
    # to see it start over when the server's history ends before its sequence.
    other_path = tmp_path / "other"
    other_path.mkdir()
    async with (
        running_harness(tmp_path, idp, clock) as main,
        running_harness(other_path, idp, clock) as other,
    ):
        env = {
            **os.environ,
            "AGENTID_TEST_TARGET": f"127.0.0.1:{main.running.port}",
            "AGENTID_TEST_OTHER_TARGET": f"127.0.0.1:{other.running.port}",
            # alice, with the test IdP's default scopes: tickets.* payments.transfer agentid.delegate
            "AGENTID_TEST_USER_TOKEN": idp.token(),
            "AGENTID_TEST_CHECK_KEY": CHECK_KEY,
            "AGENTID_TEST_ADMIN_KEY": ADMIN_KEY,
        }
        # Not subprocess.run: the servers answer on this event loop while go test runs.
        process = await asyncio.create_subprocess_exec(
            go, "test", "-count=1", "-timeout=300s", "./...",
            cwd=GO_MODULE, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), GO_TEST_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            pytest.fail(f"go test did not finish within {GO_TEST_TIMEOUT} s")
    output = out.decode(errors="replace")
    assert process.returncode == 0, f"go test failed (exit {process.returncode}):\n{output}"
    assert "ok  \tgithub.com/agentid-dev/agentid/clients/go/agentid" in output, output


def readme_recipe() -> list[str]:
    """The README's commands for depending on the module from another one, in order."""
    readme = (GO_MODULE.parents[1] / "README.md").read_text()
    block = readme.split("go mod init example.com/myservice", 1)[1].split("```", 1)[0]
    text = "go mod init example.com/myservice" + block.replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.strip()]


async def test_another_module_depends_on_the_client_as_the_readme_says(tmp_path: Path) -> None:
    go = go_binary()
    commands = readme_recipe()
    assert [c.split()[:3] for c in commands] == [
        ["go", "mod", "init"],
        ["go", "mod", "edit"],
        ["go", "mod", "tidy"],
    ]
    service = tmp_path / "myservice"
    service.mkdir()
    (service / "main.go").write_text(
        "package main\n\n"
        'import (\n\t"fmt"\n\n\t"github.com/agentid-dev/agentid/clients/go/agentid"\n)\n\n'
        "func main() {\n"
        '\tclient, err := agentid.New("127.0.0.1:1", agentid.APIKey("k"), agentid.Insecure())\n'
        "\tif err != nil {\n\t\tpanic(err)\n\t}\n"
        "\tdefer client.Close()\n"
        '\tfmt.Println("ok")\n'
        "}\n"
    )
    for command in commands:
        argv = [go, *command.replace("/path/to/agentid/clients/go", str(GO_MODULE)).split()[1:]]
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=service, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(process.communicate(), GO_TEST_TIMEOUT)
        assert process.returncode == 0, (command, out.decode(errors="replace")[-2000:])
    process = await asyncio.create_subprocess_exec(
        go,
        "run",
        ".",
        cwd=service,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), GO_TEST_TIMEOUT)
    assert (process.returncode, out.decode().strip()) == (0, "ok"), out.decode()[-2000:]

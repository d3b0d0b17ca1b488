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

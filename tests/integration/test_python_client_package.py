"""The Python client as its own distribution (clients/python, agentid-client), as a user outside
this repository gets it: installed alone into a fresh venv from its folder (a copy of it, so the
folder is shown to be self-contained and the work tree stays clean), it runs the README's snippet
against a real server, on the newest grpcio and then on the oldest its range allows. The server's
packages (SQLAlchemy, Alembic, asyncpg, ...) must not come with it.

The packages come from the package index (pip's cache makes a second run quick): without it the
test skips, saying so, unless AGENTID_REQUIRE_PYPI=1 (.ci/run), where it fails."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import CHECK_KEY, ISSUER, FakeClock, IdpFixture, run_command, running_harness

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "clients" / "python"
# The floor of the client's grpcio range: the generated stubs' GRPC_GENERATED_VERSION.
FLOOR = ("grpcio==1.78.0", "grpcio-status==1.78.0")
# Distributions of the server (and its optional telemetry) that the client must not pull in.
NOT_IN_CLIENT = ("agentid", "sqlalchemy", "alembic", "asyncpg", "aiosqlite", "opentelemetry-api")
TIMEOUT = 600  # seconds, for each pip or python step


async def run(*command: str, cwd: Path, env: dict[str, str], check: bool = True) -> str:
    """A command's output; the test fails when it hangs, or fails (with ``check``)."""
    return await run_command(*command, cwd=cwd, env=env, seconds=TIMEOUT, check=check)


def readme_snippet() -> str:
    """The README's Python client snippet: the ```python block under "## Python client"."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no ```python block in the README's Python client section"
    return match.group(1)


def installed(pip_list: str) -> dict[str, str]:
    """`pip list --format=freeze` as {normalised name: version}."""
    found = {}
    for line in pip_list.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


async def test_the_client_installs_alone_and_runs_the_readme_snippet_on_newest_and_floor_grpcio(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    # A user's environment: no AGENTID_* of the test run, nothing of this repository's venv.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTID_", "PYTHON", "VIRTUAL_ENV", "PIP_CONSTRAINT"))
    }
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    await run(base_python, "-m", "venv", str(venv), cwd=tmp_path, env=env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    try:  # the index itself, not pip's cache: a small wheel
        await run(
            *pip, "download", "--quiet", "--no-deps", "--no-cache-dir", "--dest",
            str(tmp_path / "probe"), "pyjwt==2.10.1", cwd=tmp_path, env=env, check=False,
        )  # fmt: skip
    except RuntimeError as unreachable:
        if os.environ.get("AGENTID_REQUIRE_PYPI") == "1":
            pytest.fail(
                f"AGENTID_REQUIRE_PYPI=1 but the package index is unreachable:\n{unreachable}"
            )
        reason = (str(unreachable).strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the package index is unreachable (pip download failed): {reason}")

    # The client's folder as a user has it (a copy: no build/ or egg-info in the work tree).
    folder = tmp_path / "agentid-client"
    shutil.copytree(
        PACKAGE, folder, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    await run(*pip, "install", "--quiet", str(folder), cwd=tmp_path, env=env)
    newest_line = await run(*pip, "index", "versions", "grpcio", cwd=tmp_path, env=env)
    newest = re.search(r"^grpcio \(([^)]+)\)", newest_line, re.M)
    assert newest, newest_line
    packages = installed(await run(*pip, "list", "--format=freeze", cwd=tmp_path, env=env))
    assert packages["agentid-client"] == "0.1.0"
    assert packages["grpcio"] == newest.group(1), "the client's range must allow the newest grpcio"
    assert not set(NOT_IN_CLIENT) & packages.keys(), sorted(packages)

    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(readme_snippet())
    server_path = tmp_path / "server"
    server_path.mkdir()
    async with running_harness(server_path, idp, clock) as h:
        app_env = {
            **env,
            "AGENTID_TARGET": f"127.0.0.1:{h.running.port}",
            "AGENTID_API_KEY": CHECK_KEY,
            "USER_TOKEN": idp.token(),
            "AGENTID_ISSUER": ISSUER,
        }
        expected = [
            "PERMISSION_DENIED SCOPE_ESCALATION {'scopes': 'billing.refund'}",
            "DECISION_ALLOW REASON_GRANTED",
            "revoked: False",
            "alice support-bot tickets.read",
            "revoked: True",
            "SESSION_REVOKED",
        ]
        output = await run(python, "app.py", cwd=app, env=app_env)
        assert output.splitlines() == expected, output

        # The floor of the range: the same client, grpcio and grpcio-status downgraded.
        await run(*pip, "install", "--quiet", *FLOOR, cwd=tmp_path, env=env)
        await run(*pip, "check", cwd=tmp_path, env=env)
        packages = installed(await run(*pip, "list", "--format=freeze", cwd=tmp_path, env=env))
        assert (packages["grpcio"], packages["grpcio-status"]) == ("1.78.0", "1.78.0")
        output = await run(python, "app.py", cwd=app, env=app_env)
        assert output.splitlines() == expected, output

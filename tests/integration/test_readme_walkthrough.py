"""README.md's "Walk-through with curl", run exactly as written: the blocks marked
`<!-- http-walkthrough -->`, joined, in `bash -euo pipefail`, in a folder set up the way
`make run` sets one up (`agentid dev init`, `.venv/bin/agentid`), against `agentid serve` of that
dev config. Only the addresses differ: the server listens on free ports with `tokens.issuer` to
match, and `AGENTID_URL`, the one variable the walk-through takes, points at it; the test checks
that its default is what `make run` serves. A README edit that breaks a step fails here."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from agentid_server.cli.root import DEV_AGENTID_ISSUER
from agentid_server.config import load_settings

from tests.conftest import free_port
from tests.integration.test_server import AGENTID, run_cli

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"^<!-- http-walkthrough\b[^>]*-->\n```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def walkthrough() -> str:
    """The marked blocks, in README order, as one script."""
    blocks = BLOCK.findall(README.read_text())
    assert len(blocks) == 3, "README.md: expected three ```sh blocks after <!-- http-walkthrough"
    return "\n".join(blocks)


def make_run_folder(folder: Path) -> None:
    """What `make run` leaves in the project folder that the walk-through uses: var/dev/ (dev
    init) and .venv/bin/agentid (here: this interpreter's agentid)."""
    init = run_cli("dev", "init", cwd=folder)
    assert init.returncode == 0, init.stderr
    agentid = folder / ".venv" / "bin" / "agentid"
    agentid.parent.mkdir(parents=True)
    agentid.write_text(f'#!/bin/sh\nexec {shlex.join(AGENTID)} "$@"\n')
    agentid.chmod(0o755)


def wait_until_serving(url: str, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, f"agentid serve exited: {server.communicate()[1]}"
        try:
            with urllib.request.urlopen(url + "/.well-known/jwks.json", timeout=2) as answer:  # noqa: S310 - http://127.0.0.1
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer within 30 s")


def test_the_walkthrough_defaults_to_what_make_run_serves(tmp_path: Path) -> None:
    make_run_folder(tmp_path)
    settings = load_settings(tmp_path / "var/dev/agentid.toml", {})
    assert settings.tokens.issuer == DEV_AGENTID_ISSUER
    assert f"http://{settings.http.listen}" == DEV_AGENTID_ISSUER
    assert walkthrough().startswith(f"AGENTID_URL=${{AGENTID_URL:-{DEV_AGENTID_ISSUER}}}\n")


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)"
)
def test_the_readme_curl_walkthrough_runs_as_written(tmp_path: Path) -> None:
    make_run_folder(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
    server_env = {
        **env,
        "AGENTID_SERVER_LISTEN": f"127.0.0.1:{free_port()}",
        "AGENTID_HTTP_LISTEN": url.removeprefix("http://"),
        "AGENTID_TOKENS_ISSUER": url,
        "AGENTID_SERVER_DRAIN": "0s",
    }
    server = subprocess.Popen(
        [*AGENTID, "serve", "--config", "var/dev/agentid.toml"],
        cwd=tmp_path, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until_serving(url, server)
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough()],
            cwd=tmp_path, env={**env, "AGENTID_URL": url}, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    assert ran.returncode == 0, f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"

    discovery, rest = visible_output(ran.stdout)
    assert discovery["issuer"] == url
    assert discovery["jwks_uri"] == url + "/.well-known/jwks.json"
    assert discovery["token_endpoint"] == url + "/oauth2/token"
    exchanged, active, revoked, inactive = rest
    answer = json.loads(exchanged)
    assert answer["token_type"] == "Bearer"
    assert answer["scope"] == "tickets.read"
    assert answer["access_token"].count(".") == 2
    claims = json.loads(active)
    assert claims["active"] is True
    assert claims["iss"] == url
    assert claims["sub"] == "alice"
    assert claims["client_id"] == "support-bot"
    assert claims["act"]["sub"] == "support-bot"
    assert revoked == "200"
    assert json.loads(inactive) == {"active": False}

    check_key = (tmp_path / "var/dev/check-service-key").read_text().strip()
    assert check_key not in log  # no secret in a log line
    assert answer["access_token"] not in log


def visible_output(stdout: str) -> tuple[dict[str, Any], list[str]]:
    """The discovery document (indented JSON), then one line per later step."""
    discovery, end = json.JSONDecoder().raw_decode(stdout)
    return discovery, stdout[end:].strip().splitlines()

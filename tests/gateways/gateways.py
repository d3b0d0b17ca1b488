"""Real gateways (nginx, Caddy) in front of agentid, for the tests and bench/forward_auth.py.

The configurations are docs/gateways.md's own: ``doc_block`` reads the fenced block that follows
the doc's marker line, and ``render`` swaps the doc's addresses and key placeholder for the run's
(each must be there exactly as the doc has it, so the doc and what runs cannot drift apart). Each
gateway runs in the foreground (`daemon off`, Caddy's `run`) as the current user, with every file
it writes (pid, logs, temporary files, Caddy's data) under the run's directory, on a free
loopback port, and is stopped by its process id. Standard library only: the benchmark uses it too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "gateways.md"
MARKER = "<!-- tests/gateways reads the block below (the fence after this line) and runs it. -->"
REQUIRE_GATEWAYS = "AGENTID_REQUIRE_GATEWAYS"  # .ci/run sets it: these tests never skip there
NGINX = "/usr/sbin/nginx"
CADDY_MODULE = "github.com/caddyserver/caddy/v2/cmd/caddy"
CADDY_VERSION = "v2.11.9"

# What the doc's blocks name, replaced by the run's values.
DOC_AGENTID = "127.0.0.1:8080"
DOC_SERVICE = "127.0.0.1:3000"
DOC_KEY = "AGENTID_GATEWAY_KEY"
DOC_NGINX_LISTEN = "listen 80;"
DOC_CADDY_SITE = ":80 {"


class GatewayMissing(RuntimeError):
    """The gateway's binary is not installed here; the message says how to install it."""


def doc_block(language: str) -> str:
    """The fenced block of ``language`` right after docs/gateways.md's marker line."""
    lines = DOC.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip() == MARKER and lines[index + 1].strip() == f"```{language}":
            end = lines.index("```", index + 2)
            return "\n".join(lines[index + 2 : end]) + "\n"
    raise AssertionError(f"{DOC}: no ```{language} block after the marker line")


def render(block: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        if old not in block:
            raise AssertionError(f"docs/gateways.md's block no longer has {old!r}")
        block = block.replace(old, new)
    return block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited {process.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout}s: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (nginx: fast shutdown; Caddy: graceful) to this process only, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Gateway:
    """A started gateway: its port, its process and its log."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    config: Path = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop(self.process)


# -- nginx -----------------------------------------------------------------------------------------


def nginx_binary() -> str:
    """$AGENTID_NGINX, else Debian's /usr/sbin/nginx."""
    binary = os.environ.get("AGENTID_NGINX") or NGINX
    if not os.access(binary, os.X_OK):
        raise GatewayMissing(
            f"nginx is not installed ({binary}): apt-get install nginx-light; .ci/run installs it"
        )
    return binary


def nginx_config(
    directory: Path,
    *,
    port: int,
    agentid: str,
    service: str,
    key: str,
    workers: int = 1,
    extra: str = "",
) -> str:
    """nginx.conf: the doc's block inside an `http { }` whose every path is under ``directory``,
    run in the foreground by the current user; ``extra``: more of the `http { }` context (the
    benchmark's static upstream and its nginx without agentid)."""
    block = render(
        doc_block("nginx"),
        {
            DOC_NGINX_LISTEN: f"listen 127.0.0.1:{port};",
            DOC_AGENTID: agentid,
            DOC_SERVICE: service,
            DOC_KEY: key,
        },
    )
    user = ""
    if os.geteuid() == 0:  # a root master would run its workers as nobody: keep the current user
        entry = pwd.getpwuid(os.geteuid())
        user = f"user {entry.pw_name};\n"
    inner = "\n".join("    " + line if line else "" for line in (block + extra).splitlines())
    return (
        f"# Written by tests/gateways/gateways.py from docs/gateways.md's nginx block.\n"
        f"daemon off;\n{user}worker_processes {workers};\n"
        f"pid {directory}/nginx.pid;\nerror_log {directory}/error.log warn;\n"
        f"events {{\n    worker_connections 1024;\n}}\n"
        f"http {{\n"
        f"    access_log off;\n"
        f"    client_body_temp_path {directory}/client_body;\n"
        f"    proxy_temp_path {directory}/proxy;\n"
        f"    fastcgi_temp_path {directory}/fastcgi;\n"
        f"    uwsgi_temp_path {directory}/uwsgi;\n"
        f"    scgi_temp_path {directory}/scgi;\n"
        f"{inner}\n}}\n"
    )


def start_nginx(
    directory: Path,
    *,
    agentid: str,
    service: str,
    key: str,
    workers: int = 1,
    extra: str = "",
) -> Gateway:
    binary = nginx_binary()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "nginx.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the key
    with os.fdopen(fd, "w") as handle:
        handle.write(
            nginx_config(
                directory,
                port=port,
                agentid=agentid,
                service=service,
                key=key,
                workers=workers,
                extra=extra,
            )
        )
    log = directory / "error.log"
    with open(directory / "stderr.log", "wb") as out:
        process = subprocess.Popen(
            [binary, "-p", str(directory), "-e", str(log), "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, directory / "stderr.log", 15)
    except BaseException:
        stop(process)
        raise
    return Gateway("nginx", port, process, log, config)


# -- Caddy -----------------------------------------------------------------------------------------


def caddy_binary() -> str:
    """$AGENTID_CADDY, `caddy` on the PATH, or where `go install` puts it."""
    named = os.environ.get("AGENTID_CADDY")
    if named:
        if not os.access(named, os.X_OK):
            raise GatewayMissing(f"AGENTID_CADDY={named} is not an executable")
        return named
    found = shutil.which("caddy")
    if found:
        return found
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    for candidate in (os.environ.get("GOBIN", ""), str(Path(gopath.split(os.pathsep)[0]) / "bin")):
        if candidate and os.access(Path(candidate) / "caddy", os.X_OK):
            return str(Path(candidate) / "caddy")
    raise GatewayMissing(
        f"caddy is not installed: go install {CADDY_MODULE}@{CADDY_VERSION}; .ci/run builds it"
    )


def caddy_config(*, port: int, agentid: str, service: str) -> str:
    """The Caddyfile: global options for a test (no admin endpoint, no TLS) and the doc's block."""
    block = render(
        doc_block("caddyfile"),
        {DOC_CADDY_SITE: f"http://127.0.0.1:{port} {{", DOC_AGENTID: agentid, DOC_SERVICE: service},
    )
    return (
        "# Written by tests/gateways/gateways.py from docs/gateways.md's Caddy block.\n"
        "{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n}\n\n" + block
    )


def start_caddy(directory: Path, *, agentid: str, service: str, key: str) -> Gateway:
    binary = caddy_binary()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "Caddyfile"
    config.write_text(caddy_config(port=port, agentid=agentid, service=service))
    log = directory / "caddy.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "XDG_DATA_HOME": str(directory / "data"),
        "XDG_CONFIG_HOME": str(directory / "config"),
        DOC_KEY: key,  # the doc's {env.AGENTID_GATEWAY_KEY}
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, "run", "--config", str(config), "--adapter", "caddyfile"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_port(port, process, log, 30)
    except BaseException:
        stop(process)
        raise
    return Gateway("caddy", port, process, log, config)

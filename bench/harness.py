"""Shared benchmark harness: a throwaway agentid deployment in a temporary directory, a server in
its own process on a loopback port, token minting through Delegate, and the ghz load client.

Nothing here prints a credential: the service API key and the tokens live only in files (mode 0600)
inside the temporary directory, which is removed at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# What a server of a commit runs from: server/, the Python client with the generated stubs
# (clients/python), and gen/python, where older commits kept those stubs.
SOURCE_PATHS = ("server", "clients/python", "gen/python")
OUT = ROOT / "bench" / "out"
MAIN_VENV = ROOT / ".venv"

IDP_ISSUER = "https://idp.bench.invalid"
IDP_AUDIENCE = "agentid-bench"
IDP_KID = "bench-idp-1"
AGENT_ID = "bench-bot"
ACTION = "tickets.read"
DELEGATE_SCOPE = "agentid.delegate"
GHZ_MODULE = "github.com/bojand/ghz/cmd/ghz@latest"

CHECK_METHOD = "agentid.v1.AgentIdentityService.Check"
HEALTH_METHOD = "grpc.health.v1.Health.Check"

UVLOOP_SERVE = (
    "import sys, uvloop; uvloop.install(); from agentid_server.cli.root import main; "
    "sys.exit(main(['serve', '--config', sys.argv[1]]))"
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- stopping cleanly ------------------------------------------------------------------------------


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C does, so every `finally` stops its server."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)


# -- a throwaway deployment ------------------------------------------------------------------------


def write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(data)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass
class Deployment:
    """Config, keys and credentials of one benchmark server, all inside ``directory``."""

    directory: Path
    config: Path
    metadata_file: Path  # ghz metadata: the service API key as a bearer credential
    api_key: str = field(repr=False)
    idp_private_pem: bytes = field(repr=False)

    def user_token(self, sub: str = "bench-user", ttl: int = 3600) -> str:
        import jwt
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        now = int(time.time())
        claims = {
            "iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "sub": sub, "iat": now, "auth_time": now,
            "exp": now + ttl, "scope": "tickets.* agentid.delegate",
        }  # fmt: skip
        key = load_pem_private_key(self.idp_private_pem, password=None)
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": IDP_KID})  # type: ignore[arg-type]


def create_deployment(
    directory: Path,
    *,
    token_cache_size: int,
    roles: Sequence[str] = ("check",),
    sqlite_writer: str = "inline",
    sub_agents: bool = False,
) -> Deployment:
    """Writes a KEK, a test IdP (Ed25519 key + JWKS), a service API key with ``roles`` (`check`
    by default; `admin` includes check and watch and may Revoke), an agent kind (with
    ``sub_agents``, one that may also hold `agentid.delegate`, to delegate to sub-agents) and the
    TOML config listening on 127.0.0.1:0 (the server picks a free port)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    directory.mkdir(parents=True, exist_ok=True)
    write_private(directory / "kek", base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    idp_key = ed25519.Ed25519PrivateKey.generate()
    pem = idp_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw_public = idp_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw_public), "kid": IDP_KID}
    jwks = {"keys": [{**jwk, "alg": "EdDSA", "use": "sig"}]}
    (directory / "idp-jwks.json").write_text(json.dumps(jwks))
    api_key = "aid_sk_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    max_scopes = ["tickets.*", DELEGATE_SCOPE] if sub_agents else ["tickets.*"]
    config = directory / "agentid.toml"
    config.write_text(
        f"""\
# Written by bench/harness.py for one benchmark run; removed afterwards.
[server]
listen = "127.0.0.1:0"
shutdown_grace = "2s"
token_cache_size = {token_cache_size}

[database]
url = "sqlite+aiosqlite:///{directory}/agentid.db"
sqlite_writer = "{sqlite_writer}"

[tokens]
issuer = "https://agentid.bench.invalid"
default_ttl = "60m"
max_ttl = "60m"
kek_file = "{directory}/kek"
# Benchmarks mint their tokens through Delegate, as fast as they can: no rate limit.
delegate_per_user_per_minute = 0
delegate_per_agent_per_minute = 0

[[idp]]
issuer = "{IDP_ISSUER}"
audience = "{IDP_AUDIENCE}"
jwks_file = "{directory}/idp-jwks.json"
algorithms = ["EdDSA"]

[[services]]
name = "bench-api"
key_sha256 = "{digest}"
roles = {json.dumps(list(roles))}

[[agents]]
id = "{AGENT_ID}"
max_scopes = {json.dumps(max_scopes)}
max_ttl = "60m"
"""
    )
    metadata_file = directory / "ghz-metadata.json"
    write_private(metadata_file, json.dumps({"authorization": f"Bearer {api_key}"}))
    return Deployment(directory, config, metadata_file, api_key, pem)


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the server process ----------------------------------------------------------------------------

_PORT_LINE = re.compile(r"agentid serving on \S+ \(port (\d+)\)")
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """`agentid serve` (or another server whose log names its port, matched by ``port_line``
    with the port as group 1) in its own process; its log goes to a file beside the config."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        source: Path | None = None,
        port_line: re.Pattern[str] = _PORT_LINE,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.source = source
        self.port_line = port_line
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
        if self.source is not None:  # ahead of the venv's editable install of the work tree
            env["PYTHONPATH"] = os.pathsep.join(str(self.source / path) for path in SOURCE_PATHS)
        with open(self.log_path, "wb") as out:
            self._process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = self.port_line.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the server did not start (argv {self.argv[:2]}...):\n{tail}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole server process (all threads) so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK

    def stop(self, timeout: float = 20.0) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"server {process.pid} ignored SIGTERM for {timeout:.0f}s: killing it")
            process.kill()
            process.wait()


def serve_argv(venv: Path, config: Path, *, uvloop: bool = False) -> list[str]:
    """`agentid serve --config ...` from this venv, optionally under uvloop (cli.main runs the
    server with asyncio.run, which uses the event loop policy uvloop.install() sets)."""
    if uvloop:
        return [str(venv / "bin" / "python"), "-c", UVLOOP_SERVE, str(config)]
    return [str(venv / "bin" / "agentid"), "serve", "--config", str(config)]


@contextlib.contextmanager
def running_server(
    argv: Sequence[str],
    log_path: Path,
    source: Path | None = None,
    port_line: re.Pattern[str] = _PORT_LINE,
) -> Iterator[ServerProcess]:
    server = ServerProcess(argv, log_path, source, port_line)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- tokens through the API ------------------------------------------------------------------------


async def _delegate_many(
    port: int, user_token: str, count: int, concurrency: int
) -> list[tuple[str, str]]:
    import grpc
    from agentid.v1 import agentid_pb2 as pb
    from agentid.v1 import agentid_pb2_grpc

    metadata = (("authorization", f"Bearer {user_token}"),)
    sessions: list[tuple[str, str]] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)
        request = pb.DelegateRequest(agent_id=AGENT_ID, scopes=[ACTION], task="benchmark")

        async def worker(n: int) -> None:
            for _ in range(n):
                response = await stub.Delegate(request, metadata=metadata, timeout=30)
                sessions.append((response.session_id, response.token))

        share, extra = divmod(count, concurrency)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    return sessions


def delegate_tokens(port: int, user_token: str, count: int, concurrency: int = 16) -> list[str]:
    """``count`` distinct agent tokens, each from its own Delegate call."""
    sessions = asyncio.run(_delegate_many(port, user_token, count, min(count, concurrency)))
    return [token for _, token in sessions]


def delegate_sessions(port: int, user_token: str, count: int, concurrency: int = 16) -> list[str]:
    """The session ids of ``count`` distinct sessions, each from its own Delegate call."""
    sessions = asyncio.run(_delegate_many(port, user_token, count, min(count, concurrency)))
    return [session_id for session_id, _ in sessions]


async def _sanity(port: int, api_key: str, tokens: Sequence[str]) -> None:
    import grpc
    from agentid.v1 import agentid_pb2 as pb
    from agentid.v1 import agentid_pb2_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10
        )
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health is {health.status}, not SERVING")
        stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)
        for token in tokens:
            answer = await stub.Check(
                pb.CheckRequest(token=token, action=ACTION), metadata=metadata, timeout=10
            )
            if answer.decision != pb.DECISION_ALLOW:
                raise RuntimeError(f"Check answered {pb.Reason.Name(answer.reason)}, not ALLOW")


def sanity_check(port: int, api_key: str, tokens: Sequence[str]) -> None:
    """Health is SERVING and Check answers ALLOW for the given tokens (a benchmark of DENYs
    would measure the wrong thing)."""
    asyncio.run(_sanity(port, api_key, tokens))


def write_protoset(path: Path) -> None:
    """A FileDescriptorSet of agentid.v1 and grpc.health.v1 (with their imports) for ghz.

    Not server reflection: grpcio-reflection on the upb protobuf runtime cannot resolve a method
    symbol such as `grpc.health.v1.Health.Check` by itself (the server's api/reflection.py works
    around it), and a protoset keeps the benchmarks independent of that."""
    from agentid.v1 import agentid_pb2
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: Any) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        descriptor.CopyToProto(files.file.add())

    add(agentid_pb2.DESCRIPTOR)
    add(health_pb2.DESCRIPTOR)
    path.write_bytes(files.SerializeToString())


def check_messages(tokens: Sequence[str]) -> list[dict[str, str]]:
    return [{"token": token, "action": ACTION} for token in tokens]


# -- ghz -------------------------------------------------------------------------------------------


def _go() -> str | None:
    found = shutil.which("go")
    if found is None and Path("/usr/local/go/bin/go").exists():
        found = "/usr/local/go/bin/go"
    return found


def _go_bin_dir() -> Path | None:
    """Where `go install` puts binaries: $GOBIN, else the first $GOPATH entry's bin/."""
    go = _go()
    if go is None:
        return None
    found = subprocess.run([go, "env", "GOBIN", "GOPATH"], capture_output=True, text=True)
    gobin, _, gopath = found.stdout.partition("\n")
    if gobin.strip():
        return Path(gobin.strip())
    return Path(gopath.strip().split(os.pathsep)[0]) / "bin"


def ensure_ghz() -> Path:
    """The ghz binary: on PATH, where `go install` puts binaries, or installed now."""
    found = shutil.which("ghz")
    if found:
        return Path(found)
    bin_dir = _go_bin_dir()
    if bin_dir is not None and (bin_dir / "ghz").exists():
        return bin_dir / "ghz"
    go = _go()
    if go is None:
        raise RuntimeError("ghz is missing and there is no Go toolchain to `go install` it")
    log(f"installing ghz: go install {GHZ_MODULE} (a few minutes on a fresh machine)")
    subprocess.run([go, "install", GHZ_MODULE], check=True)
    bin_dir = _go_bin_dir()
    assert bin_dir is not None
    return bin_dir / "ghz"


def ghz_version(binary: Path) -> str:
    go = _go()
    if go is None:
        return "unknown"
    with contextlib.suppress(OSError):
        info = subprocess.run([go, "version", "-m", str(binary)], capture_output=True, text=True)
        for line in info.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "mod" and parts[1] == "github.com/bojand/ghz":
                return parts[2]
    return "unknown"


@dataclass(frozen=True)
class LoadResult:
    """One ghz run, latencies in milliseconds, plus the server's CPU time during it."""

    name: str
    concurrency: int
    calls: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_s: float

    @property
    def server_cpu_us_per_call(self) -> float:
        return self.server_cpu_s / max(1, self.calls) * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "server_cpu_us_per_call": round(self.server_cpu_us_per_call, 1),
        }


@dataclass
class Ghz:
    binary: Path
    port: int
    metadata_file: Path
    protoset: Path
    connections: int = 1
    cpus: int = 0  # 0: ghz's default (all cores)

    def run(
        self,
        name: str,
        method: str,
        data_file: Path,
        *,
        concurrency: int,
        seconds: float,
        server: ServerProcess | None = None,
        rps: int = 0,
    ) -> LoadResult:
        """``rps`` > 0 holds the request rate there instead of sending as fast as answered."""
        argv = [
            str(self.binary), "--insecure", "--protoset", str(self.protoset), "--call", method,
            "--data-file", str(data_file), "--metadata-file", str(self.metadata_file),
            "--concurrency", str(concurrency), "--connections", str(self.connections),
            "--duration", f"{seconds}s", "--duration-stop", "wait",
            "--format", "json", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        if self.cpus:
            argv[1:1] = ["--cpus", str(self.cpus)]
        if rps:
            argv[1:1] = ["--rps", str(rps)]
        cpu_before = server.cpu_seconds() if server else 0.0
        finished = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        cpu_after = server.cpu_seconds() if server else 0.0
        if finished.returncode != 0 and not finished.stdout.strip():
            raise RuntimeError(f"ghz failed ({finished.returncode}): {finished.stderr[-2000:]}")
        report = json.loads(finished.stdout)
        codes: dict[str, int] = report.get("statusCodeDistribution") or {}
        calls = int(codes.get("OK", 0))
        errors = sum(n for code, n in codes.items() if code != "OK")
        if errors:
            log(f"{name}: {errors} failed calls: {report.get('errorDistribution')}")
        distribution = report.get("latencyDistribution") or []
        percentiles = {int(p["percentage"]): p["latency"] / 1e6 for p in distribution}
        seconds_run = report["total"] / 1e9
        return LoadResult(
            name=name,
            concurrency=concurrency,
            calls=calls,
            errors=errors,
            seconds=round(seconds_run, 3),
            rps=round(calls / seconds_run, 1),
            p50_ms=round(percentiles.get(50, float("nan")), 3),
            p90_ms=round(percentiles.get(90, float("nan")), 3),
            p99_ms=round(percentiles.get(99, float("nan")), 3),
            server_cpu_s=round(cpu_after - cpu_before, 3),
        )


def round_ratio(
    numerators: Sequence[LoadResult], denominators: Sequence[LoadResult], figure: str
) -> float:
    """The median over rounds of numerator/denominator of ``figure``, each pair measured in the
    same round (seconds apart), so slow drift of a shared machine cancels out."""
    pairs = zip(numerators, denominators, strict=True)
    return statistics.median(
        float(getattr(a, figure)) / float(getattr(b, figure)) for a, b in pairs
    )


def check_server_log(path: Path, name: str = "") -> None:
    """Says so when a benchmark's server logged errors: its figures may not mean much."""
    text = path.read_text(errors="replace")
    if "Traceback" in text or " ERROR " in text:
        log(f"the {name or 'agentid'} server logged errors during the run:\n" + text[-3000:])


def median_result(results: Sequence[LoadResult]) -> dict[str, Any]:
    """Medians over repeated rounds of the same measurement."""
    first = results[0]
    return {
        "name": first.name,
        "concurrency": first.concurrency,
        "rounds": len(results),
        "calls": sum(r.calls for r in results),
        "errors": sum(r.errors for r in results),
        "rps": round(statistics.median(r.rps for r in results), 1),
        "p50_ms": round(statistics.median(r.p50_ms for r in results), 3),
        "p99_ms": round(statistics.median(r.p99_ms for r in results), 3),
        "server_cpu_us_per_call": round(
            statistics.median(r.server_cpu_us_per_call for r in results), 1
        ),
    }


def write_json_file(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- the machine -----------------------------------------------------------------------------------


def python_packages(python: Path, names: Sequence[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try:\n"
        "        out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(out))\n"
    )
    found = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
    return dict(json.loads(found.stdout)) if found.returncode == 0 else {}


def _cpu_times() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


def background_busy(seconds: float = 1.0) -> float:
    """How busy the machine's CPUs are before the benchmark starts (0..1): other work competes
    with the server and the load client, so it is recorded next to the figures."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def export_commit(commit: str, directory: Path) -> Path:
    """server/ and the Python client and generated stubs of ``commit`` (`git archive`) in
    ``directory``, so a run measures a fixed revision while the work tree is being edited."""
    directory.mkdir(parents=True, exist_ok=True)
    present = _git("ls-tree", "--name-only", commit, "--", *SOURCE_PATHS).splitlines()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, *present],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def code_under_test(commit: str | None) -> dict[str, Any]:
    """Which server code was measured: a commit's archive, or the work tree (what the venvs'
    editable installs run) with whether server/ had uncommitted changes."""
    if commit is not None:
        return {"source": "git archive", "commit": _git("rev-parse", "--short", commit)}
    return {
        "source": "work tree",
        "commit": _git("rev-parse", "--short", "HEAD"),
        "server_changes_uncommitted": bool(_git("status", "--porcelain", "--", "server")),
    }


def machine_info(ghz: Path | None = None) -> dict[str, Any]:
    busy = background_busy()
    if busy > 0.2:
        log(f"the machine is {busy:.0%} busy before the run: figures will be noisier")
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ghz": ghz_version(ghz) if ghz is not None else None,
        "background_busy_before_run": round(busy, 3),
    }
    if ghz is None:
        del info["ghz"]  # no ghz in this benchmark
    return info


def finish(
    report: dict[str, Any], out: Path, print_summary: Callable[[dict[str, Any]], None]
) -> int:
    """Writes a benchmark's report to ``out`` and prints its summary; the exit status."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_file(out, report)
    print_summary(report)
    print(f"(written to {out})")
    return 0


# -- wrk (HTTP load) -------------------------------------------------------------------------------

WRK_DEBIAN_PACKAGE = "wrk"

# wrk's done() hook writes its summary as one JSON line (latencies in microseconds, from its HDR
# histogram), so nothing has to parse wrk's human-readable text.
_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d,'
    .. ' "status": %d, "timeout": %d, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def ensure_wrk() -> Path:
    """The wrk binary: on PATH, or installed now from Debian's package (as root, the way this
    project's machines run), like ensure_ghz installs ghz."""
    found = shutil.which("wrk")
    if found:
        return Path(found)
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError("wrk is missing: install Debian's `wrk` package (apt-get install wrk)")
    log(f"installing wrk: apt-get install {WRK_DEBIAN_PACKAGE}")
    subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", WRK_DEBIAN_PACKAGE],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("apt-get installed wrk but it is not on PATH")
    return Path(found)


def wrk_version(binary: Path) -> str:
    """wrk prints its version in the first line of its usage text (and exits 1)."""
    with contextlib.suppress(OSError):
        shown = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        words = (shown.stdout or shown.stderr).split()
        if len(words) >= 2:
            return words[1]
    return "unknown"


@dataclass(frozen=True)
class HttpRequestSpec:
    """One kind of request wrk sends on every call; the headers may hold a credential, so they
    go to a 0600 Lua script in the run's temporary directory, never onto wrk's command line."""

    path: str
    method: str = "GET"
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def script(self) -> str:
        lines = [f"wrk.method = {_lua_string(self.method)}"]
        if self.body:
            lines.append(f"wrk.body = {_lua_string(self.body)}")
        lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in self.headers]
        return "\n".join(lines) + "\n" + _WRK_DONE


def _lua_string(value: str) -> str:
    """A JSON string of printable ASCII is also a valid Lua string literal (JSON's \\uXXXX
    escapes, for anything else, are not)."""
    if not (value.isascii() and value.isprintable()):
        raise ValueError("wrk script values must be printable ASCII")
    return json.dumps(value)


@dataclass
class Wrk:
    """wrk against one HTTP server on the loopback: ``threads`` event-loop threads (1 leaves the
    server a core of this 2-core machine, as ghz's --cpus 1 does) and ``concurrency`` keep-alive
    HTTP/1.1 connections, each with one request in flight."""

    binary: Path
    directory: Path
    threads: int = 1

    def run(
        self,
        name: str,
        port: int,
        request: HttpRequestSpec,
        *,
        concurrency: int,
        seconds: int,
        server: ServerProcess | None = None,
    ) -> LoadResult:
        script = self.directory / f"wrk-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.lua"
        write_private(script, request.script())
        argv = [
            str(self.binary), "--threads", str(min(self.threads, concurrency)),
            "--connections", str(concurrency), "--duration", f"{seconds}s",
            "--script", str(script), f"http://127.0.0.1:{port}{request.path}",
        ]  # fmt: skip
        cpu_before = server.cpu_seconds() if server else 0.0
        finished = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        cpu_after = server.cpu_seconds() if server else 0.0
        line = next((x for x in finished.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
        if finished.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({finished.returncode}): {finished.stderr[-2000:]}")
        report = json.loads(line.removeprefix("WRK_JSON "))
        # Non-2xx/3xx answers are counted in `status` and are failures here, like ghz's non-OK.
        errors = sum(int(report[k]) for k in ("connect", "read", "write", "status", "timeout"))
        calls = int(report["requests"]) - int(report["status"])
        if errors:
            log(f"{name}: {errors} failed calls: {report}")
        seconds_run = report["duration_us"] / 1e6
        return LoadResult(
            name=name,
            concurrency=concurrency,
            calls=calls,
            errors=errors,
            seconds=round(seconds_run, 3),
            rps=round(calls / seconds_run, 1),
            p50_ms=round(report["p50_us"] / 1e3, 3),
            p90_ms=round(report["p90_us"] / 1e3, 3),
            p99_ms=round(report["p99_us"] / 1e3, 3),
            server_cpu_s=round(cpu_after - cpu_before, 3),
        )


# -- PostgreSQL ------------------------------------------------------------------------------------


def postgres_url(url: str) -> str:
    """The servers' URL for a benchmark's own connections: without `ssl` (`?ssl=disable`, an
    argument for the servers' asyncpg.connect, would reach a DSN as a server setting)."""
    from sqlalchemy.engine import make_url

    return make_url(url).difference_update_query(["ssl"]).render_as_string(hide_password=False)


def postgres_dsn(url: str) -> str:
    """``url`` for asyncpg.connect."""
    return postgres_url(url).replace("postgresql+asyncpg://", "postgresql://")

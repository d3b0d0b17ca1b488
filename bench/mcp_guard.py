"""What the MCP guard costs a tool call: the same MCP tool server (the official SDK's MCPServer,
one tool, uvicorn; bench/mcp_tool_server.py) protected by agentid_client.mcp.McpGuard against
it unprotected, and the guard's Check against a gRPC Check alone.

One agentid server (its own process) with a checker service whose audience is the tool server's
URL; one agent token for that URL (Delegate, `audiences`), sent as a bearer. Each tool server is
its own process. Measurements, interleaved in rotating order over several rounds, each after its
own warm-up, at the same concurrency:

* ``plain``:   wrk -> the tool server without any authentication: a `tools/call` (2026-07-28,
  stateless, JSON answer) of `add`;
* ``guarded``: wrk -> the guarded tool server, the same call with the agent's token: the token
  verified locally (one signature verification), then a Check at agentid (one gRPC call, a
  verified-token cache hit there, an audit record committed) before the tool runs;
* ``check``:   ghz -> agentid Check, the same token, action and resource (the guard's floor).

Figures: calls/s, latency, and CPU per call of the tool server and of agentid. No bar in
quality.md covers this; the ratios say what the guard costs against the tool server alone and
how much of it is agentid's Check. Figures to stdout and bench/out/mcp_guard.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import secrets
import socket
import statistics
import sys
import urllib.request
from pathlib import Path
from typing import Any

import harness
from harness import CHECK_METHOD, ROOT, HttpRequestSpec, LoadResult, log

_PORT_LINE = re.compile(r"mcp tool server serving on \S+ \(port (\d+)\)")
ISSUER = "https://agentid.bench.invalid"  # harness.create_deployment's tokens.issuer
ACTION, RESOURCE = "tickets.read", "ticket/1"
CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {
        "name": "add",
        "arguments": {"a": 1, "b": 2},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}
HEADERS = (
    ("Content-Type", "application/json"),
    ("Accept", "application/json, text/event-stream"),
    ("MCP-Protocol-Version", "2026-07-28"),
    ("Mcp-Method", "tools/call"),
    ("Mcp-Name", "add"),
)


def _call_spec(token: str | None) -> HttpRequestSpec:
    auth = (("Authorization", f"Bearer {token}"),) if token else ()
    return HttpRequestSpec("/mcp", "POST", json.dumps(CALL), (*HEADERS, *auth))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _delegate(port: int, user_token: str, audience: str) -> str:
    """An agent token for the tool server alone (its URL the token's `aud`)."""
    import grpc
    from agentid.v1 import agentid_pb2 as pb
    from agentid.v1 import agentid_pb2_grpc

    request = pb.DelegateRequest(
        agent_id=harness.AGENT_ID, scopes=[ACTION], audiences=[audience], task="benchmark"
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)
        metadata = (("authorization", f"Bearer {user_token}"),)
        response = await stub.Delegate(request, metadata=metadata, timeout=30)
    return str(response.token)


def _sanity(port: int, spec: HttpRequestSpec) -> None:
    """The call is answered with the tool's result (a refusal would measure nothing)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{spec.path}", spec.body.encode(), dict(spec.headers), method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        body = json.loads(answer.read())
    if body.get("result", {}).get("structuredContent") != {"result": 3}:
        raise RuntimeError(f"the tool call was not answered with its result: {body}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    ghz_binary = harness.ensure_ghz()
    wrk_binary = harness.ensure_wrk()
    machine = harness.machine_info(ghz_binary)
    machine["wrk"] = harness.wrk_version(wrk_binary)
    machine["mcp"] = harness.python_packages(args.venv / "bin" / "python", ["mcp", "uvicorn"])
    code = harness.code_under_test(args.commit)
    with harness.temporary_directory("agentid-bench-") as directory:
        # The tool servers run the work tree's agentid_client (or the commit's), whatever the
        # venv's editable install points at.
        source = harness.export_commit(args.commit, directory / "src") if args.commit else ROOT
        deployment = harness.create_deployment(directory / "agentid", token_cache_size=10_000)
        tool_port = _free_port()
        url = f"http://127.0.0.1:{tool_port}/mcp"
        checker_key = "aid_sk_" + secrets.token_urlsafe(32)
        key_file = directory / "checker-key"
        harness.write_private(key_file, checker_key)
        digest = hashlib.sha256(checker_key.encode()).hexdigest()
        with deployment.config.open("a") as handle:
            handle.write(
                f'\n[[services]]\nname = "mcp-bench"\nkey_sha256 = "{digest}"\n'
                f'roles = ["check"]\naudience = "{url}"\n'
            )
        server_log = directory / "agentid" / "server.log"
        argv = harness.serve_argv(args.venv, deployment.config)
        with harness.running_server(argv, server_log, source) as server:
            log(f"agentid: pid {server.pid}, gRPC {server.port}")
            token = asyncio.run(_delegate(server.port, deployment.user_token(), url))
            python = str(args.venv / "bin" / "python")
            tool_server = [python, str(ROOT / "bench" / "mcp_tool_server.py")]
            guarded_argv = [
                *tool_server, "--mode", "guarded", "--url", url, "--key-file", str(key_file),
                "--agentid", f"127.0.0.1:{server.port}", "--issuer", ISSUER,
            ]  # fmt: skip
            plain_url = f"http://127.0.0.1:{_free_port()}/mcp"
            with (
                harness.running_server(
                    guarded_argv, directory / "guarded.log", source, _PORT_LINE
                ) as guarded,
                harness.running_server(
                    [*tool_server, "--mode", "plain", "--url", plain_url],
                    directory / "plain.log", source, _PORT_LINE,
                ) as plain,
            ):  # fmt: skip
                log(f"tool servers: guarded pid {guarded.pid}, plain pid {plain.pid}")
                specs = {
                    "plain": (plain, _call_spec(None)),
                    "guarded": (guarded, _call_spec(token)),
                }
                for process, spec in specs.values():
                    _sanity(process.port, spec)
                protoset = directory / "agentid.protoset"
                harness.write_protoset(protoset)
                check_file = directory / "check.json"
                harness.write_private(
                    check_file,
                    json.dumps([{"token": token, "action": ACTION, "resource": RESOURCE}]),
                )
                ghz = harness.Ghz(
                    ghz_binary, server.port, deployment.metadata_file, protoset, cpus=args.ghz_cpus
                )
                wrk = harness.Wrk(wrk_binary, directory, threads=args.wrk_threads)
                raw = _measure(args, server, ghz, wrk, specs, check_file)
            harness.check_server_log(server_log)
    return _report(args, machine, code, raw)


def _measure(
    args: argparse.Namespace,
    server: harness.ServerProcess,
    ghz: harness.Ghz,
    wrk: harness.Wrk,
    specs: dict[str, tuple[harness.ServerProcess, HttpRequestSpec]],
    check_file: Path,
) -> dict[str, list[dict[str, Any]]]:
    """Rounds of every measurement, rotating the order; each result with the tool server's and
    agentid's CPU per call."""
    kinds = ["plain", "guarded", "check"]
    raw: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for round_no in range(args.rounds):
        log(f"round {round_no + 1}/{args.rounds}, {args.concurrency} in flight")
        shift = round_no % len(kinds)
        for name in kinds[shift:] + kinds[:shift]:
            for label, seconds in ((f"{name} warm-up", args.warmup), (name, args.seconds)):
                agentid_before = server.cpu_seconds()
                result: LoadResult
                if name == "check":
                    result = ghz.run(
                        label, CHECK_METHOD, check_file, concurrency=args.concurrency,
                        seconds=seconds, server=server,
                    )  # fmt: skip
                    tool_cpu = 0.0
                else:
                    process, spec = specs[name]
                    result = wrk.run(
                        label, process.port, spec, concurrency=args.concurrency,
                        seconds=seconds, server=process,
                    )  # fmt: skip
                    tool_cpu = result.server_cpu_us_per_call
                agentid_cpu = (server.cpu_seconds() - agentid_before) / max(1, result.calls) * 1e6
            raw[name].append(
                {**result.as_dict(), "tool_cpu_us_per_call": round(tool_cpu, 1),
                 "agentid_cpu_us_per_call": round(agentid_cpu, 1)}
            )  # fmt: skip
            log(
                f"  {name:8} {result.rps:>8.0f} calls/s  p50 {result.p50_ms:.3f} ms  "
                f"p99 {result.p99_ms:.3f} ms  tool server {tool_cpu:.0f} us/call  "
                f"agentid {agentid_cpu:.0f} us/call"
            )
    return raw


def _median(results: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """The median over rounds of a/b, each pair measured in the same round (seconds apart), so
    a shared machine's slow drift cancels out."""
    pairs = zip(a, b, strict=True)
    return round(float(statistics.median(x[key] / y[key] for x, y in pairs if y[key])), 3)


def _report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    code: dict[str, Any],
    raw: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p99_ms", "tool_cpu_us_per_call", "agentid_cpu_us_per_call")
    medians = {name: {k: _median(results, k) for k in keys} for name, results in raw.items()}
    plain, guarded = medians["plain"], medians["guarded"]
    return {
        "benchmark": "mcp_guard",
        "machine": machine,
        "code": code,
        "client": {
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "wrk_threads": args.wrk_threads,
            "ghz_cpus": args.ghz_cpus,
        },
        "medians": medians,
        "ratios": {
            "guarded_vs_plain_rps": _paired(raw["guarded"], raw["plain"], "rps"),
            "guarded_vs_check_rps": _paired(raw["guarded"], raw["check"], "rps"),
            "guard_tool_server_cpu_us_per_call": round(
                guarded["tool_cpu_us_per_call"] - plain["tool_cpu_us_per_call"], 1
            ),
            "guarded_vs_check_agentid_cpu_per_call": _paired(
                raw["guarded"], raw["check"], "agentid_cpu_us_per_call"
            ),
        },
        "raw": raw,
    }


def print_summary(report: dict[str, Any]) -> None:
    client = report["client"]
    print(f"The MCP guard: medians of {client['rounds']} rounds, {client['concurrency']} in flight")
    titles = ("calls/s", "p50 ms", "p99 ms", "tool us/call", "agentid us/call")
    print(" " * 9 + "".join(f"{t:>16}" for t in titles))
    for name, m in report["medians"].items():
        values = (
            m["rps"], m["p50_ms"], m["p99_ms"], m["tool_cpu_us_per_call"],
            m["agentid_cpu_us_per_call"],
        )  # fmt: skip
        print(f"{name:9}" + "".join(f"{v:>16.3f}" if v < 100 else f"{v:>16.0f}" for v in values))
    for name, value in report["ratios"].items():
        print(f"{name:40} {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--venv", type=Path, default=harness.MAIN_VENV, help="server's venv")
    parser.add_argument(
        "--commit", help="measure this revision's server/ (git archive), not the work tree"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ghz-cpus", type=int, default=1, help="GOMAXPROCS of ghz; 0 = all")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's event-loop threads")
    parser.add_argument("--out", type=Path, default=harness.OUT / "mcp_guard.json")
    args = parser.parse_args(argv)
    harness.exit_on_signals()
    return harness.finish(run(args), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

"""Forward auth through a real nginx: nginx -> agentid `/authz/forward` -> upstream, against nginx
-> upstream alone, and the forward-auth hop against a gRPC Check on the same agentid server.

One agentid server (its own process, `[http]` on, one `[[routes]]` entry: `GET /tickets/{id}` is
`tickets.read` on `ticket/{id}`) and one nginx (Debian's, one worker) running docs/gateways.md's
nginx block byte for byte (tests/gateways/gateways.py renders it), with two more server blocks in
the same nginx: the upstream (`return 200`, nginx itself, so the upstream costs next to nothing)
and a plain proxy to it without `auth_request` (the baseline). Measurements, interleaved in
rotating order over several rounds, each after its own warm-up, all at the same concurrency:

* ``plain``:   wrk -> nginx -> upstream, no agentid;
* ``gateway``: wrk -> nginx (auth_request -> agentid /authz/forward) -> upstream, one valid agent
  token (a verified-token cache hit, like the warm Check);
* ``forward``: wrk -> agentid /authz/forward directly, with the headers nginx sends (a
  diagnostic: the hop without nginx's share of the latency);
* ``check``:   ghz -> agentid Check, the same token, action and resource;
* ``static``:  wrk -> agentid's discovery document (a precomputed GET on the same HTTP door:
  quality.md's other baseline for forward auth, >= 0.6x its calls/s, here for ``forward``).

Server CPU per call is agentid's own (user + system, /proc/<pid>/stat) over each measurement; the
bar (quality.md): the forward-auth hop's CPU per call at most 1.3x a gRPC Check's. HTTP load from
wrk (one thread), gRPC from ghz (`--cpus 1`). Figures to stdout and bench/out/forward_auth.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import harness
from harness import CHECK_METHOD, ROOT, HttpRequestSpec, LoadResult, log

sys.path.insert(0, str(ROOT))  # the nginx configuration is the one tests/gateways runs
from tests.gateways import gateways

BARS = {
    # quality.md: forward auth's server CPU per call at most 1.3x a gRPC Check's.
    "forward_vs_check_server_cpu_per_call": ("<=", 1.30),
    # quality.md: forward auth at least 0.6x a static GET on the same HTTP server (calls/s).
    "direct_forward_vs_static_rps": (">=", 0.60),
}
_HTTP_PORT_LINE = re.compile(r"serving HTTP on \S+ \(port (\d+)\)")
ROUTE = """
[[routes]]
service = "bench-api"
method = "GET"
path = "/tickets/{id}"
action = "tickets.read"
resource = "ticket/{id}"
"""
TARGET = "/tickets/T-42"


def _bar(name: str, value: float) -> dict[str, Any]:
    op, limit = BARS[name]
    met = value >= limit if op == ">=" else value <= limit
    return {"ratio": round(value, 3), "bar": f"{op} {limit}", "met": met}


def _http_port(log_path: Path) -> int:
    match = _HTTP_PORT_LINE.search(log_path.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"{log_path}: the server logged no HTTP port")
    return int(match.group(1))


def _extra_servers(upstream_port: int, plain_port: int) -> str:
    """The static upstream and the baseline proxy, in the same nginx as the doc's block."""
    return f"""
server {{
    listen 127.0.0.1:{upstream_port};
    location / {{
        return 200 "upstream\\n";
    }}
}}
server {{
    listen 127.0.0.1:{plain_port};
    location / {{
        proxy_set_header Host $http_host;
        proxy_set_header Connection "";
        proxy_http_version 1.1;
        proxy_pass http://protected_service;
    }}
}}
"""


def _sanity(port: int, spec: HttpRequestSpec, status: int) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{spec.path}", headers=dict(spec.headers), method=spec.method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            got = answer.status
    except urllib.error.HTTPError as error:
        got = error.code
    if got != status:
        raise RuntimeError(f"127.0.0.1:{port}{spec.path} answered {got}, not {status}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    ghz_binary = harness.ensure_ghz()
    wrk_binary = harness.ensure_wrk()
    nginx_binary = gateways.nginx_binary()
    machine = harness.machine_info(ghz_binary)
    machine["wrk"] = harness.wrk_version(wrk_binary)
    machine["nginx"] = _nginx_version(nginx_binary)
    code = harness.code_under_test(args.commit)
    with harness.temporary_directory("agentid-bench-") as directory:
        source = harness.export_commit(args.commit, directory / "src") if args.commit else None
        deployment = harness.create_deployment(directory / "agentid", token_cache_size=10_000)
        with deployment.config.open("a") as handle:
            handle.write('\n[http]\nlisten = "127.0.0.1:0"\n' + ROUTE)
        server_log = directory / "agentid" / "server.log"
        argv = harness.serve_argv(args.venv, deployment.config)
        with harness.running_server(argv, server_log, source) as server:
            http_port = _http_port(server_log)
            log(f"agentid: pid {server.pid}, gRPC {server.port}, HTTP {http_port}")
            [token] = harness.delegate_tokens(server.port, deployment.user_token(), 1)
            harness.sanity_check(server.port, deployment.api_key, [token])
            upstream_port, plain_port = gateways.free_port(), gateways.free_port()
            nginx = gateways.start_nginx(
                directory / "nginx",
                agentid=f"127.0.0.1:{http_port}",
                service=f"127.0.0.1:{upstream_port}",
                key=deployment.api_key,
                extra=_extra_servers(upstream_port, plain_port),
            )
            try:
                log(f"nginx: pid {nginx.pid}, gateway {nginx.port}, plain {plain_port}")
                bearer = (("Authorization", f"Bearer {token}"),)
                specs = {
                    "plain": (plain_port, HttpRequestSpec(TARGET)),
                    "static": (http_port, HttpRequestSpec("/.well-known/openid-configuration")),
                    "gateway": (nginx.port, HttpRequestSpec(TARGET, headers=bearer)),
                    "forward": (
                        http_port,
                        HttpRequestSpec(
                            "/authz/forward",
                            headers=(
                                ("X-Agentid-Key", deployment.api_key),
                                *bearer,
                                ("X-Original-Method", "GET"),
                                ("X-Original-URI", TARGET),
                                ("X-Forwarded-Proto", "http"),
                                ("X-Forwarded-Host", f"127.0.0.1:{nginx.port}"),
                            ),
                        ),
                    ),
                }
                for port, spec in specs.values():
                    _sanity(port, spec, 200)
                _sanity(nginx.port, HttpRequestSpec(TARGET), 401)  # agentid is really asked

                protoset = directory / "agentid.protoset"
                harness.write_protoset(protoset)
                check_file = directory / "check.json"
                harness.write_private(
                    check_file,
                    json.dumps(
                        [{"token": token, "action": "tickets.read", "resource": "ticket/T-42"}]
                    ),
                )
                ghz = harness.Ghz(
                    ghz_binary, server.port, deployment.metadata_file, protoset, cpus=args.ghz_cpus
                )
                wrk = harness.Wrk(wrk_binary, directory, threads=args.wrk_threads)

                def measure(name: str, seconds: int, concurrency: int) -> LoadResult:
                    def once(label: str, secs: int, watched: bool) -> LoadResult:
                        if name == "check":
                            return ghz.run(
                                label, CHECK_METHOD, check_file, concurrency=concurrency,
                                seconds=secs, server=server if watched else None,
                            )  # fmt: skip
                        port, spec = specs[name]
                        return wrk.run(
                            label, port, spec, concurrency=concurrency, seconds=secs,
                            server=server if watched else None,
                        )  # fmt: skip

                    once(f"{name} warm-up", args.warmup, False)
                    result = once(name, seconds, True)
                    log(
                        f"  {name:8} c={concurrency:<3} {result.rps:>8.0f} calls/s  "
                        f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                        f"agentid CPU {result.server_cpu_us_per_call:.0f} us/call"
                    )
                    return result

                kinds = ["plain", "gateway", "forward", "check", "static"]
                plan = ((args.concurrency, args.seconds), (1, args.seconds_1))
                raw: dict[str, dict[str, list[LoadResult]]] = {}
                for concurrency, seconds in plan:
                    at = raw.setdefault(str(concurrency), {})
                    for round_no in range(args.rounds):
                        log(f"round {round_no + 1}/{args.rounds}, {concurrency} in flight")
                        shift = round_no % len(kinds)
                        for name in kinds[shift:] + kinds[:shift]:
                            at.setdefault(name, []).append(measure(name, seconds, concurrency))
            finally:
                nginx.stop()
            nginx_errors = nginx.log.read_text(errors="replace")
            if "[error]" in nginx_errors or "[crit]" in nginx_errors:
                log(f"nginx logged errors during the run:\n{nginx_errors[-3000:]}")
        harness.check_server_log(server_log)
    return _report(args, machine, code, raw)


def _nginx_version(binary: str) -> str:
    shown = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (shown.stderr or shown.stdout).strip().rpartition("/")[2]


def _report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    code: dict[str, Any],
    raw: dict[str, dict[str, list[LoadResult]]],
) -> dict[str, Any]:
    c = str(args.concurrency)
    many, one = raw[c], raw["1"]
    ratio = harness.round_ratio
    ratios: dict[str, Any] = {
        "forward_vs_check_server_cpu_per_call": _bar(
            "forward_vs_check_server_cpu_per_call",
            ratio(many["gateway"], many["check"], "server_cpu_us_per_call"),
        ),
        "direct_forward_vs_check_server_cpu_per_call": round(
            ratio(many["forward"], many["check"], "server_cpu_us_per_call"), 3
        ),
        "direct_forward_vs_static_rps": _bar(
            "direct_forward_vs_static_rps", ratio(many["forward"], many["static"], "rps")
        ),
        "gateway_vs_plain_rps": round(ratio(many["gateway"], many["plain"], "rps"), 3),
        "gateway_vs_check_rps": round(ratio(many["gateway"], many["check"], "rps"), 3),
        "gateway_minus_plain_p50_ms_1_in_flight": round(
            statistics.median(
                g.p50_ms - p.p50_ms for g, p in zip(one["gateway"], one["plain"], strict=True)
            ),
            3,
        ),
        "gateway_vs_plain_p50_1_in_flight": round(ratio(one["gateway"], one["plain"], "p50_ms"), 3),
        "check_vs_forward_p50_1_in_flight": round(ratio(one["check"], one["forward"], "p50_ms"), 3),
    }
    python = args.venv / "bin" / "python"
    return {
        "benchmark": "forward_auth",
        "machine": machine,
        "code": code,
        "server": {
            "venv": str(args.venv),
            "packages": harness.python_packages(python, ["grpcio", "protobuf", "aiohttp"]),
            "event_loop": "asyncio",
            "token_cache_size": 10_000,
            "nginx": "docs/gateways.md's block, 1 worker",
        },
        "client": {
            "http": f"wrk, {args.wrk_threads} thread(s), keep-alive HTTP/1.1 connections",
            "grpc": f"ghz --cpus {args.ghz_cpus or 'all'}, 1 connection",
            "seconds": args.seconds,
            "seconds_1": args.seconds_1,
            "warmup_seconds": args.warmup,
            "rounds": args.rounds,
        },
        f"in_flight_{c}": {n: harness.median_result(rs) for n, rs in many.items()},
        "in_flight_1": {n: harness.median_result(rs) for n, rs in one.items()},
        "ratios": ratios,
        "raw": {
            k: {n: [r.as_dict() for r in rs] for n, rs in by_kind.items()}
            for k, by_kind in raw.items()
        },
    }


def print_summary(report: dict[str, Any]) -> None:
    rounds = report["client"]["rounds"]
    many_key = next(k for k in report if k.startswith("in_flight_") and k != "in_flight_1")
    c = many_key.removeprefix("in_flight_")
    print(f"Forward auth through nginx (wrk; gRPC Check by ghz): medians of {rounds} rounds")
    header = [(f"calls/s @{c}", 13), ("p50 ms", 9), ("p99 ms", 9), ("agentid CPU us/call", 21)]
    header.append(("p50 ms @1", 11))
    print(" " * 9 + "".join(f"{title:>{width}}" for title, width in header))
    for name, a in report[many_key].items():
        b = report["in_flight_1"].get(name)
        at1 = f"{b['p50_ms']:>11.3f}" if b else f"{'-':>11}"
        print(
            f"{name:9}{a['rps']:>13.0f}{a['p50_ms']:>9.3f}{a['p99_ms']:>9.3f}"
            f"{a['server_cpu_us_per_call']:>21.0f}{at1}"
        )
    for name, value in report["ratios"].items():
        if isinstance(value, dict):
            verdict = "met" if value["met"] else "NOT MET"
            print(f"{name:44} {value['ratio']:.3f}  bar {value['bar']}: {verdict}")
        else:
            print(f"{name:44} {value:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--venv", type=Path, default=harness.MAIN_VENV, help="server's venv")
    parser.add_argument(
        "--commit", help="measure this revision's server/ (git archive), not the work tree"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=3, help="per measurement, many in flight")
    parser.add_argument("--seconds-1", type=int, default=2, help="per measurement, 1 in flight")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ghz-cpus", type=int, default=1, help="GOMAXPROCS of ghz; 0 = all")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's event-loop threads")
    parser.add_argument("--out", type=Path, default=harness.OUT / "forward_auth.json")
    args = parser.parse_args(argv)
    harness.exit_on_signals()
    return harness.finish(run(args), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP door against a static document on the same server, and what the door costs gRPC.

Three servers run side by side for the whole run, each on a loopback port 0:

* ``on``:  agentid with ``[http] listen`` (the door, aiohttp in gRPC's event loop);
* ``off``: agentid from the same build with the same kind of config, without ``[http]``;
* ``starlette``: uvicorn + Starlette (bench/http_baseline_server.py, from the throwaway venv
  bench/out/venv-starlette) serving the very bytes of ``on``'s discovery document.

Measurements, interleaved in rotating order over several rounds, each after its own warm-up:

* ``static``: ``GET /.well-known/openid-configuration`` on ``on``'s door (a precomputed
  string: the cost of aiohttp itself), the baseline of issue 13's bar;
* ``introspect``: ``POST /oauth2/introspect`` of one valid agent token by a service with role
  ``check`` (Bearer API key) on the same door: authentication, form, a cached token, JSON;
* ``starlette``: the static GET on the uvicorn + Starlette server (a diagnostic: the HTTP
  library's own cost against another well-kept one);
* ``check_on`` / ``check_off``: a warm gRPC Check (ghz) on each agentid server: what an idle
  HTTP listener costs gRPC. Whichever server is not measured idles, so both sides pay alike.

HTTP load comes from wrk (one thread) and gRPC load from ghz (``--cpus 1``): on a 2-core machine
the load client keeps one core and the server the other. Calls/s, p50, p99 and server CPU per call
at 64 in flight; p50 at 1 in flight for the HTTP kinds. A figure is the median over rounds and a
ratio the median of the per-round ratios. Figures go to stdout and bench/out/http_front_door.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import harness
from harness import CHECK_METHOD, OUT, ROOT, HttpRequestSpec, LoadResult, log

DISCOVERY = "/.well-known/openid-configuration"
INTROSPECT = "/oauth2/introspect"
# The comparison stack, pinned: a throwaway venv, never agentid's dependencies.
STARLETTE_PACKAGES = ("uvicorn==0.54.0", "starlette==1.10.0", "httptools==0.9.0")
STARLETTE_VENV = OUT / "venv-starlette"

_HTTP_PORT_LINE = re.compile(r"serving HTTP on \S+ \(port (\d+)\)")
_STARLETTE_PORT_LINE = re.compile(r"starlette baseline serving on \S+ \(port (\d+)\)")

BARS = {
    # issue 13: introspection at least 0.6 of a static GET on the same server.
    "introspect_vs_static_rps": (">=", 0.60),
    # The same bar on latency, as a speed: static p50 / introspection p50 at 1 in flight.
    "static_vs_introspect_p50_1_in_flight": (">=", 0.60),
    # issue 13: an idle HTTP listener costs warm Check at most 3 % of its calls/s.
    "http_listener_cost_check_rps": ("<=", 0.03),
}


def _bar(name: str, value: float) -> dict[str, Any]:
    op, limit = BARS[name]
    met = value >= limit if op == ">=" else value <= limit
    return {"ratio": round(value, 3), "bar": f"{op} {limit}", "met": met}


def ensure_starlette_venv(*, rebuild: bool) -> Path:
    """bench/out/venv-starlette with STARLETTE_PACKAGES only; reused while the pins are the same."""
    marker = STARLETTE_VENV / ".bench-ready"
    stamp = " ".join(STARLETTE_PACKAGES)
    if not rebuild and marker.exists() and marker.read_text() == stamp:
        return STARLETTE_VENV
    log(f"building {STARLETTE_VENV.relative_to(ROOT)} (pip; seconds)")
    shutil.rmtree(STARLETTE_VENV, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(STARLETTE_VENV)], check=True)
    python = str(STARLETTE_VENV / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *STARLETTE_PACKAGES], check=True)
    marker.write_text(stamp)
    return STARLETTE_VENV


def _with_http(config: Path) -> None:
    """Turns the door on: `[http] listen` on a free loopback port, everything else as it was."""
    with config.open("a") as handle:
        handle.write('\n[http]\nlisten = "127.0.0.1:0"\n')


def _http_port(log_path: Path) -> int:
    match = _HTTP_PORT_LINE.search(log_path.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"{log_path}: the server logged no HTTP port")
    return int(match.group(1))


def _fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
        return answer.status, dict(answer.headers), answer.read()


def _sanity_http(port: int, api_key: str, token: str) -> tuple[bytes, int]:
    """Discovery answers 200 and introspection says active (a benchmark of `{"active": false}`
    would measure the wrong thing); the discovery bytes and their max-age, for Starlette."""
    status, headers, document = _fetch(f"http://127.0.0.1:{port}{DISCOVERY}")
    if status != 200 or "issuer" not in json.loads(document):
        raise RuntimeError(f"discovery answered {status}")
    max_age = int(re.search(r"max-age=(\d+)", headers.get("Cache-Control", "")).group(1))  # type: ignore[union-attr]
    status, _, body = _fetch(
        f"http://127.0.0.1:{port}{INTROSPECT}",
        data=urlencode({"token": token}).encode(),
        headers={
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    if status != 200 or json.loads(body).get("active") is not True:
        raise RuntimeError(f"introspection answered {status} without active: true")
    return document, max_age


def run(args: argparse.Namespace) -> dict[str, Any]:
    ghz_binary = harness.ensure_ghz()
    wrk_binary = harness.ensure_wrk()
    starlette_venv = None if args.no_starlette else ensure_starlette_venv(rebuild=args.rebuild)
    machine = harness.machine_info(ghz_binary)
    machine["wrk"] = harness.wrk_version(wrk_binary)
    code = harness.code_under_test(args.commit)
    with harness.temporary_directory("agentid-bench-") as directory:
        source = harness.export_commit(args.commit, directory / "src") if args.commit else None
        deployments = {
            side: harness.create_deployment(directory / side, token_cache_size=10_000)
            for side in ("on", "off")
        }
        _with_http(deployments["on"].config)
        with (
            harness.running_server(
                harness.serve_argv(args.venv, deployments["on"].config),
                directory / "on" / "server.log",
                source,
            ) as server_on,
            harness.running_server(
                harness.serve_argv(args.venv, deployments["off"].config),
                directory / "off" / "server.log",
                source,
            ) as server_off,
        ):
            servers = {"on": server_on, "off": server_off}
            http_port = _http_port(directory / "on" / "server.log")
            log(f"agentid with HTTP: pid {server_on.pid}, gRPC {server_on.port}, HTTP {http_port}")
            log(f"agentid without HTTP: pid {server_off.pid}, gRPC {server_off.port}")
            tokens = {}
            for side, server in servers.items():
                deployment = deployments[side]
                [tokens[side]] = harness.delegate_tokens(server.port, deployment.user_token(), 1)
                harness.sanity_check(server.port, deployment.api_key, [tokens[side]])
            api_key = deployments["on"].api_key
            document, max_age = _sanity_http(http_port, api_key, tokens["on"])
            (directory / "discovery.json").write_bytes(document)

            protoset = directory / "agentid.protoset"
            harness.write_protoset(protoset)
            check_files = {}
            for side in servers:
                check_files[side] = directory / f"check-{side}.json"
                harness.write_private(
                    check_files[side], json.dumps(harness.check_messages([tokens[side]]))
                )
            ghz = {
                side: harness.Ghz(
                    ghz_binary,
                    server.port,
                    deployments[side].metadata_file,
                    protoset,
                    cpus=args.ghz_cpus,
                )
                for side, server in servers.items()
            }
            wrk = harness.Wrk(wrk_binary, directory, threads=args.wrk_threads)
            static = HttpRequestSpec(DISCOVERY)
            introspect = HttpRequestSpec(
                INTROSPECT,
                method="POST",
                body=urlencode({"token": tokens["on"]}),
                headers=(
                    ("Authorization", f"Bearer {api_key}"),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ),
            )

            stack = contextlib.ExitStack()
            starlette = None
            if starlette_venv is not None:
                starlette = stack.enter_context(
                    harness.running_server(
                        [str(starlette_venv / "bin" / "python"),
                         str(ROOT / "bench" / "http_baseline_server.py"),
                         "--document", str(directory / "discovery.json"),
                         "--max-age", str(max_age)],
                        directory / "starlette.log",
                        port_line=_STARLETTE_PORT_LINE,
                    )
                )  # fmt: skip
            with stack:
                if starlette is not None:
                    _, _, theirs = _fetch(f"http://127.0.0.1:{starlette.port}{DISCOVERY}")
                    if theirs != document:
                        raise RuntimeError("Starlette's document is not agentid's")
                    log(f"starlette baseline: pid {starlette.pid}, HTTP {starlette.port}")

                def measure(name: str, concurrency: int, seconds: int) -> LoadResult:
                    def once(label: str, secs: int, watched: bool) -> LoadResult:
                        if name.startswith("check_"):
                            side = name.removeprefix("check_")
                            return ghz[side].run(
                                label, CHECK_METHOD, check_files[side], concurrency=concurrency,
                                seconds=secs, server=servers[side] if watched else None,
                            )  # fmt: skip
                        target = starlette if name == "starlette" else server_on
                        assert target is not None
                        port = target.port if name == "starlette" else http_port
                        spec = introspect if name == "introspect" else static
                        return wrk.run(
                            label, port, spec, concurrency=concurrency, seconds=secs,
                            server=target if watched else None,
                        )  # fmt: skip

                    once(f"{name} warm-up", args.warmup, False)
                    result = once(name, seconds, True)
                    log(
                        f"  {name:10} c={concurrency:<3} {result.rps:>8.0f} calls/s  "
                        f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                        f"server CPU {result.server_cpu_us_per_call:.0f} us/call"
                    )
                    return result

                http_kinds = ["static", "introspect", *(["starlette"] if starlette else [])]
                plan = (
                    (64, args.seconds, [*http_kinds, "check_on", "check_off"]),
                    (1, args.seconds_1, http_kinds),
                )
                raw: dict[str, dict[str, list[LoadResult]]] = {"64": {}, "1": {}}
                for concurrency, seconds, kinds in plan:
                    for round_no in range(args.rounds):
                        log(f"round {round_no + 1}/{args.rounds}, {concurrency} in flight")
                        for name in _order(kinds, round_no):
                            result = measure(name, concurrency, seconds)
                            raw[str(concurrency)].setdefault(name, []).append(result)
        for side in servers:
            harness.check_server_log(directory / side / "server.log", f"agentid ({side})")
    return _report(args, machine, code, starlette_venv, raw)


def _order(kinds: list[str], round_no: int) -> list[str]:
    """The kinds rotated by the round, and on/off of the Check pair swapped every other round:
    rotation alone would measure `on` first in most rounds, and whichever of the two goes first
    follows the HTTP load's aftermath."""
    shift = round_no % len(kinds)
    order = kinds[shift:] + kinds[:shift]
    if round_no % 2 and "check_on" in order:
        i, j = order.index("check_on"), order.index("check_off")
        order[i], order[j] = order[j], order[i]
    return order


def _report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    code: dict[str, Any],
    starlette_venv: Path | None,
    raw: dict[str, dict[str, list[LoadResult]]],
) -> dict[str, Any]:
    at64 = {name: harness.median_result(results) for name, results in raw["64"].items()}
    at1 = {name: harness.median_result(results) for name, results in raw["1"].items()}
    r64, r1 = raw["64"], raw["1"]
    on_vs_off = harness.round_ratio(r64["check_on"], r64["check_off"], "rps")
    ratios: dict[str, Any] = {
        "introspect_vs_static_rps": _bar(
            "introspect_vs_static_rps", harness.round_ratio(r64["introspect"], r64["static"], "rps")
        ),
        "static_vs_introspect_p50_1_in_flight": _bar(
            "static_vs_introspect_p50_1_in_flight",
            harness.round_ratio(r1["static"], r1["introspect"], "p50_ms"),
        ),
        "static_vs_introspect_p50_64_in_flight": round(
            harness.round_ratio(r64["static"], r64["introspect"], "p50_ms"), 3
        ),
        "static_vs_introspect_server_cpu_per_call": round(
            harness.round_ratio(r64["static"], r64["introspect"], "server_cpu_us_per_call"), 3
        ),
        "http_listener_cost_check_rps": _bar("http_listener_cost_check_rps", 1.0 - on_vs_off),
        "check_on_vs_off_server_cpu_per_call": round(
            harness.round_ratio(r64["check_on"], r64["check_off"], "server_cpu_us_per_call"), 3
        ),
        "check_on_vs_off_rps_per_round": [
            round(a.rps / b.rps, 3) for a, b in zip(r64["check_on"], r64["check_off"], strict=True)
        ],
    }
    if "starlette" in r64:
        ratios["aiohttp_vs_starlette_static_rps"] = round(
            harness.round_ratio(r64["static"], r64["starlette"], "rps"), 3
        )
        ratios["aiohttp_vs_starlette_static_p50_1_in_flight"] = round(
            harness.round_ratio(r1["static"], r1["starlette"], "p50_ms"), 3
        )
        ratios["aiohttp_vs_starlette_server_cpu_per_call"] = round(
            harness.round_ratio(r64["static"], r64["starlette"], "server_cpu_us_per_call"), 3
        )
    python = args.venv / "bin" / "python"
    return {
        "benchmark": "http_front_door",
        "machine": machine,
        "code": code,
        "server": {
            "venv": str(args.venv),
            "packages": harness.python_packages(
                python, ["grpcio", "protobuf", "aiohttp", "uvloop", "PyJWT"]
            ),
            "event_loop": "asyncio",
            "token_cache_size": 10_000,
        },
        "starlette": None
        if starlette_venv is None
        else {
            "venv": str(starlette_venv.relative_to(ROOT)),
            "packages": harness.python_packages(
                starlette_venv / "bin" / "python", ["uvicorn", "starlette", "httptools"]
            ),
            "settings": "asyncio loop, httptools parser, no access log",
        },
        "client": {
            "http": f"wrk, {args.wrk_threads} thread(s), keep-alive HTTP/1.1 connections",
            "grpc": f"ghz --cpus {args.ghz_cpus or 'all'}, 1 connection",
            "seconds_64": args.seconds,
            "seconds_1": args.seconds_1,
            "warmup_seconds": args.warmup,
            "rounds": args.rounds,
        },
        "in_flight_64": at64,
        "in_flight_1": at1,
        "ratios": ratios,
        "raw": {
            c: {n: [r.as_dict() for r in rs] for n, rs in by_kind.items()}
            for c, by_kind in raw.items()
        },
    }


def print_summary(report: dict[str, Any]) -> None:
    rounds = report["client"]["rounds"]
    print(f"HTTP front door (wrk; gRPC Check by ghz): medians of {rounds} rounds; each ratio is")
    print("the median of the ratios within each round")
    header = [("calls/s @64", 12), ("p50 ms", 9), ("p99 ms", 9), ("CPU us/call", 13)]
    header.append(("p50 ms @1", 11))
    print(" " * 11 + "".join(f"{title:>{width}}" for title, width in header))
    for name, a in report["in_flight_64"].items():
        b = report["in_flight_1"].get(name)
        at1 = f"{b['p50_ms']:>11.3f}" if b else f"{'-':>11}"
        print(
            f"{name:11}{a['rps']:>12.0f}{a['p50_ms']:>9.3f}{a['p99_ms']:>9.3f}"
            f"{a['server_cpu_us_per_call']:>13.0f}{at1}"
        )
    for name, value in report["ratios"].items():
        if isinstance(value, dict):
            verdict = "met" if value["met"] else "NOT MET"
            print(f"{name:44} {value['ratio']:.3f}  bar {value['bar']}: {verdict}")
        elif isinstance(value, list):
            print(f"{name:44} {', '.join(f'{v:.3f}' for v in value)}")
        else:
            print(f"{name:44} {value:.3f}")
    spread = report["ratios"]["check_on_vs_off_rps_per_round"]
    if len(spread) > 1:
        print(f"(check on/off per round: spread {statistics.pstdev(spread):.3f} around the median)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--venv", type=Path, default=harness.MAIN_VENV, help="server's venv")
    parser.add_argument(
        "--commit", help="measure this revision's server/ (git archive), not the work tree"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="per measurement, 64 in flight")
    parser.add_argument("--seconds-1", type=int, default=2, help="per measurement, 1 in flight")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ghz-cpus", type=int, default=1, help="GOMAXPROCS of ghz; 0 = all")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's event-loop threads")
    parser.add_argument(
        "--no-starlette", action="store_true", help="skip the uvicorn + Starlette diagnostic"
    )
    parser.add_argument("--rebuild", action="store_true", help="recreate the Starlette venv")
    parser.add_argument("--out", type=Path, default=harness.OUT / "http_front_door.json")
    args = parser.parse_args(argv)
    harness.exit_on_signals()
    return harness.finish(run(args), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

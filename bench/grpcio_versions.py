"""grpcio release lines compared: the same agentid server from throwaway venvs that differ only in
grpcio (and its grpcio-status/-reflection/-health-checking companions), under asyncio and uvloop.

For each variant: health and warm Check (same token every call) at 64 in flight from ghz, calls/s
and the server process's CPU time per call (utime + stime from /proc/<pid>/stat, all threads,
before/after each measurement, divided by the calls answered). Variants run in two passes, the
second in reverse order, so drift of a shared machine does not favour one of them. Figures go to
stdout and bench/out/grpcio_versions.json; the venvs are kept in bench/out/ for the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import harness
from harness import CHECK_METHOD, HEALTH_METHOD, OUT, ROOT, LoadResult, log

GRPC_PACKAGES = ("grpcio", "grpcio-status", "grpcio-reflection", "grpcio-health-checking")
DEFAULT_VERSIONS = ("1.78.0", "1.85.1")


def _stamp(version: str) -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "clients/python/pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return f"{version} {digest.hexdigest()[:16]}"


def ensure_venv(version: str, *, rebuild: bool) -> Path:
    """bench/out/venv-grpcio-<version>: the project (editable, with the `perf` extra, pinned by
    constraints.txt) and then grpcio and its companions at ``version``. Reused while
    pyproject.toml and constraints.txt are unchanged."""
    venv = OUT / f"venv-grpcio-{version}"
    marker = venv / ".bench-ready"
    stamp = _stamp(version)
    if not rebuild and marker.exists() and marker.read_text() == stamp:
        return venv
    log(f"building {venv.relative_to(ROOT)} (pip; a minute or two)")
    shutil.rmtree(venv, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    client = ROOT / "clients" / "python"  # agentid-client, which the server depends on
    subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), "-e", str(client), "-e", f"{ROOT}[perf]"],
        check=True,
    )
    # Everything else stays at constraints.txt (protobuf in particular); the project's grpcio
    # range (>= 1.78.0, < 2) accepts the override.
    others = OUT / "constraints-without-grpc.txt"
    others.write_text(
        "".join(
            line + "\n"
            for line in (ROOT / "constraints.txt").read_text().splitlines()
            if not re.match(r"grpcio(-status|-reflection|-health-checking|-tools)?==", line)
        )
    )
    core, companions = GRPC_PACKAGES[:2], GRPC_PACKAGES[2:]
    subprocess.run([*pip, "-c", str(others), *(f"{n}=={version}" for n in core)], check=True)
    tried = subprocess.run(
        [*pip, "-c", str(others), *(f"{n}=={version}" for n in companions)],
        capture_output=True,
        text=True,
    )
    if tried.returncode != 0:
        # e.g. grpcio-reflection/-health-checking 1.85 need protobuf >= 7, the project pins < 7:
        # keep the project's companions so that only grpcio (and grpcio-status) differ.
        log(f"{', '.join(companions)} {version} do not fit constraints.txt; kept as pinned")
    installed = harness.python_packages(venv / "bin" / "python", GRPC_PACKAGES)
    if any(installed.get(name) != version for name in core):
        raise RuntimeError(f"{venv}: expected {version} for {core}, got {installed}")
    main = harness.python_packages(harness.MAIN_VENV / "bin" / "python", ["protobuf"])
    here = harness.python_packages(venv / "bin" / "python", ["protobuf"])
    if main and here != main:
        raise RuntimeError(f"{venv}: protobuf {here} differs from the project venv's {main}")
    marker.write_text(stamp)
    return venv


def measure_variant(
    args: argparse.Namespace, ghz_binary: Path, venv: Path, uvloop: bool, source: Path | None
) -> dict[str, LoadResult]:
    """One server from ``venv``: health and warm Check, each after its own warm-up."""
    results: dict[str, LoadResult] = {}
    with harness.temporary_directory("agentid-bench-") as directory:
        deployment = harness.create_deployment(directory, token_cache_size=100_000)
        argv = harness.serve_argv(venv, deployment.config, uvloop=uvloop)
        with harness.running_server(argv, directory / "server.log", source) as server:
            (token,) = harness.delegate_tokens(server.port, deployment.user_token(), 1)
            harness.sanity_check(server.port, deployment.api_key, [token])
            protoset = directory / "agentid.protoset"
            harness.write_protoset(protoset)
            files = {"health": directory / "health.json", "warm": directory / "warm.json"}
            harness.write_private(files["health"], json.dumps([{"service": ""}]))
            harness.write_private(files["warm"], json.dumps(harness.check_messages([token])))
            ghz = harness.Ghz(
                ghz_binary, server.port, deployment.metadata_file, protoset, cpus=args.ghz_cpus
            )
            for name, method in (("health", HEALTH_METHOD), ("warm", CHECK_METHOD)):
                ghz.run(f"{name} warm-up", method, files[name], concurrency=64, seconds=args.warmup)
                results[name] = ghz.run(
                    name, method, files[name], concurrency=64, seconds=args.seconds, server=server
                )
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    ghz_binary = harness.ensure_ghz()
    machine = harness.machine_info(ghz_binary)
    code = harness.code_under_test(args.commit)
    venvs = {version: ensure_venv(version, rebuild=args.rebuild) for version in args.versions}
    loops = [False] if args.no_uvloop else [False, True]
    variants = [(version, uvloop) for version in args.versions for uvloop in loops]
    raw: dict[str, dict[str, list[LoadResult]]] = {}
    with harness.temporary_directory("agentid-src-") as src_dir:
        source = harness.export_commit(args.commit, src_dir) if args.commit else None
        for round_no in range(args.rounds):
            order = variants if round_no % 2 == 0 else list(reversed(variants))
            for version, uvloop in order:
                label = f"grpcio {version} + {'uvloop' if uvloop else 'asyncio'}"
                log(f"round {round_no + 1}/{args.rounds}: {label}")
                results = measure_variant(args, ghz_binary, venvs[version], uvloop, source)
                for name, result in results.items():
                    raw.setdefault(label, {}).setdefault(name, []).append(result)
                    log(
                        f"  {name:6} {result.rps:>8.0f} calls/s  p99 {result.p99_ms:.2f} ms  "
                        f"server CPU {result.server_cpu_us_per_call:.0f} us/call"
                    )
    summary: dict[str, Any] = {}
    for label, by_kind in raw.items():
        health = harness.median_result(by_kind["health"])
        warm = harness.median_result(by_kind["warm"])
        summary[label] = {
            "health": health,
            "warm": warm,
            "warm_vs_health_rps": round(
                harness.round_ratio(by_kind["warm"], by_kind["health"], "rps"), 3
            ),
        }
    baseline = summary[f"grpcio {args.versions[0]} + asyncio"]
    for entry in summary.values():
        entry["vs_baseline"] = {
            kind: {
                "rps": round(entry[kind]["rps"] / baseline[kind]["rps"], 3),
                "server_cpu_per_call": round(
                    entry[kind]["server_cpu_us_per_call"]
                    / baseline[kind]["server_cpu_us_per_call"],
                    3,
                ),
            }
            for kind in ("health", "warm")
        }
    return {
        "benchmark": "grpcio_versions",
        "machine": machine,
        "code": code,
        "venvs": {
            version: {
                "path": str(venv.relative_to(ROOT)),
                "packages": harness.python_packages(
                    venv / "bin" / "python", [*GRPC_PACKAGES, "protobuf", "uvloop"]
                ),
            }
            for version, venv in venvs.items()
        },
        "client": {
            "tool": "ghz",
            "concurrency": 64,
            "connections": 1,
            "cpus": args.ghz_cpus or "all",
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "rounds": args.rounds,
        },
        "baseline": f"grpcio {args.versions[0]} + asyncio",
        "variants": summary,
        "raw": {
            label: {kind: [r.as_dict() for r in rs] for kind, rs in by_kind.items()}
            for label, by_kind in raw.items()
        },
    }


def print_summary(report: dict[str, Any]) -> None:
    rounds = report["client"]["rounds"]
    print(f"grpcio versions: same server code, ghz, 64 in flight, medians of {rounds} rounds")
    print(
        f"{'':26}{'health/s':>10}{'CPU us':>8}{'warm/s':>9}{'CPU us':>8}{'warm/health':>12}", end=""
    )
    print(f"{'health CPU vs base':>19}")
    for label, entry in report["variants"].items():
        health, warm = entry["health"], entry["warm"]
        print(
            f"{label:<26}{health['rps']:>10.0f}{health['server_cpu_us_per_call']:>8.0f}"
            f"{warm['rps']:>9.0f}{warm['server_cpu_us_per_call']:>8.0f}"
            f"{entry['warm_vs_health_rps']:>12.3f}"
            f"{entry['vs_baseline']['health']['server_cpu_per_call']:>18.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS))
    parser.add_argument(
        "--commit", help="measure this revision's server/ (git archive), not the work tree"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio event loop only")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--ghz-cpus", type=int, default=1, help="GOMAXPROCS of ghz; 0 = all")
    parser.add_argument("--rebuild", action="store_true", help="recreate the venvs")
    parser.add_argument("--out", type=Path, default=OUT / "grpcio_versions.json")
    args = parser.parse_args(argv)
    harness.exit_on_signals()
    return harness.finish(run(args), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

"""Check vs grpc.health.v1 Health/Check on PostgreSQL (quality.md: warm ≥ 0.65 of health): one
process, and two processes sharing one address (`server.reuse_port`, a chain each), same run.

The deployment of bench/check_vs_health (`token_cache_size = 1`, so a Check with a new token
verifies a signature) on the PostgreSQL database given, served by both topologies at once on
their own ports; ghz (`--cpus 1`, 8 HTTP/2 connections so the kernel spreads them over the
processes) loads one at a time: health, warm Check (one token) and cold Check (1000 tokens round
robin) at 64 in flight, rotating order, rounds alternating the topologies; at 1 in flight, p50 of
health and warm Check on one process. Per measurement: calls/s, server CPU per call (every
process of the topology, all threads) and PostgreSQL's CPU per call (utime + stime of every
backend connected to the database, from /proc: the server must be local; background processes
such as the WAL writer are shared with other databases and left out). A figure is the median
over rounds, a ratio the median of the per-round ratios.

Needs a PostgreSQL database the benchmark may write to: `--postgres-url`, else
AGENTID_TEST_POSTGRES_URL (`.ci/postgres` creates one and prints its URL). It must hold none of
the project's tables (a deployment of its own: keys under its own key-encryption key), or
`--wipe` drops them first.

usage: bench/check_vs_health_pg [--rounds 4] [--seconds 3] [--postgres-url URL] [--wipe]
                                [--commit REV]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import harness as H
from reuse_port import free_port, process_config

CONCURRENCY = 64
CONNECTIONS = 8
KINDS = ("health", "warm", "cold")
TOPOLOGIES = {"one": 1, "two": 2}


def backend_pids(url: str) -> list[int]:
    """The server processes of every connection to the database (ours excluded)."""
    import asyncpg  # type: ignore[import-untyped]  # the server's driver, in the project venv

    async def query() -> list[int]:
        connection = await asyncpg.connect(H.postgres_dsn(url))
        try:
            rows = await connection.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await connection.close()
        return [int(row["pid"]) for row in rows]

    return asyncio.run(query())


def process_cpu(pids: list[int]) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    return times


def measure(args: argparse.Namespace) -> dict[str, Any]:
    url = args.postgres_url or os.environ.get("AGENTID_TEST_POSTGRES_URL", "")
    if not url:
        raise SystemExit(
            "bench/check_vs_health_pg needs PostgreSQL: pass --postgres-url or set "
            "AGENTID_TEST_POSTGRES_URL (.ci/postgres creates a database and prints its URL)"
        )
    from list_sessions import prepare_postgres

    asyncio.run(prepare_postgres(H.postgres_url(url), args.wipe, schema=False))  # the servers' own
    ghz = H.ensure_ghz()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {kind: [] for kind in KINDS} for name in TOPOLOGIES
    }
    at1: dict[str, list[float]] = {"health": [], "warm": []}
    with H.temporary_directory("agentid-check-pg-") as folder, contextlib.ExitStack() as stack:
        source = H.export_commit(args.commit, folder / "src") if args.commit else None
        deployment = H.create_deployment(folder / "d", token_cache_size=1)
        protoset = folder / "agentid.protoset"
        H.write_protoset(protoset)
        topologies: dict[str, tuple[int, list[H.ServerProcess]]] = {}
        chains = iter(range(1, 1000))
        for name, count in TOPOLOGIES.items():
            port = free_port()
            servers = []
            for _ in range(count):  # one after the other: the first creates the schema and keys
                chain = f"bench-{next(chains)}"
                config = process_config(
                    deployment.config, folder / f"{chain}.toml", port=port, url=url, chain=chain
                )
                argv = H.serve_argv(args.venv, config, uvloop=args.uvloop)
                servers.append(
                    stack.enter_context(H.running_server(argv, folder / f"{chain}.log", source))
                )
            topologies[name] = (port, servers)
        tokens = H.delegate_tokens(topologies["one"][0], deployment.user_token(), args.tokens + 1)
        files = {
            "health": (H.HEALTH_METHOD, [{"service": ""}]),
            "warm": (H.CHECK_METHOD, H.check_messages(tokens[:1])),
            "cold": (H.CHECK_METHOD, H.check_messages(tokens[1:])),
        }
        paths = {}
        for kind, (_, messages) in files.items():
            paths[kind] = folder / f"{kind}.json"
            H.write_private(paths[kind], json.dumps(messages))
        for port, _ in topologies.values():
            H.sanity_check(port, deployment.api_key, tokens[:3])

        def run(name: str, kind: str, concurrency: int, seconds: float) -> dict[str, Any]:
            port, servers = topologies[name]
            connections = CONNECTIONS if concurrency > 1 else 1
            load = H.Ghz(ghz, port, deployment.metadata_file, protoset, connections, cpus=1)
            method = files[kind][0]
            load.run(f"{kind} warm-up", method, paths[kind], concurrency=concurrency,
                     seconds=args.warmup)  # fmt: skip
            pids = backend_pids(url)
            before = [s.cpu_seconds() for s in servers]
            pg_before = process_cpu(pids)
            result = load.run(kind, method, paths[kind], concurrency=concurrency, seconds=seconds)
            pg_after = process_cpu(pids)
            spent = sum(s.cpu_seconds() - b for s, b in zip(servers, before, strict=True))
            pg = sum(pg_after[p] - pg_before[p] for p in pg_after if p in pg_before)
            calls = max(1, result.calls)
            row = {
                "rps": result.rps,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "errors": result.errors,
                "server_cpu_us_per_call": round(spent / calls * 1e6, 1),
                "postgres_cpu_us_per_call": round(pg / calls * 1e6, 1),
            }
            H.log(
                f"  {name} {kind:6} c={concurrency:<3} {result.rps:>7.0f} calls/s  "
                f"p50 {result.p50_ms:.3f} ms  server {row['server_cpu_us_per_call']:.0f} us/call"
                f"  postgres {row['postgres_cpu_us_per_call']:.0f} us/call"
            )
            return row

        for round_number in range(args.rounds):
            H.log(f"round {round_number + 1}/{args.rounds}")
            names = list(TOPOLOGIES) if round_number % 2 == 0 else list(TOPOLOGIES)[::-1]
            for name in names:
                shift = round_number % len(KINDS)
                for kind in KINDS[shift:] + KINDS[:shift]:
                    raw[name][kind].append(run(name, kind, CONCURRENCY, args.seconds))
            for kind in ("health", "warm") if round_number % 2 == 0 else ("warm", "health"):
                at1[kind].append(run("one", kind, 1, args.seconds_1)["p50_ms"])
        for _, servers in topologies.values():
            for server in servers:
                H.check_server_log(server.log_path)
    return summarize(raw, at1)


def summarize(
    raw: dict[str, dict[str, list[dict[str, Any]]]], at1: dict[str, list[float]]
) -> dict[str, Any]:
    def median(values: list[float]) -> float:
        return round(float(statistics.median(values)), 3)

    summary: dict[str, Any] = {"rounds": raw, "p50_1_in_flight_ms": at1}
    for name, kinds in raw.items():
        figures: dict[str, Any] = {}
        for kind, rows in kinds.items():
            figures[kind] = {
                figure: median([row[figure] for row in rows])
                for figure in ("rps", "server_cpu_us_per_call", "postgres_cpu_us_per_call")
            }
        for kind in ("warm", "cold"):
            pairs = zip(kinds[kind], kinds["health"], strict=True)
            figures[f"{kind}_vs_health_rps"] = median([k["rps"] / h["rps"] for k, h in pairs])
        summary[name] = figures
    p50s = zip(at1["warm"], at1["health"], strict=True)
    summary["warm_vs_health_p50_1_in_flight"] = median([w / h for w, h in p50s])
    return summary


def print_summary(report: dict[str, Any]) -> None:
    figures = report["figures"]
    print("Check vs health on PostgreSQL, 64 in flight, medians over rounds")
    print(f"{'':14s} {'calls/s':>8s} {'server us/call':>15s} {'postgres us/call':>17s}")
    for name in TOPOLOGIES:
        for kind in KINDS:
            row = figures[name][kind]
            print(
                f"{name:4s} {kind:8s} {row['rps']:9.0f} {row['server_cpu_us_per_call']:15.0f}"
                f" {row['postgres_cpu_us_per_call']:17.0f}"
            )
        for kind in ("warm", "cold"):
            ratio = figures[name][f"{kind}_vs_health_rps"]
            print(f"{name:4s} {kind} ÷ health calls/s: {ratio:.3f}")
    print(f"warm p50 ÷ health p50 at 1 in flight: {figures['warm_vs_health_p50_1_in_flight']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement, 64 in flight")
    parser.add_argument("--seconds-1", type=float, default=2.0, help="per measurement, 1 in flight")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--tokens", type=int, default=1000, help="distinct tokens for cold")
    parser.add_argument("--postgres-url", default="")
    parser.add_argument(
        "--wipe", action="store_true", help="drop the project's tables the database holds first"
    )
    parser.add_argument("--uvloop", action="store_true", help="run the servers under uvloop")
    parser.add_argument("--venv", type=Path, default=H.MAIN_VENV)
    parser.add_argument("--out", type=Path, default=H.OUT / "check_vs_health_pg.json")
    parser.add_argument("--commit", help="measure this revision's server/ (git archive)")
    args = parser.parse_args()
    H.exit_on_signals()
    ghz = H.ensure_ghz()
    report = {
        "benchmark": "check_vs_health_pg",
        "machine": H.machine_info(ghz),
        "code": H.code_under_test(args.commit),
        "event_loop": "uvloop" if args.uvloop else "asyncio",
        "client": {
            "tool": "ghz",
            "connections": CONNECTIONS,
            "concurrency": CONCURRENCY,
            "seconds": args.seconds,
            "rounds": args.rounds,
        },
        "figures": measure(args),
    }
    return H.finish(report, args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

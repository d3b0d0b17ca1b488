"""Processes on one host (quality.md: "near-linear up to the core count"): the same deployment on
PostgreSQL served by one process, and by N processes sharing one address with
`server.reuse_port` (SO_REUSEPORT: the kernel spreads connections over them), each writing its own
audit chain (`audit.chain_id`).

Both topologies run at once on different ports, against one database; one is loaded at a time by
ghz (64 in flight over 8 HTTP/2 connections, so that the kernel has connections to spread),
health and warm Check in turn, rounds alternating the order. Per topology: calls/s and server CPU
per call (every process of the topology, all threads; and each process's share of the calls,
which tells whether the load was spread). Scaling is the N-process figure over the one-process
figure of the same round (median over rounds).

On a machine with fewer spare cores than N + the load generator, calls/s cannot scale: the
processes and ghz share the cores. CPU per call then says what the cores cannot: whether N
processes do the same work per call as one (nothing shared to contend on) or more.

Needs a PostgreSQL database the benchmark may write to: `--postgres-url`, else
AGENTID_TEST_POSTGRES_URL (`.ci/postgres` creates one and prints its URL). It must hold none of
the project's tables, or `--wipe` drops them first.

usage: bench/reuse_port [--processes N] [--rounds 4] [--seconds 3] [--postgres-url URL] [--wipe]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

import harness as H

CONCURRENCY = 64
CONNECTIONS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_config(base: Path, target: Path, *, port: int, url: str, chain: str) -> Path:
    """The deployment's config, on PostgreSQL at ``url``, listening on ``port`` with
    reuse_port, writing audit chain ``chain``."""
    text = base.read_text()
    listen = 'listen = "127.0.0.1:0"'
    assert listen in text, "harness.create_deployment's config changed"
    text = text.replace(listen, f'listen = "127.0.0.1:{port}"\nreuse_port = true')
    lines = [
        f"url = {json.dumps(url)}" if line.startswith("url = ") else line
        for line in text.splitlines()
        if not line.startswith("sqlite_writer")
    ]
    target.write_text("\n".join(lines) + f'\n\n[audit]\nchain_id = "{chain}"\n')
    return target


def measure(args: argparse.Namespace) -> dict[str, Any]:
    url = args.postgres_url or os.environ.get("AGENTID_TEST_POSTGRES_URL", "")
    if not url:
        raise SystemExit(
            "bench/reuse_port needs PostgreSQL: pass --postgres-url or set "
            "AGENTID_TEST_POSTGRES_URL (.ci/postgres creates a database and prints its URL)"
        )
    from list_sessions import prepare_postgres

    asyncio.run(prepare_postgres(H.postgres_url(url), args.wipe, schema=False))  # the servers' own
    ghz = H.ensure_ghz()
    samples: dict[str, list[dict[str, Any]]] = {"one": [], "many": []}
    with H.temporary_directory("agentid-reuse-port-") as folder, contextlib.ExitStack() as stack:
        source = H.export_commit(args.commit, folder / "src") if args.commit else None
        deployment = H.create_deployment(folder / "d", token_cache_size=1000)
        protoset = folder / "agentid.protoset"
        H.write_protoset(protoset)
        health = folder / "health.json"
        health.write_text(json.dumps({"service": ""}))
        topologies: dict[str, tuple[int, list[H.ServerProcess]]] = {}
        chains = iter(range(1, 1000))
        for name, count in (("one", 1), ("many", args.processes)):
            port = free_port()
            servers = []
            for _ in range(count):  # one after the other: the first creates the schema and keys
                chain = f"bench-{next(chains)}"
                config = process_config(
                    deployment.config, folder / f"{chain}.toml", port=port, url=url, chain=chain
                )
                argv = H.serve_argv(args.venv, config)
                servers.append(
                    stack.enter_context(H.running_server(argv, folder / f"{chain}.log", source))
                )
            topologies[name] = (port, servers)
        token = H.delegate_tokens(topologies["one"][0], deployment.user_token(), 1)
        check = folder / "check.json"
        check.write_text(json.dumps(H.check_messages(token)))
        for port, _ in topologies.values():
            H.sanity_check(port, deployment.api_key, token)
            load = H.Ghz(ghz, port, deployment.metadata_file, protoset, CONNECTIONS, cpus=1)
            load.run("warm-up", H.CHECK_METHOD, check, concurrency=CONCURRENCY, seconds=1)
        for round_number in range(args.rounds):
            order = ("one", "many") if round_number % 2 == 0 else ("many", "one")
            for name in order:
                port, servers = topologies[name]
                load = H.Ghz(ghz, port, deployment.metadata_file, protoset, CONNECTIONS, cpus=1)
                row: dict[str, Any] = {}
                for kind, method, data in (
                    ("health", H.HEALTH_METHOD, health),
                    ("check", H.CHECK_METHOD, check),
                ):
                    before = [s.cpu_seconds() for s in servers]
                    result = load.run(
                        kind, method, data, concurrency=CONCURRENCY, seconds=args.seconds
                    )
                    spent = [s.cpu_seconds() - b for s, b in zip(servers, before, strict=True)]
                    row[kind] = {
                        "rps": result.rps,
                        "p50_ms": result.p50_ms,
                        "server_cpu_us_per_call": round(sum(spent) / max(1, result.calls) * 1e6, 1),
                        "cpu_share": [round(s / max(sum(spent), 1e-9), 2) for s in spent],
                    }
                samples[name].append(row)
            H.log(f"round {round_number + 1}/{args.rounds} done")
        for _, servers in topologies.values():
            for server in servers:
                H.check_server_log(server.log_path)
    return summarize(samples, args.processes)


def summarize(samples: dict[str, list[dict[str, Any]]], processes: int) -> dict[str, Any]:
    def median(name: str, kind: str, figure: str) -> float:
        return round(float(statistics.median(row[kind][figure] for row in samples[name])), 1)

    def scaling(kind: str, figure: str) -> float:
        pairs = zip(samples["many"], samples["one"], strict=True)
        return round(
            float(statistics.median(m[kind][figure] / o[kind][figure] for m, o in pairs)), 3
        )

    summary: dict[str, Any] = {"processes": processes, "rounds": samples}
    for kind in ("health", "check"):
        summary[kind] = {
            "one_rps": median("one", kind, "rps"),
            "many_rps": median("many", kind, "rps"),
            "rps_many_over_one": scaling(kind, "rps"),
            "one_cpu_us_per_call": median("one", kind, "server_cpu_us_per_call"),
            "many_cpu_us_per_call": median("many", kind, "server_cpu_us_per_call"),
            "cpu_per_call_many_over_one": scaling(kind, "server_cpu_us_per_call"),
        }
    return summary


def print_summary(report: dict[str, Any]) -> None:
    figures = report["figures"]
    n = figures["processes"]
    print(f"1 process vs {n} processes on one address (SO_REUSEPORT), PostgreSQL, 64 in flight")
    print(f"{'':8s} {'calls/s 1':>10s} {f'calls/s {n}':>10s} {'ratio':>6s}   "
          f"{'CPU/call 1':>10s} {f'CPU/call {n}':>10s} {'ratio':>6s}")  # fmt: skip
    for kind in ("health", "check"):
        row = figures[kind]
        print(
            f"{kind:8s} {row['one_rps']:10.0f} {row['many_rps']:10.0f} "
            f"{row['rps_many_over_one']:6.2f}   {row['one_cpu_us_per_call']:8.0f}us "
            f"{row['many_cpu_us_per_call']:8.0f}us {row['cpu_per_call_many_over_one']:6.2f}"
        )
    shares = [row["check"]["cpu_share"] for row in figures["rounds"]["many"]]
    print(f"each process's share of the {n}-process CPU, Check, per round: {shares}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--postgres-url", default="")
    parser.add_argument(
        "--wipe", action="store_true", help="drop the project's tables the database holds first"
    )
    parser.add_argument("--venv", type=Path, default=H.MAIN_VENV)
    parser.add_argument("--out", type=Path, default=H.OUT / "reuse_port.json")
    parser.add_argument("--commit", help="measure this revision's server/ (git archive)")
    args = parser.parse_args()
    if args.processes < 2:
        parser.error("--processes must be at least 2")
    H.exit_on_signals()
    report = {
        "benchmark": "reuse_port",
        "concurrency": CONCURRENCY,
        "connections": CONNECTIONS,
        "seconds": args.seconds,
        "code": H.code_under_test(args.commit),
        "machine": H.machine_info(),
        "figures": measure(args),
    }
    return H.finish(report, args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

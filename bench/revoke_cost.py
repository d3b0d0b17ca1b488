"""Revoke's cost: server CPU and database statements per Revoke at 1 watcher, against a bare push,
on SQLite and on PostgreSQL in one run.

Servers, each its own process, all up for the whole run:

* agentid per backend (`--database sqlite`, the default, and/or `--database postgresql+asyncpg://…`,
  the same deployment otherwise: bench/revocation_push's, a service key with role `admin`, an agent
  kind that may delegate to sub-agents), started through bench/counted_serve.py, which counts the
  statements the server sends to its database at the driver (sqlite3's trace callback; asyncpg's
  round trips);
* the baseline, bench/push_baseline_server.py: a unary Publish that hands an event-sized message to
  its subscribers' streams before it answers (bench/revocation_push explains it).

Three kinds of call, one at a time, each block with its own watcher process (bench/revocation_push's
`_watch`, one stream): `push` (the baseline's Publish), `session` (Revoke of a lone session) and
`tree` (Revoke of a session with `--descendants` sub-agents below it, delegated beforehand: a
binary tree, so 3 is a root, two children and a grandchild). Each call waits until the watcher
received the call's sequence (for a tree, the last of its events), pauses 1.5-4.5 ms, and calls
again. Rounds rotate the order of the kinds and the backends.

Per block: the server's CPU (utime + stime of the whole process) over the counted calls; on
PostgreSQL the CPU of the database's backends serving it (/proc, so the server must be local); the
statements by first word (SELECT, INSERT, …, BEGIN, COMMIT, SAVEPOINT); call latency. Figures are
medians over rounds (CPU) or pooled (statements, latency); the ratio is Revoke ÷ push of the same
round's CPU per call, median over rounds.

The PostgreSQL database must be empty of the project's tables, or `--wipe` drops them first.

usage: bench/revoke_cost [--database sqlite|URL ... [--wipe]] [--descendants 3] [--rounds 4]
                         [--calls 100] [--commit REV] [--profile] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import harness as H
from check_vs_health_pg import process_cpu
from counted_serve import KINDS as STATEMENT_KINDS
from counted_serve import read_counts
from revocation_push import (
    BASELINE_PORT_LINE,
    BASELINE_SERVER,
    CHANNEL_OPTIONS,
    METHODS,
    LineReader,
    now_ns,
    percentile,
    read_metadata,
    revoke_request,
    typical_event_bytes,
)
from revocation_push import SCRIPT as WATCHER_SCRIPT

HERE = Path(__file__).resolve().parent
COUNTED_SERVE = HERE / "counted_serve.py"


@dataclass
class Backend:
    name: str  # "sqlite" or "postgres"
    url: str
    server: H.ServerProcess
    counts_file: Path


@dataclass
class BlockResult:
    backend: str  # "" for the push baseline
    kind: str
    calls: int
    sessions_per_call: int
    server_cpu_s: float
    postgres_cpu_s: float | None
    statements: dict[str, int]
    call_ms: list[float] = field(default_factory=list)
    start_to_receipt_ms: list[float] = field(default_factory=list)

    def per_call_us(self, seconds: float) -> float:
        return seconds / self.calls * 1e6


# -- the deployment --------------------------------------------------------------------------------


def backend_config(base: Path, target: Path, url: str) -> Path:
    """The deployment's config on the database at ``url`` (PostgreSQL: no SQLite writer)."""
    lines = [
        f"url = {json.dumps(url)}" if line.startswith("url = ") else line
        for line in base.read_text().splitlines()
        if not (line.startswith("sqlite_writer") and not url.startswith("sqlite"))
    ]
    target.write_text("\n".join(lines) + "\n")
    return target


async def _mint(
    port: int, user_token: str, lone: int, trees: int, descendants: int
) -> tuple[list[str], list[str]]:
    """``lone`` sessions, and ``trees`` roots each with ``descendants`` sub-agents below it (node i
    delegated by node (i - 1) // 2), through Delegate; every session may delegate."""
    from agentid.v1 import agentid_pb2 as pb
    from agentid.v1 import agentid_pb2_grpc

    request = pb.DelegateRequest(
        agent_id=H.AGENT_ID, scopes=[H.ACTION, H.DELEGATE_SCOPE], task="benchmark"
    )
    user = (("authorization", f"Bearer {user_token}"),)
    sessions: list[str] = []
    roots: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)

        async def tree() -> str:
            tokens: list[str] = []
            root_id = ""
            for node in range(descendants + 1):
                metadata = (
                    user if node == 0 else (("authorization", f"Bearer {tokens[(node - 1) // 2]}"),)
                )
                answer = await stub.Delegate(request, metadata=metadata, timeout=30)
                tokens.append(answer.token)
                root_id = root_id or answer.session_id
            return root_id

        async def worker(lone_share: int, tree_share: int) -> None:
            for _ in range(lone_share):
                answer = await stub.Delegate(request, metadata=user, timeout=30)
                sessions.append(answer.session_id)
            for _ in range(tree_share):
                roots.append(await tree())

        workers = 16
        await asyncio.gather(
            *(
                worker(
                    lone // workers + (i < lone % workers), trees // workers + (i < trees % workers)
                )
                for i in range(workers)
            )
        )
    return sessions, roots


async def backend_pids(url: str) -> list[int]:
    """The server processes of every connection to the database (this one's excluded)."""
    import asyncpg  # type: ignore[import-untyped]  # the server's driver, in the project venv

    connection = await asyncpg.connect(H.postgres_dsn(url))
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    return [int(row["pid"]) for row in rows]


# -- one block -------------------------------------------------------------------------------------


def _answer_sequence(kind: str, response: bytes, sessions: int) -> int:
    if kind == "push":
        return int.from_bytes(response[:8], "big")
    from agentid.v1 import agentid_pb2 as pb

    answer = pb.RevokeResponse.FromString(response)
    if len(answer.session_ids) != sessions:
        raise RuntimeError(f"Revoke revoked {len(answer.session_ids)} sessions, not {sessions}")
    return answer.revocation_sequence


async def measure_block(
    *,
    kind: str,
    port: int,
    server: H.ServerProcess,
    backend: Backend | None,
    requests: list[bytes],
    sessions_per_call: int,
    args: argparse.Namespace,
    rng: random.Random,
    profile_to: Path | None,
) -> BlockResult:
    watch_kind = "baseline" if kind == "push" else "agentid"
    out = args.directory / f"receipts-{kind}.json"
    out.unlink(missing_ok=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(WATCHER_SCRIPT), "_watch", "--kind", watch_kind, "--port", str(port),
        "--watchers", "1", "--metadata-file", str(args.metadata_file), "--out", str(out),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    metadata = read_metadata(args.metadata_file)
    sent: list[int] = []
    acked: list[int] = []
    sequences: list[int] = []
    postgres = backend is not None and backend.name == "postgres"
    try:
        lines = LineReader(process)
        await lines.expect("ready", within=120)
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=CHANNEL_OPTIONS
        ) as channel:
            publish = channel.unary_unary(
                METHODS[watch_kind][1], request_serializer=None, response_deserializer=None
            )
            for index, request in enumerate(requests):
                if index == args.warmup:
                    pids = await backend_pids(backend.url) if postgres and backend else []
                    pg_before = process_cpu(pids)
                    counts_before = read_counts(backend.counts_file) if backend else {}
                    cpu_before = server.cpu_seconds()
                    if profile_to is not None:
                        os.kill(server.pid, signal.SIGUSR2)
                started = now_ns()
                response = await publish(request, metadata=metadata, timeout=30)
                answered = now_ns()
                sequence = _answer_sequence(kind, response, sessions_per_call)
                while (got := int(await lines.expect("got ", within=30))) < sequence:
                    pass
                if got != sequence:
                    raise RuntimeError(f"answered sequence {sequence}, the watcher got {got}")
                if index >= args.warmup:
                    sent.append(started)
                    acked.append(answered)
                    sequences.append(sequence)
                await asyncio.sleep(args.gap * rng.uniform(0.5, 1.5))
        server_cpu = server.cpu_seconds() - cpu_before
        if profile_to is not None:
            os.kill(server.pid, signal.SIGUSR2)
        counts_after = read_counts(backend.counts_file) if backend else {}
        pg_after = process_cpu(pids) if postgres else {}
        process.send_signal(signal.SIGTERM)
        if await asyncio.wait_for(process.wait(), 30) != 0:
            raise RuntimeError(f"the watcher process failed ({process.returncode})")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if profile_to is not None and backend is not None:
        await _collect_profile(backend.counts_file, profile_to)
    receipts = json.loads(out.read_text())["receipts"]
    return BlockResult(
        backend=backend.name if backend else "",
        kind=kind,
        calls=len(acked),
        sessions_per_call=sessions_per_call,
        server_cpu_s=server_cpu,
        postgres_cpu_s=(
            sum(pg_after[p] - pg_before[p] for p in pg_after if p in pg_before)
            if postgres
            else None
        ),
        statements={k: counts_after[k] - counts_before[k] for k in counts_after},
        call_ms=[(a - s) / 1e6 for s, a in zip(sent, acked, strict=True)],
        start_to_receipt_ms=[
            (max(receipts[str(q)]) - s) / 1e6 for s, q in zip(sent, sequences, strict=True)
        ],
    )


async def _collect_profile(counts_file: Path, target: Path) -> None:
    """The profile the server writes at the second SIGUSR2, moved to ``target``."""
    for _ in range(200):
        written = sorted(counts_file.parent.glob(counts_file.name + ".prof*"))
        if written:
            await asyncio.sleep(0.2)  # let the dump finish
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(written[0], target)
            return
        await asyncio.sleep(0.05)
    H.log(f"no profile from the server for {target.name}")


# -- the run ---------------------------------------------------------------------------------------


async def measure_all(
    backends: list[Backend],
    baseline: H.ServerProcess,
    minted: dict[str, tuple[list[str], list[str]]],
    args: argparse.Namespace,
) -> list[BlockResult]:
    rng = random.Random(11)
    per_block = args.warmup + args.calls
    payload = bytes(8) + bytes(max(0, typical_event_bytes() - 8))
    lone = {name: iter(sessions) for name, (sessions, _) in minted.items()}
    trees = {name: iter(roots) for name, (_, roots) in minted.items()}
    results: list[BlockResult] = []
    plan: list[tuple[str, Backend | None]] = [("push", None)]
    for backend in backends:
        plan += [("session", backend), ("tree", backend)]
    for round_no in range(args.rounds):
        shift = round_no % len(plan)
        order = plan[shift:] + plan[:shift]
        if round_no % 2:
            order.reverse()
        for kind, target in order:
            profile_to = None
            if target is None:
                server, requests, sessions = baseline, [payload] * per_block, 1
            else:
                ids = lone[target.name] if kind == "session" else trees[target.name]
                server = target.server
                requests = [revoke_request(next(ids)) for _ in range(per_block)]
                sessions = 1 if kind == "session" else args.descendants + 1
                if args.profile:
                    name = f"{target.name}-{kind}-{round_no + 1}.prof"
                    profile_to = H.OUT / "revoke_cost-profiles" / name
            block = await measure_block(
                kind=kind, port=server.port, server=server, backend=target, requests=requests,
                sessions_per_call=sessions, args=args, rng=rng, profile_to=profile_to,
            )  # fmt: skip
            results.append(block)
            where = f"{target.name} " if target else ""
            line = (
                f"  round {round_no + 1}/{args.rounds} {where + kind:16} "
                f"server {block.per_call_us(block.server_cpu_s):6.0f} us/call"
            )
            if block.postgres_cpu_s is not None:
                line += f"  postgres {block.per_call_us(block.postgres_cpu_s):5.0f} us/call"
            if block.statements:
                line += f"  {sum(block.statements.values()) / block.calls:5.1f} statements/call"
            H.log(line + f"  call p50 {statistics.median(block.call_ms):.2f} ms")
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = H.machine_info()
    code = H.code_under_test(args.commit)
    per_block = args.warmup + args.calls
    with (
        H.temporary_directory("agentid-bench-revoke-") as directory,
        contextlib.ExitStack() as stack,
    ):
        args.directory = directory
        source = H.export_commit(args.commit, directory / "src") if args.commit else None
        deployment = H.create_deployment(
            directory / "agentid", token_cache_size=1024, roles=["admin"], sub_agents=True
        )
        args.metadata_file = deployment.metadata_file
        python = str(args.venv / "bin" / "python")
        backends: list[Backend] = []
        for database in args.database:
            name = "sqlite" if database == "sqlite" else "postgres"
            if any(b.name == name for b in backends):
                raise SystemExit(f"--database {name} given twice")
            url = f"sqlite+aiosqlite:///{directory}/agentid.db" if name == "sqlite" else database
            if name == "postgres":  # a database of the schema and nothing in it
                from list_sessions import prepare_postgres

                asyncio.run(prepare_postgres(H.postgres_url(url), args.wipe))
            config = backend_config(deployment.config, directory / f"{name}.toml", url)
            counts = directory / f"{name}.counts"
            argv = [python, str(COUNTED_SERVE), str(counts), str(config)]
            if args.profile:
                argv.append("--profile")
            if args.trace:
                H.OUT.mkdir(parents=True, exist_ok=True)
                trace = H.OUT / f"revoke_cost-{name}.statements"
                trace.unlink(missing_ok=True)
                argv += ["--trace", str(trace)]
            server = stack.enter_context(H.running_server(argv, directory / f"{name}.log", source))
            H.log(f"agentid on {name}: pid {server.pid}, 127.0.0.1:{server.port}")
            backends.append(Backend(name, url, server, counts))
        baseline = stack.enter_context(
            H.running_server(
                [python, str(BASELINE_SERVER)], directory / "baseline.log",
                port_line=BASELINE_PORT_LINE,
            )
        )  # fmt: skip
        minted = {}
        for backend in backends:
            blocks = per_block * args.rounds
            minted[backend.name] = asyncio.run(
                _mint(
                    backend.server.port, deployment.user_token(), blocks, blocks, args.descendants
                )
            )
            H.log(
                f"minted {blocks} lone sessions and {blocks} trees of {args.descendants + 1} on "
                f"{backend.name}"
            )
        gc.collect()
        gc.disable()  # no collection in the publisher while it measures
        try:
            results = asyncio.run(measure_all(backends, baseline, minted, args))
        finally:
            gc.enable()
        for backend in backends:
            H.check_server_log(backend.server.log_path, f"agentid on {backend.name}")
        H.check_server_log(baseline.log_path, "baseline")
    return {
        "benchmark": "revoke_cost",
        "machine": machine,
        "code": code,
        "server": {
            "venv": str(args.venv),
            "packages": H.python_packages(
                args.venv / "bin" / "python", ["grpcio", "protobuf", "SQLAlchemy", "asyncpg"]
            ),
            "event_loop": "asyncio",
            "profiled": args.profile,
        },
        "client": {
            "watchers": 1,
            "rounds": args.rounds,
            "calls_per_block": args.calls,
            "warmup_calls_per_block": args.warmup,
            "gap_ms": args.gap * 1000,
            "descendants": args.descendants,
        },
        "figures": summarize(results, [b.name for b in backends], args.descendants),
    }


def summarize(results: list[BlockResult], backends: list[str], descendants: int) -> dict[str, Any]:
    def median(values: list[float]) -> float:
        return round(float(statistics.median(values)), 1)

    push = [r for r in results if r.kind == "push"]
    figures: dict[str, Any] = {
        "push": {
            "server_cpu_us_per_call": median([r.per_call_us(r.server_cpu_s) for r in push]),
            "call_ms_p50": round(percentile([x for r in push for x in r.call_ms], 50), 3),
        }
    }
    for backend in backends:
        for kind in ("session", "tree"):
            blocks = [r for r in results if r.backend == backend and r.kind == kind]
            calls = sum(r.calls for r in blocks)
            statements = {
                k: round(sum(r.statements[k] for r in blocks) / calls, 2) for k in STATEMENT_KINDS
            }
            row: dict[str, Any] = {
                "sessions_per_call": blocks[0].sessions_per_call,
                "server_cpu_us_per_call": median([r.per_call_us(r.server_cpu_s) for r in blocks]),
                "vs_push_cpu": round(
                    statistics.median(
                        r.server_cpu_s / r.calls / (p.server_cpu_s / p.calls)
                        for r, p in zip(blocks, push, strict=True)
                    ),
                    2,
                ),
                "statements_per_call": round(sum(statements.values()), 2),
                "statements_by_kind": {k: v for k, v in statements.items() if v},
                "call_ms_p50": round(percentile([x for r in blocks for x in r.call_ms], 50), 3),
                "call_ms_p99": round(percentile([x for r in blocks for x in r.call_ms], 99), 3),
                "start_to_receipt_ms_p50": round(
                    percentile([x for r in blocks for x in r.start_to_receipt_ms], 50), 3
                ),
                "per_round_server_cpu_us": [round(r.per_call_us(r.server_cpu_s)) for r in blocks],
            }
            if blocks[0].postgres_cpu_s is not None:
                row["postgres_cpu_us_per_call"] = median(
                    [r.per_call_us(r.postgres_cpu_s or 0.0) for r in blocks]
                )
            figures[f"{backend} {kind}"] = row
        one, tree = figures[f"{backend} session"], figures[f"{backend} tree"]
        figures[f"{backend} per descendant"] = {
            "server_cpu_us": round(
                (tree["server_cpu_us_per_call"] - one["server_cpu_us_per_call"]) / descendants, 1
            ),
            "statements": round(
                (tree["statements_per_call"] - one["statements_per_call"]) / descendants, 2
            ),
        }
    return figures


def _cell(value: float | str) -> str:
    if isinstance(value, str):
        return f"{value:>15}"
    return f"{value:>15.0f}" if value >= 100 else f"{value:>15.2f}"


def print_summary(report: dict[str, Any]) -> None:
    figures = report["figures"]
    client = report["client"]
    print(
        f"Revoke's cost at 1 watcher, {client['rounds']} rounds x {client['calls_per_block']} calls"
        f" per kind (tree: a session and {client['descendants']} descendants)"
    )
    push = figures["push"]
    header = ("server us/call", "÷ push", "postgres us", "statements", "call p50 ms")
    print(f"{'':18}" + "".join(f"{title:>15}" for title in header))
    cells = (push["server_cpu_us_per_call"], 1, "", "", push["call_ms_p50"])
    print(f"{'push (baseline)':18}" + "".join(_cell(value) for value in cells))
    for name, row in figures.items():
        if name == "push" or name.endswith("per descendant"):
            continue
        cells = (
            row["server_cpu_us_per_call"], row["vs_push_cpu"],
            row.get("postgres_cpu_us_per_call", ""), row["statements_per_call"],
            row["call_ms_p50"],
        )  # fmt: skip
        print(f"{name:18}" + "".join(_cell(value) for value in cells))
        kinds = ", ".join(f"{k} {v:g}" for k, v in row["statements_by_kind"].items())
        print(f"{'':18}statements: {kinds}")
    for name, row in figures.items():
        if name.endswith("per descendant"):
            print(f"{name}: {row['server_cpu_us']:.0f} us, {row['statements']:g} statements")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--database", action="append",
        help="sqlite, or a PostgreSQL URL the benchmark may write to; repeat for both "
        "(default: sqlite)",
    )  # fmt: skip
    parser.add_argument(
        "--wipe", action="store_true",
        help="drop the project's tables in the PostgreSQL database first (refused without it)",
    )  # fmt: skip
    parser.add_argument("--descendants", type=int, default=3, help="sub-agents below a tree's root")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=100, help="counted calls per block")
    parser.add_argument("--warmup", type=int, default=15, help="uncounted calls per block")
    parser.add_argument("--gap", type=float, default=0.003, help="mean pause between calls, s")
    parser.add_argument("--venv", type=Path, default=H.MAIN_VENV, help="the servers' venv")
    parser.add_argument("--commit", help="measure this revision's server/ (git archive)")
    parser.add_argument(
        "--profile", action="store_true",
        help="cProfile the servers during the counted Revokes, into bench/out/revoke_cost-profiles"
        " (diagnostic: the CPU figures then include the profiler's)",
    )  # fmt: skip
    parser.add_argument(
        "--trace", action="store_true",
        help="append every statement to bench/out/revoke_cost-<backend>.statements",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=H.OUT / "revoke_cost.json")
    args = parser.parse_args()
    args.database = args.database or ["sqlite"]
    H.exit_on_signals()
    return H.finish(run(args), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())

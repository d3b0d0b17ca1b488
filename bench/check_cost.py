"""Where a warm Check's server CPU goes: the same server built with stages of the Check taken
away, every build serving at once, each loaded at one fixed request rate by ghz (so every build
does the same work per second), health and Check alternating on each server, rounds interleaved.
A stage's cost is the Check's server CPU per call minus health's on the same server in the same
round (the median over rounds), so the machine's drift cancels out.

The builds are this file's `--serve BUILD CONFIG` mode; they exist only here, never in the service:

* bare: Check answered by a handler that returns an empty CheckResponse (no caller check, no
  parsing): our generic handler and the transport alone;
* authenticated: the caller's API key checked, the method policy applied and the request parsed,
  then an empty answer;
* no_audit: the whole Check, with Journal.append answering at once (as in bench/audit_cost);
* no_store: the whole Check and the journal's whole path (group, ids, hash chain, futures),
  only the SQLite insert and commit left out;
* durable: the service as shipped.

The builds patch the service's internals as they are in this file's revision; `--commit` runs
them against another revision's server/, which works as long as those internals are unchanged.

usage: bench/check_cost [--rounds 6] [--seconds 2] [--rate 1200] [--commit REV]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import harness as H

BUILDS = ("bare", "authenticated", "no_audit", "no_store", "durable")


def serve(build: str, config: str) -> int:
    """Starts `agentid serve` with the stages of ``build`` taken away."""
    import grpc
    from agentid.v1 import agentid_pb2 as pb
    from agentid_server.api import handlers, servicer
    from agentid_server.cli.root import main
    from agentid_server.storage import journal, rows
    from agentid_server.storage.audit_chain import GENESIS

    async def empty_check(*_args: Any) -> pb.CheckResponse:
        return pb.CheckResponse()

    if build == "bare":
        original = handlers._unary

        def unary(call: Any, behavior: Any, observer: Any) -> Any:
            if call.name != "Check":
                return original(call, behavior, observer)
            return grpc.unary_unary_rpc_method_handler(
                empty_check, request_deserializer=None, response_serializer=handlers._serialize
            )

        handlers._unary = unary
    elif build == "authenticated":
        servicer.AgentIdentityServicer.Check = empty_check  # type: ignore[assignment]
    elif build == "no_audit":
        numbers = itertools.count(1)

        async def append(self: journal.Journal, event: Any, *, new_session: Any = None) -> int:
            return next(numbers)

        journal.Journal.append = append  # type: ignore[method-assign]
    elif build == "no_store":
        original_write = journal.Journal._write_sqlite

        def write(self: journal.Journal, batch: list[Any]) -> list[Any]:
            if any(item.job is not None or item.session is not None for item in batch):
                return original_write(self, batch)  # Delegate's session must exist
            if self._next_id is None:
                self._next_id, self._chain_head = 1 << 40, GENESIS
            sealed = self._seal([rows.audit_row(item.event) for item in batch])
            return [journal._Outcome(value=row[0], ids=[row[0]]) for row in sealed]

        journal.Journal._write_sqlite = write  # type: ignore[method-assign]
    elif build != "durable":
        raise SystemExit(f"unknown build {build!r}")
    return int(main(["serve", "--config", config]))


def measure(rounds: int, seconds: float, rate: int, commit: str | None) -> dict[str, Any]:
    ghz = H.ensure_ghz()
    python = H.MAIN_VENV / "bin" / "python"
    samples: dict[str, list[tuple[float, float]]] = {build: [] for build in BUILDS}
    with H.temporary_directory("agentid-check-cost-") as folder, contextlib.ExitStack() as stack:
        source = H.export_commit(commit, folder / "src") if commit else None
        protoset = folder / "agentid.protoset"
        H.write_protoset(protoset)
        health = folder / "health.json"
        health.write_text(json.dumps({"service": ""}))
        servers: dict[str, tuple[H.ServerProcess, H.Ghz, Path]] = {}
        for build in BUILDS:
            deployment = H.create_deployment(folder / build, token_cache_size=1000)
            argv = [str(python), str(Path(__file__).resolve()), "--serve", build,
                    str(deployment.config)]  # fmt: skip
            server = stack.enter_context(H.running_server(argv, folder / f"{build}.log", source))
            tokens = H.delegate_tokens(server.port, deployment.user_token(), 1)
            check = folder / f"{build}-check.json"
            check.write_text(json.dumps(H.check_messages(tokens)))
            load = H.Ghz(ghz, server.port, deployment.metadata_file, protoset, cpus=1)
            load.run("warm-up", H.CHECK_METHOD, check, concurrency=32, seconds=1, rps=rate)
            servers[build] = (server, load, check)
        for round_number in range(rounds):
            order = BUILDS if round_number % 2 == 0 else BUILDS[::-1]
            for build in order:
                server, load, check = servers[build]
                run = functools.partial(
                    load.run, concurrency=32, seconds=seconds, server=server, rps=rate
                )
                h = run("health", H.HEALTH_METHOD, health)
                c = run("check", H.CHECK_METHOD, check)
                samples[build].append((h.server_cpu_us_per_call, c.server_cpu_us_per_call))
            H.log(f"round {round_number + 1}/{rounds} done")
    summary: dict[str, Any] = {}
    for build, pairs in samples.items():
        summary[build] = {
            "health_cpu_us": round(statistics.median(h for h, _ in pairs), 1),
            "check_cpu_us": round(statistics.median(c for _, c in pairs), 1),
            "check_minus_health_us": round(statistics.median(c - h for h, c in pairs), 1),
            "health_over_check_cpu": round(statistics.median(h / c for h, c in pairs), 3),
            "rounds": [{"health_cpu_us": h, "check_cpu_us": c} for h, c in pairs],
        }
    return summary


def print_summary(report: dict[str, Any]) -> None:
    print(f"fixed rate {report['rate']}/s, {report['rounds']} rounds; server CPU per call (µs)")
    print(f"{'build':15s} {'health':>8s} {'check':>8s} {'check-health':>13s} {'health/check':>13s}")
    for build in BUILDS:
        row = report["builds"][build]
        print(
            f"{build:15s} {row['health_cpu_us']:8.0f} {row['check_cpu_us']:8.0f} "
            f"{row['check_minus_health_us']:13.0f} {row['health_over_check_cpu']:13.2f}"
        )


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rate", type=int, default=1200, help="calls per second, both kinds")
    parser.add_argument("--out", type=Path, default=H.OUT / "check_cost.json")
    parser.add_argument("--commit", help="measure this revision's server/ (git archive)")
    args = parser.parse_args()
    H.exit_on_signals()
    report = {
        "benchmark": "check_cost",
        "rate": args.rate,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "code": H.code_under_test(args.commit),
        "machine": H.machine_info(),
        "builds": measure(args.rounds, args.seconds, args.rate, args.commit),
    }
    return H.finish(report, args.out, print_summary)


if __name__ == "__main__":
    raise SystemExit(main())

"""What the durable audit costs a Check: warm Check with the audit written (group commit, hash
chain, on disk before the answer) against the same warm Check in a benchmark build where the
journal's append answers at once without writing, and grpc.health.v1 Check as the baseline, all
from ghz at 64 in flight against servers of one run, rounds interleaved.

The benchmark build is this file's `--serve-without-audit` mode: it starts the real server after
replacing Journal.append with a counter. It exists only here, never in the service.

usage: bench/audit_cost [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import harness as H

ROOT = Path(__file__).resolve().parent.parent


def serve_without_audit(config: str) -> int:
    from agentid_server.cli import main
    from agentid_server.storage.journal import Journal

    numbers = itertools.count(1)

    async def append(self: Journal, event: Any, *, new_session: Any = None) -> int:
        return next(numbers)

    Journal.append = append  # type: ignore[method-assign]
    return int(main(["serve", "--config", config]))


def measure(rounds: int, seconds: float) -> dict[str, Any]:
    ghz = H.ensure_ghz()
    python = ROOT / ".venv" / "bin" / "python"
    results: dict[str, list[dict[str, float]]] = {"durable": [], "no_audit": []}
    with H.temporary_directory("agentid-audit-cost-") as folder:
        protoset = folder / "agentid.protoset"
        H.write_protoset(protoset)
        for round_number in range(rounds):
            for variant in ("durable", "no_audit"):
                deployment = H.create_deployment(
                    folder / f"{variant}-{round_number}", token_cache_size=1000
                )
                argv = (
                    [str(python), str(Path(__file__).resolve()), "--serve-without-audit",
                     str(deployment.config)]
                    if variant == "no_audit"
                    else H.serve_argv(ROOT / ".venv", deployment.config)
                )  # fmt: skip
                log = folder / f"{variant}-{round_number}.log"
                with H.running_server(argv, log) as server:
                    tokens = H.delegate_tokens(server.port, deployment.user_token(), 1)
                    check = folder / "check.json"
                    check.write_text(json.dumps(H.check_messages(tokens)))
                    health = folder / "health.json"
                    health.write_text(json.dumps({"service": ""}))
                    load = H.Ghz(ghz, server.port, deployment.metadata_file, protoset, cpus=1)
                    load.run("warm-up", CHECK, check, concurrency=64, seconds=1)
                    h = load.run(
                        "health", HEALTH, health, concurrency=64, seconds=seconds, server=server
                    )
                    w = load.run(
                        "check", CHECK, check, concurrency=64, seconds=seconds, server=server
                    )
                    results[variant].append(
                        {
                            "health_rps": h.rps,
                            "check_rps": w.rps,
                            "check_vs_health": w.rps / h.rps,
                            "check_cpu_us": w.server_cpu_us_per_call,
                            "health_cpu_us": h.server_cpu_us_per_call,
                        }
                    )
                    H.log(f"round {round_number} {variant}: check/health {w.rps / h.rps:.2f}")
    summary: dict[str, Any] = {}
    for variant, rows in results.items():
        summary[variant] = {
            key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]
        }
    durable, free = summary["durable"], summary["no_audit"]
    summary["durable_vs_no_audit_check_rps"] = round(
        durable["check_vs_health"] / free["check_vs_health"], 3
    )
    summary["audit_cpu_us_per_check"] = round(durable["check_cpu_us"] - free["check_cpu_us"], 1)
    return summary


CHECK = "agentid.v1.AgentIdentityService.Check"
HEALTH = "grpc.health.v1.Health.Check"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-without-audit":
        return serve_without_audit(sys.argv[2])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/audit_cost.json")
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    args = parser.parse_args()
    summary = measure(args.rounds, args.seconds)
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "audit_cost", **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

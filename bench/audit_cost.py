"""What the durable audit costs a Check: warm Check with the audit written (group commit, hash
chain, on disk before the answer) against the same warm Check in a benchmark build where the
journal's append answers at once without writing, and grpc.health.v1 Check as the baseline, all
from ghz at 64 in flight against servers of one run, rounds interleaved.

The two servers are bench/check_cost's `durable` and `no_audit` builds (the latter replaces
Journal.append with a counter, in the benchmark's process only); check_cost measures the same pair
at a fixed rate, this one at saturation. A round runs the two in alternating order.

usage: bench/audit_cost [--rounds 3] [--seconds 3] [--commit REV]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import harness as H

CHECK_COST = Path(__file__).resolve().parent / "check_cost.py"  # where the two builds live


def measure(rounds: int, seconds: float, commit: str | None) -> dict[str, Any]:
    ghz = H.ensure_ghz()
    python = H.MAIN_VENV / "bin" / "python"
    results: dict[str, list[dict[str, float]]] = {"durable": [], "no_audit": []}
    with H.temporary_directory("agentid-audit-cost-") as folder:
        source = H.export_commit(commit, folder / "src") if commit else None
        protoset = folder / "agentid.protoset"
        H.write_protoset(protoset)
        health = folder / "health.json"
        health.write_text(json.dumps({"service": ""}))
        for round_number in range(rounds):
            order = ("durable", "no_audit") if round_number % 2 == 0 else ("no_audit", "durable")
            for variant in order:
                deployment = H.create_deployment(
                    folder / f"{variant}-{round_number}", token_cache_size=1000
                )
                argv = [str(python), str(CHECK_COST), "--serve", variant, str(deployment.config)]
                log = folder / f"{variant}-{round_number}.log"
                with H.running_server(argv, log, source) as server:
                    tokens = H.delegate_tokens(server.port, deployment.user_token(), 1)
                    check = folder / f"check-{variant}-{round_number}.json"
                    check.write_text(json.dumps(H.check_messages(tokens)))
                    load = H.Ghz(ghz, server.port, deployment.metadata_file, protoset, cpus=1)
                    load.run("warm-up", H.CHECK_METHOD, check, concurrency=64, seconds=1)
                    h = load.run(
                        "health",
                        H.HEALTH_METHOD,
                        health,
                        concurrency=64,
                        seconds=seconds,
                        server=server,
                    )
                    w = load.run(
                        "check",
                        H.CHECK_METHOD,
                        check,
                        concurrency=64,
                        seconds=seconds,
                        server=server,
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
    summary["rounds"] = results
    return summary


def print_summary(report: dict[str, Any]) -> None:
    for variant in ("durable", "no_audit"):
        row = report[variant]
        print(
            f"{variant:9s} health {row['health_rps']:7.0f}/s  check {row['check_rps']:7.0f}/s  "
            f"check/health {row['check_vs_health']:.2f}  check CPU {row['check_cpu_us']:.0f} µs"
        )
    print(
        f"durable / no_audit check calls/s: {report['durable_vs_no_audit_check_rps']:.2f}; "
        f"the audit costs {report['audit_cpu_us_per_check']:.0f} µs of server CPU per Check"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=H.OUT / "audit_cost.json")
    parser.add_argument("--commit", help="measure this revision's server/ (git archive)")
    args = parser.parse_args()
    H.exit_on_signals()
    report = {
        "benchmark": "audit_cost",
        "code": H.code_under_test(args.commit),
        "machine": H.machine_info(),
        **measure(args.rounds, args.seconds, args.commit),
    }
    return H.finish(report, args.out, print_summary)


if __name__ == "__main__":
    raise SystemExit(main())

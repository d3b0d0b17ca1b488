"""Memory of the revoked set with 1M revoked sessions (quality bar: < 4 MB).

The Check path's revocation state is a RevocationSet: only a Roaring bitmap of session serials
(expiry is looked up in the store when pruning, so nothing per entry besides the bitmap is kept).
Each scenario builds the set in a fresh child process through RevocationSet.apply, the server's
own code path, and reports the resident-set growth, CRoaring's own container byte count and the
portable serialization size (what WatchRevocations snapshots carry).

Scenarios, from kind to unkind for Roaring:
* dense: 1M consecutive serials revoked (a mass revocation of one busy hour);
* quarter: 1M revoked of the last 4M sessions, at random (serials are allocated in order);
* sparse: 1M serials spread at random over the whole 32-bit space: the worst case, not a
  realistic one (serials are sequential), shown to bound it.

usage: bench/revocation_memory.py [--out bench/out/revocation_memory.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import sys
from pathlib import Path

COUNT = 1_000_000
BAR_BYTES = 4 * 1024 * 1024


def _serials(scenario: str) -> list[int]:
    rng = random.Random(7)
    if scenario == "dense":
        return list(range(10_000_000, 10_000_000 + COUNT))
    if scenario == "quarter":
        return rng.sample(range(20_000_000, 20_000_000 + 4 * COUNT), COUNT)
    return rng.sample(range(1 << 32), COUNT)


def _measure(scenario: str, queue: multiprocessing.Queue[dict[str, object]]) -> None:
    from agentid_server.domain.revocation import Revocation, RevocationSet

    serials = _serials(scenario)
    revocations = [
        Revocation(i + 1, "", serial, "", "", 0.0, 0) for i, serial in enumerate(serials)
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    revoked = RevocationSet()
    for revocation in revocations:
        revoked.apply(revocation)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = revoked._bitmap.get_statistics()
    container_bytes = (
        stats["n_bytes_array_containers"]
        + stats["n_bytes_run_containers"]
        + stats["n_bytes_bitset_containers"]
    )
    queue.put(
        {
            "scenario": scenario,
            "revoked": len(revoked),
            "container_bytes": int(container_bytes),
            "containers": int(stats["n_containers"]),
            "snapshot_bytes": len(revoked.snapshot().revoked_serials),
            "rss_growth_bytes": (after - before) * 1024,
        }
    )


def _main_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/revocation_memory.json"))
    parser.add_argument("--commit", help="ignored: this benchmark measures the work tree")
    return parser.parse_args()


def main() -> int:
    args = _main_args()
    results = []
    context = multiprocessing.get_context("spawn")
    for scenario in ("dense", "quarter", "sparse"):
        queue: multiprocessing.Queue[dict[str, object]] = context.Queue()
        child = context.Process(target=_measure, args=(scenario, queue))
        child.start()
        result = queue.get(timeout=300)
        child.join()
        results.append(result)
    header = ("scenario", "revoked", "bitmap bytes", "snapshot", "RSS growth")
    print(
        f"{header[0]:<9} {header[1]:>9} {header[2]:>13} {header[3]:>10} {header[4]:>11}  bar < 4 MB"
    )
    for r in results:
        met = "met" if int(r["container_bytes"]) < BAR_BYTES else "NOT met"  # type: ignore[call-overload]
        print(
            f"{r['scenario']:<9} {r['revoked']:>9} {r['container_bytes']:>13} "
            f"{r['snapshot_bytes']:>10} {r['rss_growth_bytes']:>11}  {met}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"benchmark": "revocation_memory", "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

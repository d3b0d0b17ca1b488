"""The serving process's garbage collector (cli/heap.py), in a fresh interpreter each time: a
frozen heap lasts as long as its process, and pytest's must not be frozen."""

from __future__ import annotations

import json
import subprocess
import sys

from agentid_server.cli import heap

SETTLE = """
import gc, json
import agentid_server.app  # the server's modules: most of what startup leaves
from agentid_server.cli import heap
before = {"objects": len(gc.get_objects()), "thresholds": gc.get_threshold()}
settled = heap.settle()
left = len(gc.get_objects())
for _ in range(300):  # cyclic garbage made after startup
    cycle = []
    cycle.append(cycle)
    del cycle
collected = gc.collect()
print(json.dumps({
    "before": before,
    "frozen": settled.frozen,
    "freeze_count": gc.get_freeze_count(),
    "thresholds": settled.thresholds,
    "live_thresholds": gc.get_threshold(),
    "left": left,
    "collected": collected,
    "after_collect": len(gc.get_objects()),
}))
"""


def settle_in_a_fresh_process() -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", SETTLE], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_startup_is_frozen_and_the_young_generation_raised_the_older_ones_kept() -> None:
    settled = settle_in_a_fresh_process()
    before = settled["before"]
    assert isinstance(before, dict)
    # startup left tens of thousands of tracked objects; a full collection scans none of them now
    assert before["objects"] > 20_000
    assert settled["frozen"] == settled["freeze_count"] >= before["objects"] * 0.9
    assert settled["left"] < 1_000
    assert settled["thresholds"] == settled["live_thresholds"]
    assert settled["thresholds"] == [heap.YOUNG_GENERATION, *before["thresholds"][1:]]
    assert before["thresholds"][0] < heap.YOUNG_GENERATION
    # cyclic garbage made afterwards is still collected, and the frozen heap does not grow
    assert settled["collected"] >= 300
    assert settled["after_collect"] < 1_000
    assert settled["freeze_count"] == settled["frozen"]

"""The serving process's garbage collector, set once the server is up.

CPython's cycle collector runs its youngest generation whenever the tracked objects allocated
since the last run outnumber those freed by 700 (the default), and counts frees only down to
zero. Calls in flight allocate in bursts and the audit batch frees a group of them at once, so
under load it ran about once per audit batch. Each run moved the calls still in flight to an
older generation, and every few seconds that triggered a full collection of the whole heap,
startup's 150,000 objects included: about 90 ms with the event loop stopped, and about 25 µs of
CPU per warm Check at 64 in flight on PostgreSQL (docs/benchmarks.md, session 16).

So, once the server is built: what startup left behind is collected and then frozen (moved to
the permanent generation, never scanned again; refcounting still frees its objects, but a
cycle among them that later becomes garbage stays: startup's objects are the server's own and
live as long as it does), and the youngest generation is collected after ``YOUNG_GENERATION``
net allocations. What that holds back: about that many objects of cyclic garbage between two
collections (a few MB; a Check leaves three, in gRPC's method lookup; more only by as much as
the live objects shrank meanwhile, since frees count against allocations), and one young
collection scans those plus the calls in flight (about 4 ms on the machine of the benchmarks).

Only ``agentid serve`` does this, never a server built inside another program (the tests build
many in one process): freezing is for the lifetime of a process whose startup heap is its own.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

YOUNG_GENERATION = 10_000


@dataclass(frozen=True, slots=True)
class Settled:
    frozen: int  # objects startup left, now in the permanent generation
    thresholds: tuple[int, int, int]


def settle() -> Settled:
    """Collects and freezes what startup left and raises the youngest generation's threshold
    (the older generations' stay as CPython sets them)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, older, oldest)
    settled = Settled(gc.get_freeze_count(), gc.get_threshold())
    log.info(
        "garbage collector: %d objects of startup frozen; youngest generation collected every "
        "%d net allocations",
        settled.frozen,
        settled.thresholds[0],
    )
    return settled

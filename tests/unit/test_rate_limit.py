"""Token buckets (domain/ratelimit.py): burst, refill with the injected time, a wait that says
when to retry, and a map of buckets that stays bounded."""

from __future__ import annotations

import pytest
from agentid_server.domain.ratelimit import Rate, TokenBuckets


def take_all(buckets: TokenBuckets, key: str, now: float) -> int:
    taken = 0
    while buckets.wait(key, now) == 0.0:
        buckets.take(key, now)
        taken += 1
    return taken


def test_a_burst_then_the_rate() -> None:
    buckets = TokenBuckets(Rate(per_minute=60, burst=5))
    assert take_all(buckets, "alice", 1000.0) == 5
    assert buckets.wait("alice", 1000.0) == pytest.approx(1.0)
    assert buckets.wait("alice", 1000.5) == pytest.approx(0.5)
    assert take_all(buckets, "alice", 1001.0) == 1
    assert take_all(buckets, "bob", 1001.0) == 5  # one key's bucket is its own
    assert take_all(buckets, "alice", 1100.0) == 5  # refilled to the burst, never beyond


def test_a_clock_stepping_back_refills_nothing() -> None:
    buckets = TokenBuckets(Rate(per_minute=60, burst=2))
    take_all(buckets, "alice", 1000.0)
    assert buckets.wait("alice", 900.0) > 0
    assert take_all(buckets, "alice", 1001.0) == 1


def test_zero_a_minute_is_no_limit() -> None:
    buckets = TokenBuckets(Rate(per_minute=0, burst=1))
    for _ in range(1000):
        assert buckets.wait("alice", 1.0) == 0.0
        buckets.take("alice", 1.0)
    assert len(buckets) == 0


def test_the_buckets_stay_bounded() -> None:
    """Refilled buckets are dropped as new ones come (they hold nothing), and no more than
    max_keys are ever held."""
    buckets = TokenBuckets(Rate(per_minute=60, burst=2), max_keys=100)
    for n in range(1000):  # one key a second: each refills within 2 s
        buckets.take(f"user-{n}", float(n))
    assert len(buckets) <= 3
    for n in range(1000):  # all at once: none refills
        buckets.take(f"agent-{n}", 5000.0)
    assert len(buckets) == 100

"""Token buckets: how often one key (a user, an agent session) may do something costly.

A bucket holds up to ``burst`` tokens and gains ``per_minute`` of them a minute; each use takes
one. Time comes from the caller (the injected clock), so the buckets are pure and testable.
The map of buckets is bounded: a bucket that has refilled is the same as none and is dropped,
and when ``max_keys`` are held the least recently used one goes (the key it belonged to starts
over with a full bucket, which only lets that key through sooner, never refuses another).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BUCKETS = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_minute`` tokens a minute, at most ``burst`` at once; ``per_minute`` 0: no limit."""

    per_minute: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.per_minute <= 0


class TokenBuckets:
    """One bucket per key, all with the same rate."""

    def __init__(self, rate: Rate, max_keys: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self._per_second = rate.per_minute / 60.0
        self._burst = float(max(1, rate.burst))
        self._max_keys = max(1, max_keys)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, as of when)

    def wait(self, key: str, now: float) -> float:
        """Seconds until ``key`` may take a token (0.0: now)."""
        if self.rate.unlimited:
            return 0.0
        tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._per_second

    def take(self, key: str, now: float) -> None:
        """Takes one token of ``key``'s bucket (the caller saw ``wait`` answer 0.0)."""
        if self.rate.unlimited:
            return
        tokens = self._tokens(key, now)
        buckets = self._buckets
        buckets.pop(key, None)
        buckets[key] = (max(0.0, tokens - 1.0), now)  # last: the most recently used
        self._forget_idle(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        held = self._buckets.get(key)
        if held is None:
            return self._burst
        tokens, since = held
        # A clock that stepped back refills nothing (and takes nothing back).
        return min(self._burst, tokens + max(0.0, now - since) * self._per_second)

    def _forget_idle(self, now: float) -> None:
        """Drops the least recently used buckets that have refilled (at most two per call, so
        the map shrinks as fast as it grows) and any beyond ``max_keys``."""
        buckets = self._buckets
        for _ in range(2):
            oldest = next(iter(buckets), None)
            if oldest is None or self._tokens(oldest, now) < self._burst:
                break
            del buckets[oldest]
        while len(buckets) > self._max_keys:
            del buckets[next(iter(buckets))]

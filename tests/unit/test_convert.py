"""Times between the wire's Timestamps and the service's seconds and microseconds."""

from __future__ import annotations

import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.api.convert import microseconds_of, timestamp
from google.protobuf.timestamp_pb2 import Timestamp


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(1.9999999999, (2, 0)), (1.5, (1, 500_000_000)), (1700000000.25, (1700000000, 250_000_000)),
     (0.0, (0, 0)), (1.0000000001, (1, 0))],
)  # fmt: skip
def test_timestamps_are_always_valid(seconds: float, expected: tuple[int, int]) -> None:
    stamp = timestamp(seconds)
    assert (stamp.seconds, stamp.nanos) == expected
    stamp.ToDatetime()  # a valid Timestamp: nanos within [0, 1e9)


@pytest.mark.parametrize(
    ("seconds", "nanos", "micros"),
    [(5, 0, 5_000_000), (5, 1000, 5_000_001), (5, 1, 5_000_001), (5, 999, 5_000_001),
     (1_700_000_000, 123_456_789, 1_700_000_000_123_457)],
)  # fmt: skip
def test_bounds_fall_on_the_next_whole_microsecond(seconds: int, nanos: int, micros: int) -> None:
    request = pb.AuditRequest(since=Timestamp(seconds=seconds, nanos=nanos))
    assert microseconds_of(request, "since") == micros
    assert microseconds_of(pb.AuditRequest(), "since") is None

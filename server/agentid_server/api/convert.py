"""proto <-> domain conversions shared by the servicers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from agentid_server.domain.errors import InvalidArgument


def context_of(message: Any, max_bytes: int) -> dict[str, Any] | None:
    """A request's optional ``context`` Struct as a dict (None when unset). It is recorded with
    the decision, so its encoded size is capped at ``max_bytes``. JSON has no NaN or infinity,
    and neither may a context: it is hashed and recorded as JSON."""
    if not message.HasField("context"):
        return None
    if message.context.ByteSize() > max_bytes:
        raise InvalidArgument.field("context", f"is larger than {max_bytes} bytes encoded")
    try:
        return json_format.MessageToDict(message.context)
    except ValueError:
        raise InvalidArgument.field("context", "numbers must be finite") from None


def microseconds_of(message: Any, field: str) -> int | None:
    """An optional Timestamp field in whole microseconds (None when unset), rounded up: audit
    times are kept to the microsecond, so a bound between two of them falls on the later one,
    for an inclusive `since` and an exclusive `until` alike. INVALID_ARGUMENT outside the range
    a Timestamp may hold (years 1 to 9999)."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        stamp.ToDatetime()  # validates seconds and nanos
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is not a valid timestamp") from None
    return stamp.seconds * 1_000_000 - (-stamp.nanos // 1000)


def whole_seconds(message: Any, field: str, name: str) -> int | None:
    """An optional Duration field of ``message`` in whole seconds, a fraction rounded up (None
    when unset); INVALID_ARGUMENT, naming the field as ``name``, when its seconds and nanos
    disagree or it is negative."""
    if not message.HasField(field):
        return None
    duration: duration_pb2.Duration = getattr(message, field)
    whole, nanos = duration.seconds, duration.nanos
    if abs(nanos) >= 1_000_000_000 or (whole > 0 > nanos) or (whole < 0 < nanos):
        raise InvalidArgument.field(name, "is not a valid duration (seconds and nanos disagree)")
    seconds = whole + nanos / 1e9
    if seconds < 0:
        raise InvalidArgument.field(name, "must not be negative")
    return math.ceil(seconds)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:  # .9999999997 rounds up into the next second
        whole, nanos = whole + 1, 0
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)


def dict_to_struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if values is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct

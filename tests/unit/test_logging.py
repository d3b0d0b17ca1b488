"""The server's log lines: text for people, or JSON objects carrying the traced call's ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from agentid_server.cli.root import configure_logging
from opentelemetry.sdk.trace import TracerProvider


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_json_lines_carry_the_trace_of_the_call_being_served() -> None:
    stream = io.StringIO()
    configure_logging("json", stream)
    log = logging.getLogger("agentid_server.example")
    log.info("outside %s", "any call")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("agentid.v1.AgentIdentityService/Check") as span:
        log.warning("inside")
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (outside["level"], outside["logger"], outside["message"]) == (
        "INFO",
        "agentid_server.example",
        "outside any call",
    )
    assert "trace_id" not in outside
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "time" in inside


@pytest.mark.usefixtures("root_logging")
def test_text_lines_for_people() -> None:
    stream = io.StringIO()
    configure_logging("text", stream)
    logging.getLogger("agentid_server.example").error("the store is failing writes")
    assert (
        stream.getvalue()
        .rstrip()
        .endswith("ERROR agentid_server.example: the store is failing writes")
    )

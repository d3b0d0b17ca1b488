"""OpenTelemetry: a span and a duration per call, decision counts, the store's and the revocation
set's gauges; a caller's sampled traceparent is followed; nothing secret in any attribute; and the
OTLP export itself, received by a collector of the tests' own."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_client import AgentIdClient
from agentid_server.config import TelemetrySettings
from agentid_server.telemetry import Telemetry
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    make_settings,
    running_harness,
    start_harness,
    with_config,
)

CHECK = "agentid.v1.AgentIdentityService/Check"


class Observed:
    def __init__(self, h: Harness, reader: InMemoryMetricReader, spans: InMemorySpanExporter):
        self.h, self.reader, self.spans = h, reader, spans

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend((dict(p.attributes or {}), p) for p in metric.data.data_points)
        return found


async def observed_harness(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, trace_ratio: float
) -> AsyncIterator[Observed]:
    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    telemetry = Telemetry(
        TelemetrySettings(trace_ratio=trace_ratio),
        metric_readers=[reader],
        span_processors=[SimpleSpanProcessor(spans)],
    )
    async with running_harness(tmp_path, idp, clock, telemetry=telemetry) as h:
        yield Observed(h, reader, spans)


@pytest.fixture
async def traced(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Observed]:
    async for observed in observed_harness(tmp_path, idp, clock, trace_ratio=1.0):
        yield observed


@pytest.fixture
async def untraced(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Observed]:
    async for observed in observed_harness(tmp_path, idp, clock, trace_ratio=0.0):
        yield observed


async def test_every_call_is_traced_timed_and_counted(traced: Observed) -> None:
    h = traced.h
    user_token = h.idp.token()
    session = await h.delegate(user_token, scopes=["tickets.read"])
    assert (await h.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    assert (await h.check(session.token, "tickets.delete")).decision == pb.DECISION_DENY
    with pytest.raises(grpc.aio.AioRpcError):
        await h.check(session.token, "tickets.read", key="not-a-key")
    stream = h.stub.Audit(
        pb.AuditRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
    )
    assert len([r async for r in stream]) == 3

    spans = traced.spans.get_finished_spans()
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    checks = by_name[CHECK]
    assert [s.attributes["rpc.grpc.status_code"] for s in checks] == [0, 0, 16]
    assert [s.attributes.get("agentid.decision") for s in checks] == ["ALLOW", "DENY", None]
    assert checks[0].attributes["agentid.session_id"] == session.session_id
    assert checks[2].status.status_code.name == "ERROR"
    audit = by_name["agentid.v1.AgentIdentityService/Audit"]
    assert audit[0].attributes["rpc.grpc.status_code"] == 0  # a stream ends its span too
    assert "agentid.v1.AgentIdentityService/Delegate" in by_name
    secrets = (session.token, user_token, CHECK_KEY, ADMIN_KEY, "not-a-key")
    for span in spans:
        for value in (span.attributes or {}).values():
            assert not any(secret in str(value) for secret in secrets)

    decisions = {
        (a["agentid.decision"], a["agentid.reason"]): p.value
        for a, p in traced.points("agentid.check.decisions")
    }
    assert decisions == {("ALLOW", "GRANTED"): 1, ("DENY", "SCOPE_NOT_GRANTED"): 1}
    durations = {
        a["rpc.grpc.status_code"]: p.count
        for a, p in traced.points("rpc.server.duration")
        if a["rpc.method"] == "Check"
    }
    assert durations == {0: 2, 16: 1}
    assert [p.value for _, p in traced.points("agentid.audit.store.healthy")] == [1.0]
    # The config's three agents (recorded at the start), the Delegate, 2 Checks.
    assert [p.value for _, p in traced.points("agentid.audit.records")] == [6]
    assert [p.value for _, p in traced.points("agentid.revocations.revoked")] == [0.0]
    await h.stub.Revoke(pb.RevokeRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY))
    assert [p.value for _, p in traced.points("agentid.revocations.revoked")] == [1.0]
    assert [p.value for _, p in traced.points("agentid.revocations.applied_sequence")] == [1.0]


async def test_a_callers_sampled_traceparent_is_followed(untraced: Observed) -> None:
    """With trace_ratio 0 nothing is traced on its own; a call that arrives inside a sampled
    trace joins it."""
    h = untraced.h
    session = await h.delegate(scopes=["tickets.read"])
    await h.check(session.token, "tickets.read")
    request = pb.CheckRequest(token=session.token, action="tickets.read")
    for garbage in ("00-not-a-trace-01", "ff-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 4000):
        answer = await h.stub.Check(
            request, metadata=(*bearer(CHECK_KEY), ("traceparent", garbage))
        )  # a bad traceparent is ignored: answered, and not traced
        assert answer.decision == pb.DECISION_ALLOW
    assert untraced.spans.get_finished_spans() == ()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (*bearer(CHECK_KEY), ("traceparent", f"00-{trace_id}-{parent_id}-01"))
    await h.stub.Check(request, metadata=metadata)
    (span,) = untraced.spans.get_finished_spans()
    assert span.name == CHECK
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == parent_id
    assert [p.count for _, p in untraced.points("rpc.server.duration")] != []  # timed regardless


class Collector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """An OTLP/gRPC receiver: keeps the span and metric names it is sent."""

    def __init__(self) -> None:
        self.spans: list[str] = []
        self.metrics: list[str] = []

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend(span.name for span in scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                self.metrics.extend(metric.name for metric in scope.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_telemetry_is_exported_over_otlp(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        telemetry = {
            "otlp_endpoint": f"http://127.0.0.1:{port}",
            "trace_ratio": 1.0,
            "service_name": "agentid-test",
        }
        settings = make_settings(tmp_path, idp, with_config(telemetry=telemetry))
        async with running_harness(tmp_path, idp, clock, settings) as h:
            session = await h.delegate(scopes=["tickets.read"])
            await h.check(session.token, "tickets.read")
        # Stopping the server flushed both exporters.
        for _ in range(100):
            if CHECK in collector.spans and "agentid.check.decisions" in collector.metrics:
                break
            await asyncio.sleep(0.05)
        assert CHECK in collector.spans
        assert {"agentid.check.decisions", "rpc.server.duration"} <= set(collector.metrics)
    finally:
        await server.stop(None)


async def test_a_collector_that_is_down_costs_calls_nothing_and_holds_the_stop_briefly(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Exports run beside the calls; a collector that refuses them is given up on after
    telemetry.export_timeout, at the latest when the server stops."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    telemetry = {
        "otlp_endpoint": f"http://127.0.0.1:{port}",
        "trace_ratio": 1.0,
        "export_timeout": "300ms",
    }
    settings = make_settings(tmp_path, idp, with_config(telemetry=telemetry))
    h = await start_harness(tmp_path, idp, clock, settings)
    try:
        session = await h.delegate(scopes=["tickets.read"])
        for _ in range(20):
            assert (await h.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    finally:
        await h.channel.close()
        started = time.monotonic()
        await h.running.stop(grace=1)
    assert time.monotonic() - started < 10  # not the exporters' default retries of a minute


async def test_the_python_client_carries_the_callers_trace(untraced: Observed) -> None:
    """A service's Check through AgentIdClient, made inside one of its own spans, shows up in
    agentid as a child of that span (nothing else is traced: trace_ratio is 0)."""
    h = untraced.h
    session = await h.delegate(scopes=["tickets.read"])
    caller = TracerProvider().get_tracer("payments-api")
    async with AgentIdClient(f"127.0.0.1:{h.running.port}", CHECK_KEY) as client:
        await client.check(session.token, "tickets.read")  # outside any span: not traced
        with caller.start_as_current_span("refund") as parent:
            assert (await client.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
    (span,) = untraced.spans.get_finished_spans()
    assert span.name == CHECK
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id

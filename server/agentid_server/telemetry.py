"""OpenTelemetry: a span and a duration per call, and metrics of what the service decides and how
its audit store and revocation set fare, exported over OTLP/gRPC to `telemetry.otlp_endpoint`.

Off (no endpoint), the handlers never reach this module: a call costs nothing for telemetry.
On, each call gets a server span (a child of the caller's W3C `traceparent` when it sent a
sampled one, else sampled at `telemetry.trace_ratio`) and a `rpc.server.duration` record; the
counters behind the other metrics are plain integers read when the exporter collects.

What a span or metric carries: the method, the gRPC status, for Check the decision, reason and
session id (as the audit trail does). Never a token, API key, proof or request body.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextvars import Token
from typing import Any
from urllib.parse import urlsplit

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentid_server.api.method_policy import SERVICE
from agentid_server.config import TelemetrySettings

_PROPAGATED = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()

Finish = Callable[[grpc.StatusCode | None], None]


class Telemetry:
    """Tracer and meter providers of their own (never the process-wide ones), so that several
    servers in one process, as in the tests, each report their own calls."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        metric_readers: Sequence[MetricReader] = (),
        span_processors: Sequence[SpanProcessor] = (),
        version: str = "",
    ) -> None:
        """``metric_readers`` and ``span_processors`` are added to the OTLP exporters the
        settings ask for (tests read what would be exported through them)."""
        attributes: dict[str, str] = {"service.name": settings.service_name}
        if version:
            attributes["service.version"] = version
        resource = Resource.create(attributes)
        readers = list(metric_readers)
        processors = list(span_processors)
        if settings.otlp_endpoint:
            # Imported only when used: the exporters pull in their own gRPC stubs.
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint, timeout = settings.otlp_endpoint, settings.export_timeout
            insecure = urlsplit(endpoint).scheme == "http"
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=endpoint, insecure=insecure, timeout=timeout),
                    export_interval_millis=settings.metric_interval * 1000,
                    export_timeout_millis=timeout * 1000,
                )
            )
            processors.append(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=timeout),
                    export_timeout_millis=timeout * 1000,
                )
            )
        self._tracer_provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.trace_ratio))
        )
        for processor in processors:
            self._tracer_provider.add_span_processor(processor)
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self._tracer = self._tracer_provider.get_tracer("agentid")
        self._ratio = settings.trace_ratio
        meter = self._meter_provider.get_meter("agentid")
        self._duration = meter.create_histogram(
            "rpc.server.duration", unit="ms", description="Time to answer a call"
        )
        self.decisions: Counter[tuple[str, str]] = Counter()
        meter.create_observable_counter(
            "agentid.check.decisions",
            callbacks=[self._observe_decisions],
            unit="{decision}",
            description="Check decisions by decision and reason",
        )
        self._meter = meter

    # -- per call --------------------------------------------------------------------------------

    def begin(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Finish:
        """Starts the call's span (current until the call ends); the returned function ends it
        with the call's status (None: OK)."""
        carrier = {k: v for k, v in metadata or () if k in _PROPAGATED and isinstance(v, str)}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span: trace.Span | None = None
        token: Token[Context] | None = None
        # A span that cannot be sampled (no sampled parent, no ratio) is not made at all.
        if self._ratio > 0.0 or (
            parent is not None
            and trace.get_current_span(parent).get_span_context().trace_flags.sampled
        ):
            span = self._tracer.start_span(
                f"{SERVICE}/{method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
            )
            token = otel_context.attach(trace.set_span_in_context(span))
        started = time.perf_counter()

        def finish(code: grpc.StatusCode | None) -> None:
            code = code or grpc.StatusCode.OK
            number = code.value[0]
            self._duration.record(
                (time.perf_counter() - started) * 1000.0,
                {
                    "rpc.system": "grpc",
                    "rpc.service": SERVICE,
                    "rpc.method": method,
                    "rpc.grpc.status_code": number,
                },
            )
            if span is None or token is None:
                return
            span.set_attribute("rpc.grpc.status_code", number)
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            otel_context.detach(token)
            span.end()

        return finish

    def decided(self, decision: str, reason: str, session_id: str) -> None:
        """A Check's decision: counted, and put on the call's span."""
        self.decisions[(decision, reason)] += 1
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("agentid.decision", decision)
            span.set_attribute("agentid.reason", reason)
            if session_id:
                span.set_attribute("agentid.session_id", session_id)

    # -- read at collection ----------------------------------------------------------------------

    def gauge(self, name: str, read: Callable[[], float], unit: str, description: str) -> None:
        """A value read whenever metrics are collected (the store's health, the revoked set)."""
        self._meter.create_observable_gauge(
            name, callbacks=[_reading(read)], unit=unit, description=description
        )

    def counter(self, name: str, read: Callable[[], int], unit: str, description: str) -> None:
        """A running total read whenever metrics are collected."""
        self._meter.create_observable_counter(
            name, callbacks=[_reading(read)], unit=unit, description=description
        )

    def _observe_decisions(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {"agentid.decision": decision, "agentid.reason": reason})
            for (decision, reason), count in list(self.decisions.items())
        ]

    def shutdown(self) -> None:
        """Exports what is left and stops the exporters."""
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()


def _reading(read: Callable[[], float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """An observable instrument's callback: one observation, ``read()`` at collection."""

    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read())]

    return observe


class TraceIds(logging.Filter):
    """Adds `trace_id` and `span_id` to a log record made while a traced call is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = f"{span_context.trace_id:032x}"
            record.span_id = f"{span_context.span_id:016x}"
        return True

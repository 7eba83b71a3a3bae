"""OpenTelemetry spans for captures. Exported over OTLP (HTTP/protobuf) only when the standard OTEL_*
endpoint variables point at a collector; otherwise spans are created and dropped (no exporter, no threads)."""

from __future__ import annotations

import contextlib
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

_provider: TracerProvider | None = None


def tracer() -> trace.Tracer:
    global _provider
    if _provider is None:
        _provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
            "OTEL_SERVICE_NAME", "moe-monitor")}))
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return _provider.get_tracer("moe_monitor.capture")


@contextlib.contextmanager
def capture_span(capture_id: str, reason: str, evidence: dict):
    attributes = {"moe_monitor.capture_id": capture_id, "moe_monitor.reason": reason}
    for k, v in evidence.items():
        if isinstance(v, (str, bool, int, float)):
            attributes[f"moe_monitor.evidence.{k}"] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
            attributes[f"moe_monitor.evidence.{k}"] = list(v)
    with tracer().start_as_current_span("moe_monitor.capture", attributes=attributes) as span:
        yield span

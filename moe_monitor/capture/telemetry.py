"""OpenTelemetry spans for captures. Exported over OTLP (HTTP/protobuf) only when the standard OTEL_*
endpoint variables point at a collector; otherwise spans are created and dropped (no exporter, no threads).
The exporter (and its protobuf and requests) comes with the `otel` extra: without it the spans are dropped and
the sidecar logs once which extra to install."""

from __future__ import annotations

import contextlib
import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_provider: TracerProvider | None = None


def tracer() -> trace.Tracer:
    global _provider
    if _provider is None:
        _provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
            "OTEL_SERVICE_NAME", "moe-monitor")}))
        processor = _otlp_processor()
        if processor is not None:
            _provider.add_span_processor(processor)
    return _provider.get_tracer("moe_monitor.capture")


def _otlp_processor():
    """A batch processor exporting to the collector the OTEL_* variables name; None when none is named, or when
    the `otel` extra is missing (logged: the captures go on, their spans are dropped)."""
    variable = next((v for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if variable is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        log.error("%s is set but the OTLP exporter is not installed (%s): install moe-monitor with the 'otel' extra "
                  "(docs/install.md); capture spans are not exported", variable, e)
        return None
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(OTLPSpanExporter())


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

"""Metrics (Prometheus) and traces (OpenTelemetry) for every service.

Trace context crosses the bus in NATS headers as W3C ``traceparent``/``tracestate``: the ingest
span of an instance and the store span that handles its event belong to one trace.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import start_http_server

from .config import TelemetryConfig

log = logging.getLogger("dicomflow.telemetry")

# Latency buckets (seconds) for per-instance work: sub-millisecond fsyncs to multi-second retries.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_provider_set = False


def setup_logging(level: str = "INFO") -> None:
    """One log format for every service: time, level, logger, message."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
    # pynetdicom logs every request at INFO: thousands of lines per study. Our own lines say what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def setup_tracing(service: str, cfg: TelemetryConfig, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the global tracer provider once per process, with the configured exporter."""
    global _provider_set
    provider = trace.get_tracer_provider()
    if _provider_set and isinstance(provider, TracerProvider):
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider
    provider = TracerProvider(resource=Resource.create({"service.name": f"dicomflow-{service}",
                                                       "service.instance.id": f"{socket.gethostname()}/{os.getpid()}"}))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif cfg.traces == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif cfg.traces == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    _provider_set = True
    return provider


def start_metrics(cfg: TelemetryConfig, port: int | None = None) -> int:
    """Serve /metrics; returns the port (0 when disabled). ``port`` overrides the configured one."""
    port = cfg.metrics_port if port is None else port
    if port <= 0:
        return 0
    start_http_server(port, addr=cfg.metrics_host)
    log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, port)
    return port


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (W3C traceparent)."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's headers carry."""
    return propagate.extract(dict(headers or {}))

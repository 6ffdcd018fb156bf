"""Tracer provider and metric readers from the standard `OTEL_*` variables, and nothing else.

This module picks the exporters; the SDK and the exporters read the rest of the standard variables themselves:
- `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`: `otlp`, `console` or `none`, comma-separated for several.
  Unlike the SDK's own default (`otlp`), unset means `none` here: a server exports nothing unless asked.
- `OTEL_EXPORTER_OTLP_PROTOCOL` (or its `_TRACES_` / `_METRICS_` variant): `grpc` (the default) or
  `http/protobuf`; `OTEL_EXPORTER_OTLP_ENDPOINT`, `..._HEADERS`, `..._TIMEOUT`, ... go to the exporter.
- `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`: the resource (service name `textgen` by default);
  `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`: the sampler; `OTEL_BSP_*`: the batch span processor;
  `OTEL_METRIC_EXPORT_INTERVAL`: the metric reader;
  `OTEL_PROPAGATORS`: what travels in gRPC metadata (default W3C `tracecontext,baggage`).

It imports neither the engine nor torch, so the client's CLI can use it too.
"""

from __future__ import annotations

import os

from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"


def exporter_names(variable: str) -> list[str]:
    """The exporters a comma-separated `OTEL_*_EXPORTER` variable names; unset or `none` names none."""
    names = [name.strip() for name in os.environ.get(variable, "none").split(",")]
    return [name for name in names if name and name != "none"]


def resource(default_service_name: str) -> Resource:
    """The resource the environment describes, named `default_service_name` unless it names the service."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: default_service_name}))
    return detected


def tracer_provider_from_env(default_service_name: str = "textgen") -> TracerProvider | None:
    """A tracer provider exporting through `OTEL_TRACES_EXPORTER`, or None when that names no exporter."""
    names = exporter_names(TRACES_EXPORTER)
    if not names:
        return None
    provider = TracerProvider(resource=resource(default_service_name))  # the sampler comes from the env
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
    return provider


def metric_readers_from_env() -> list[MetricReader]:
    """Periodic readers for the exporters `OTEL_METRICS_EXPORTER` names (Prometheus is separate)."""
    return [
        PeriodicExportingMetricReader(_metric_exporter(name)) for name in exporter_names(METRICS_EXPORTER)
    ]


def _otlp_protocol(signal: str) -> str:
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (grpc or http/protobuf)"
        )
    return protocol


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"{TRACES_EXPORTER}: {name!r} is not supported (otlp, console or none)")
    if _otlp_protocol("TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def _metric_exporter(name: str):
    if name == "console":
        return ConsoleMetricExporter()
    if name != "otlp":
        raise ValueError(
            f"{METRICS_EXPORTER}: {name!r} is not supported (otlp, console or none; for Prometheus see "
            "--metrics-port)"
        )
    if _otlp_protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()

"""The server's telemetry: providers, the Prometheus endpoint, gRPC interceptors and the engine observer."""

from __future__ import annotations

import logging

import grpc
import prometheus_client
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from engine.core.observer import EngineObserver
from engine.frontend.engine import Engine
from telemetry.exporters import metric_readers_from_env, resource, tracer_provider_from_env
from telemetry.interceptors import server_interceptors
from telemetry.metrics_endpoint import MetricsEndpoint
from telemetry.observer import TelemetryObserver
from telemetry.vllm_metrics import VllmMetrics

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9464  # Prometheus' registered default port for OpenTelemetry exporters


class Telemetry:
    """Tracing and metrics for one server: what it installs, and what it shuts down at exit.

    Without a tracer provider the server gets no interceptors; with neither provider the engine gets the
    plain `EngineObserver`, so with telemetry off the step loop pays nothing.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        metrics_server: MetricsEndpoint | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._metrics_server = metrics_server
        self._registry = registry  # the Prometheus endpoint's: the vLLM-named gauges join it at `attach`
        self._observer = None
        if tracer_provider is not None or meter_provider is not None:
            self._observer = TelemetryObserver(tracer_provider, meter_provider)

    @classmethod
    def from_env(
        cls,
        metrics_port: int = DEFAULT_METRICS_PORT,
        metrics_host: str = "0.0.0.0",
        idle_timeout_s: float = 30.0,
        max_connections: int = 1000,
    ) -> Telemetry:
        """Exporters from the `OTEL_*` variables, plus Prometheus on `metrics_port` (0: no endpoint), whose
        connections are closed after `idle_timeout_s` without a request, at most `max_connections` open."""
        readers = metric_readers_from_env()
        metrics_server = registry = None
        if metrics_port:
            registry = prometheus_client.CollectorRegistry()
            prometheus_client.ProcessCollector(registry=registry)  # CPU, memory, open files of the server
            readers.append(PrometheusMetricReader(registry=registry))
            metrics_server = MetricsEndpoint(
                registry, metrics_host, metrics_port, idle_timeout_s, max_connections
            )
            log.info("Prometheus metrics on port %d, path /metrics", metrics_server.port)
        meter_provider = (
            MeterProvider(metric_readers=readers, resource=resource("textgen")) if readers else None
        )
        return cls(tracer_provider_from_env(), meter_provider, metrics_server, registry)

    @property
    def metrics_port(self) -> int:
        """The port the Prometheus endpoint listens on; 0 when there is none."""
        return self._metrics_server.port if self._metrics_server is not None else 0

    @property
    def observer(self) -> EngineObserver:
        """The observer to build the engine with."""
        return self._observer or _NO_OBSERVER

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return server_interceptors(self.tracer_provider) if self.tracer_provider is not None else []

    def attach(self, engine: Engine) -> None:
        """Start observing `engine` (built with `observer`, warmed up): spans, metrics and gauges begin."""
        if self._observer is not None:
            self._observer.attach(engine)
        if self._registry is not None:
            self._registry.register(VllmMetrics(engine))

    def shutdown(self) -> None:
        """Export what is pending and stop; blocks up to the exporters' timeouts."""
        if self._metrics_server is not None:
            self._metrics_server.close()
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


_NO_OBSERVER = EngineObserver()

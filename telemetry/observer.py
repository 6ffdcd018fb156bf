"""The engine observer telemetry installs: the engine's hooks, sent to request tracing and serving metrics."""

from __future__ import annotations

import logging

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from engine.core.observer import EngineObserver
from engine.core.sequence import Sequence
from engine.core.step import Step
from engine.frontend.engine import Engine
from telemetry.metrics import ServingMetrics
from telemetry.tracing import RequestTracer

log = logging.getLogger(__name__)


class TelemetryObserver(EngineObserver):
    """Sends each hook to tracing and metrics, whichever have a provider.

    Silent until `attach(engine)`, which the server calls once the engine is warm: the warm-up request is
    not traffic, and the model's name (an attribute of every span and metric) is known only then.
    """

    def __init__(self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._observers: tuple[EngineObserver, ...] = ()

    def attach(self, engine: Engine) -> None:
        observers: list[EngineObserver] = []
        if self._tracer_provider is not None:
            observers.append(RequestTracer(self._tracer_provider, engine.model_info.name))
        if self._meter_provider is not None:
            observers.append(ServingMetrics(self._meter_provider, engine))
        self._observers = tuple(observers)

    def request_queued(self, seq: Sequence) -> None:
        self._each("request_queued", seq)

    def request_admitted(self, seq: Sequence) -> None:
        self._each("request_admitted", seq)

    def first_token(self, seq: Sequence) -> None:
        self._each("first_token", seq)

    def request_preempted(self, seq: Sequence) -> None:
        self._each("request_preempted", seq)

    def request_finished(self, seq: Sequence, error: Exception | None) -> None:
        self._each("request_finished", seq, error)

    def step_finished(self, step: Step, start: float, end: float, kv_used: int, kv_total: int) -> None:
        self._each("step_finished", step, start, end, kv_used, kv_total)

    def _each(self, hook: str, *args: object) -> None:
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # a telemetry bug must not stop the step loop, which calls this
                log.exception("telemetry hook %s failed", hook)

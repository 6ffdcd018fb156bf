"""What a gateway reads from an HTTP worker to identify it and learn its load, on the OpenAI HTTP front.

SMG (its worker registration, read from its source) asks `/v1/models` for `owned_by`, then `/version`,
which only vLLM serves, then `/server_info` (SGLang); a vLLM worker's model, context length and version
come from `/v1/models` and `/version`, its load from the `vllm:` gauges of `/metrics`; an engine of no
known kind is asked `/v1/loads`. textgen answers `/version`, so SMG registers it as a vLLM-compatible
worker, reads its `vllm:` gauges (telemetry/vllm_metrics.py, also what the Gateway API Inference
Extension's endpoint picker reads) and logs no "Could not identify backend engine"; and `/v1/loads`, with
the numbers `GetLoads` gives on gRPC.
"""

from __future__ import annotations

from datetime import UTC, datetime

import prometheus_client
from aiohttp import web
from google.protobuf import json_format

from service.generations import Generations
from service.worker.servicer import VERSION, scheduler_load
from telemetry.vllm_metrics import VllmMetrics


def add_routes(app: web.Application, generations: Generations) -> None:
    """`/version`, `/metrics` (the vLLM-named gauges) and `/v1/loads` on `app`."""
    pages = _WorkerPages(generations)
    app.router.add_get("/version", pages.version)
    app.router.add_get("/metrics", pages.metrics)
    app.router.add_get("/v1/loads", pages.loads)


class _WorkerPages:
    """The pages, read from the engine once it is attached (until then: 503, model loading)."""

    def __init__(self, generations: Generations) -> None:
        self._generations = generations
        self._registry: prometheus_client.CollectorRegistry | None = None

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def loads(self, request: web.Request) -> web.Response:
        """SMG's `/v1/loads` body: one data-parallel rank, as `GetLoads` answers on gRPC."""
        engine, _ = self._generations.ready()
        load = json_format.MessageToDict(
            scheduler_load(engine),
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
        body = {"timestamp": datetime.now(UTC).isoformat(), "version": VERSION, "dp_rank_count": 1}
        return web.json_response({**body, "loads": [load]})

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus text of the vLLM-named gauges (textgen's own are on the metrics port)."""
        engine, _ = self._generations.ready()
        if self._registry is None:
            self._registry = prometheus_client.CollectorRegistry()
            self._registry.register(VllmMetrics(engine))
        body = prometheus_client.generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

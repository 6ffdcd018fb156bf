"""vLLM-named load gauges beside textgen's own, for gateways that read a model server's load by vLLM's names:
the Gateway API Inference Extension's endpoint picker (llm-d) and SMG's HTTP workers.

A Prometheus collector, not OpenTelemetry instruments: OpenTelemetry names may not hold the `:` of vLLM's
names. Each scrape reads the engine as textgen's gauges do (textgen_queue_size, textgen_batch_size,
textgen_kv_cache_usage_ratio), so the two agree.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.frontend.engine import Engine


class VllmMetrics(Collector):
    """`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (a fraction,
    0 to 1, as vLLM's) and `vllm:cache_config_info`, labelled with the model name as vLLM labels them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        info = engine.model_info
        self._labels = {"model_name": info.name, "engine": "0"}
        self._cache_config = {
            "block_size": str(info.kv_block_size),
            "num_gpu_blocks": str(info.num_kv_blocks),
            "enable_prefix_caching": str(engine.config.prefix_caching),
            "cache_dtype": info.dtype,
        }

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        load = engine.load  # one snapshot of the loop's numbers, requests on their way counted as waiting
        for name, documentation, value in (
            ("vllm:num_requests_waiting", "Requests waiting to be admitted", load.num_waiting),
            ("vllm:num_requests_running", "Requests in the running batch", load.num_running),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1 (1 is all blocks in use)", load.kv_usage),
        ):
            gauge = GaugeMetricFamily(name, documentation, labels=list(self._labels))
            gauge.add_metric(list(self._labels.values()), value)
            yield gauge
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "The KV cache's configuration", labels=list(self._cache_config)
        )
        info.add_metric(list(self._cache_config.values()), 1)
        yield info

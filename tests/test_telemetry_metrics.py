"""Serving metrics: after real traffic over gRPC, the Prometheus endpoint shows each metric, sanely."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import GenerationResult, TextGenClient
from telemetry.metrics import (
    REQUEST_DURATION_BUCKETS,
    TIME_PER_OUTPUT_TOKEN_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
)
from telemetry.server import Telemetry

STORY = "Tell me a story"


class Scrape:
    """One scrape of a Prometheus endpoint: `value(name, **labels)` sums the samples whose labels match."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        matching = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert matching, f"no sample {name} {labels}"
        return sum(matching)

    def bucket_bounds(self, name: str) -> list[float]:
        return sorted({float(s.labels["le"]) for s in self.samples if s.name == f"{name}_bucket"})


@dataclass
class Traffic:
    results: list[GenerationResult]  # three requests that finished
    story_prompt_tokens: int  # the prompt of a fourth request, a stream cancelled after two chunks
    during: Scrape  # while the stream was generating
    after: Scrape  # once everything had ended


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def traffic(serve_with_telemetry, wait_until_idle) -> Traffic:
    with pytest.MonkeyPatch.context() as env:
        env.delenv("OTEL_TRACES_EXPORTER", raising=False)
        env.delenv("OTEL_METRICS_EXPORTER", raising=False)
        telemetry = Telemetry.from_env(metrics_port=free_port(), metrics_host="127.0.0.1")
    server = serve_with_telemetry(telemetry)
    with TextGenClient(server.target) as client:
        results = [
            client.generate(f"Prompt number {i}", max_new_tokens=4 + i, ignore_eos=True) for i in range(3)
        ]
        story = client.stream(STORY, max_new_tokens=1500, ignore_eos=True)
        next(story), next(story)
        during = Scrape(telemetry.metrics_port)
        story.close()
        story_prompt_tokens = len(client.tokenize(STORY).ids)
    wait_until_idle(server.engine)
    return Traffic(results, story_prompt_tokens, during, Scrape(telemetry.metrics_port))


def test_latency_histograms_follow_the_genai_conventions(traffic):
    after = traffic.after
    genai = {"gen_ai_operation_name": "text_completion"}

    ttft = after.value("gen_ai_server_time_to_first_token_seconds_count", **genai)
    assert ttft == 4  # the cancelled stream had its first token too
    assert 0 < after.value("gen_ai_server_time_to_first_token_seconds_sum", **genai) / ttft < 5
    assert after.value("gen_ai_server_time_per_output_token_seconds_count", **genai) == 3  # successes only
    assert 0 < after.value("gen_ai_server_time_per_output_token_seconds_sum", **genai) / 3 < 1
    assert after.value("gen_ai_server_request_duration_seconds_count", **genai, error_type="") == 3
    assert after.value("gen_ai_server_request_duration_seconds_count", **genai, error_type="cancelled") == 1
    assert after.bucket_bounds("gen_ai_server_time_to_first_token_seconds")[:-1] == list(
        TIME_TO_FIRST_TOKEN_BUCKETS
    )
    assert after.bucket_bounds("gen_ai_server_time_per_output_token_seconds")[:-1] == list(
        TIME_PER_OUTPUT_TOKEN_BUCKETS
    )
    assert after.bucket_bounds("gen_ai_server_request_duration_seconds")[:-1] == list(
        REQUEST_DURATION_BUCKETS
    )
    assert after.value("textgen_queue_duration_seconds_count") == 4


def test_requests_tokens_and_preemptions_are_counted(traffic):
    after, results = traffic.after, traffic.results

    assert after.value("textgen_requests_total", outcome="ok") == 3
    assert after.value("textgen_requests_total", outcome="cancelled") == 1
    prompt_tokens = sum(r.usage.prompt_tokens for r in results) + traffic.story_prompt_tokens
    assert after.value("textgen_tokens_total", gen_ai_token_type="input") == prompt_tokens
    completion_tokens = sum(r.usage.completion_tokens for r in results)
    assert completion_tokens + 2 <= after.value("textgen_tokens_total", gen_ai_token_type="output") < 1500
    assert after.value("textgen_preemptions_total") == 0


def test_engine_steps_are_timed_by_kind(traffic):
    after = traffic.after
    decode_tokens = sum(r.usage.completion_tokens - 1 for r in traffic.results)

    assert after.value("textgen_step_duration_seconds_count", kind="prefill") >= 4
    assert after.value("textgen_step_duration_seconds_count", kind="decode") >= decode_tokens
    assert after.value("textgen_step_duration_seconds_sum", kind="decode") > 0


def test_gauges_show_the_queue_the_batch_and_the_kv_cache(traffic):
    during, after = traffic.during, traffic.after
    total = after.value("textgen_kv_cache_blocks")

    assert during.value("textgen_queue_size") == 0
    assert during.value("textgen_batch_size") == 1
    assert during.value("textgen_kv_cache_blocks", state="used") >= 1
    assert during.value("textgen_kv_cache_blocks") == total > 0
    assert after.value("textgen_batch_size") == after.value("textgen_queue_size") == 0
    assert after.value("textgen_kv_cache_blocks", state="free") == total


def test_kv_cache_usage_ratio_is_the_fraction_of_blocks_in_use(traffic):
    during, after = traffic.during, traffic.after
    used = during.value("textgen_kv_cache_blocks", state="used")
    total = during.value("textgen_kv_cache_blocks")

    assert 0 < during.value("textgen_kv_cache_usage_ratio") == pytest.approx(used / total)
    assert after.value("textgen_kv_cache_usage_ratio") == 0


def test_the_endpoint_also_serves_process_metrics(traffic):
    assert traffic.after.value("process_resident_memory_bytes") > 0


def test_prefix_cache_lookups_are_counted_in_tokens(traffic):
    after = traffic.after
    prompt_tokens = sum(r.usage.prompt_tokens for r in traffic.results) + traffic.story_prompt_tokens

    assert after.value("textgen_prefix_cache_queries_total") == prompt_tokens
    assert after.value("textgen_prefix_cache_hits_total") == 0  # short, different prompts: no whole block
    assert after.value("textgen_prefix_cache_blocks") >= 0


def test_vllm_named_gauges_agree_with_textgens_own(traffic):
    """The aliases the Gateway API Inference Extension's endpoint picker reads (telemetry/vllm_metrics.py)."""
    during, after = traffic.during, traffic.after
    assert during.value("vllm:num_requests_running") == during.value("textgen_batch_size") == 1
    assert during.value("vllm:num_requests_waiting") == during.value("textgen_queue_size") == 0
    assert during.value("vllm:kv_cache_usage_perc") > 0
    assert after.value("vllm:num_requests_running") == after.value("vllm:num_requests_waiting") == 0
    assert after.value("vllm:kv_cache_usage_perc") == after.value("textgen_kv_cache_usage_ratio") == 0
    total = after.value("textgen_kv_cache_blocks")
    assert after.value("vllm:cache_config_info", num_gpu_blocks=str(int(total))) == 1

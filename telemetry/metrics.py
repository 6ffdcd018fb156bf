"""Serving metrics: histograms and counters fed by the engine's hooks, gauges read from the engine.

The three `gen_ai.server.*` histograms follow the GenAI semantic conventions (names, unit, bucket
boundaries, attributes); the `textgen.*` metrics are ours. The README (Observability) lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from engine.core.observer import EngineObserver
from engine.core.sequence import Sequence
from engine.core.step import Step
from engine.frontend.engine import Engine
from telemetry.outcome import OK, outcome
from telemetry.tracing import OPERATION

# Bucket boundaries the GenAI semantic conventions prescribe for these histograms.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
# A decode step takes milliseconds on a GPU and up to a few hundred on a CPU; a long prefill, seconds.
STEP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_PREFILL = {"kind": "prefill"}
_DECODE = {"kind": "decode"}
_INPUT = {"gen_ai.token.type": "input"}
_OUTPUT = {"gen_ai.token.type": "output"}
_CACHE_SCOPES = {scope: {"cache.scope": scope} for scope in ("shared", "key", "salt")}


class ServingMetrics(EngineObserver):
    """Records the serving metrics of one engine; its gauges read the engine at each collection."""

    def __init__(self, meter_provider: MeterProvider, engine: Engine) -> None:
        meter = meter_provider.get_meter("textgen.engine")
        self._genai = {"gen_ai.operation.name": OPERATION, "gen_ai.request.model": engine.model_info.name}
        self._time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            "s",
            "Time from arrival to the first generated token",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self._time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            "s",
            "Time per output token after the first, per request",
            explicit_bucket_boundaries_advisory=TIME_PER_OUTPUT_TOKEN_BUCKETS,
        )
        self._request_duration = meter.create_histogram(
            "gen_ai.server.request.duration",
            "s",
            "Time from arrival to the end of a request, by error.type",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS,
        )
        self._queue_duration = meter.create_histogram(
            "textgen.queue.duration",
            "s",
            "Time from arrival to admission into the running batch",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS,
        )
        self._step_duration = meter.create_histogram(
            "textgen.step.duration",
            "s",
            "Engine step duration by kind (prefill, decode)",
            explicit_bucket_boundaries_advisory=STEP_DURATION_BUCKETS,
        )
        self._requests = meter.create_counter("textgen.requests", "{request}", "Finished requests by outcome")
        self._tokens = meter.create_counter(
            "textgen.tokens", "{token}", "Prompt tokens in and generated tokens out, by gen_ai.token.type"
        )
        self._preemptions = meter.create_counter(
            "textgen.preemptions", "{preemption}", "Sequences that lost their KV blocks, to be recomputed"
        )
        self._preemptions.add(0)  # exported from the start: an alert can tell zero from missing
        self._prefix_queries = meter.create_counter(
            "textgen.prefix_cache.queries",
            "{token}",
            "Prompt tokens looked up in the prefix cache, by cache.scope (shared, key, salt)",
        )
        self._prefix_hits = meter.create_counter(
            "textgen.prefix_cache.hits",
            "{token}",
            "Prompt tokens whose KV blocks the prefix cache held, by cache.scope",
        )
        meter.create_observable_gauge(
            "textgen.prefix_cache.blocks",
            [lambda _: [Observation(engine.load.num_cached_kv_blocks)]],
            "{block}",
            "KV-cache blocks indexed by the prefix cache, in use or free (evicted when blocks run out)",
        )
        meter.create_observable_gauge(
            "textgen.queue.size",
            [lambda _: [Observation(engine.load.num_waiting)]],
            "{request}",
            "Requests waiting for admission",
        )
        meter.create_observable_gauge(
            "textgen.batch.size",
            [lambda _: [Observation(engine.load.num_running)]],
            "{sequence}",
            "Sequences in the running batch (prefilling or decoding)",
        )
        meter.create_observable_gauge(
            "textgen.kv_cache.blocks",
            [_kv_blocks(engine)],
            "{block}",
            "KV-cache blocks by state (used, free)",
        )
        # One number per replica that gateways read to pick the least loaded one; the exporter adds no
        # `_ratio` for the unit "1", so the name carries it.
        meter.create_observable_gauge(
            "textgen.kv_cache.usage_ratio",
            [lambda _: [Observation(engine.load.kv_usage)]],
            "1",
            "Fraction of the KV-cache blocks in use, 0 to 1",
        )

    def request_admitted(self, seq: Sequence) -> None:
        scope = _CACHE_SCOPES[seq.request.cache_scope]  # the kind of partition, never whose
        self._prefix_queries.add(seq.num_tokens, scope)
        self._prefix_hits.add(seq.num_computed_tokens, scope)  # at admission: what the cache held
        if seq.num_preemptions == 0:  # a readmission after preemption is not queueing of the request
            self._queue_duration.record(seq.admitted_time - seq.request.arrival_time)

    def first_token(self, seq: Sequence) -> None:
        self._time_to_first_token.record(seq.first_token_time - seq.request.arrival_time, self._genai)

    def request_preempted(self, seq: Sequence) -> None:
        self._preemptions.add(1)

    def request_finished(self, seq: Sequence, error: Exception | None) -> None:
        now = time.monotonic()
        result = outcome(seq, error)
        self._requests.add(1, {"outcome": result})
        self._tokens.add(seq.num_prompt_tokens, _INPUT)
        self._tokens.add(seq.num_completion_tokens, _OUTPUT)
        attributes = self._genai if result == OK else {**self._genai, "error.type": result}
        self._request_duration.record(now - seq.request.arrival_time, attributes)
        if result == OK and seq.num_completion_tokens > 1:
            decode_s = now - seq.first_token_time
            self._time_per_output_token.record(decode_s / (seq.num_completion_tokens - 1), self._genai)

    def step_finished(self, step: Step, start: float, end: float, kv_used: int, kv_total: int) -> None:
        self._step_duration.record(end - start, _PREFILL if step.is_prefill else _DECODE)


def _kv_blocks(engine: Engine):
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        load = engine.load  # one snapshot: used and free add up to the pool
        return [
            Observation(load.num_used_kv_blocks, {"state": "used"}),
            Observation(load.num_free_kv_blocks, {"state": "free"}),
        ]

    return observe

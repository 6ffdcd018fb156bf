"""Request and engine-step spans, made from the engine's hooks.

Per request, under the context the caller put in `GenerationRequest.trace_context` (the gRPC server span):
a `text_completion <model>` span from submit to finish, with the GenAI semantic-convention attributes, and
under it one span per phase: `queue` (submit to admission), `prefill` (admission to first token) and
`decode` (first token to finish). A preempted request queues, prefills and decodes again, so it shows more
phase spans. Per engine step, a `prefill step` or `decode step` span in a trace of its own (a step serves
many requests), linked to the phase span of every request it ran; a prefill span links back to its steps.

Every hook but `request_queued` runs on the engine's step-loop thread, whose current context belongs to no
request: every span here gets its parent explicitly. Times come from the engine's `time.monotonic()`
instants, moved to the wall clock by one offset taken at start.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Status, StatusCode, TracerProvider

from engine.core.observer import EngineObserver
from engine.core.sequence import Sequence
from engine.core.step import Step
from telemetry.outcome import outcome

OPERATION = "text_completion"
_NEW_TRACE = Context()  # an empty parent: the span starts a trace of its own
_UNSAMPLED = object()  # the entry of a request the sampler dropped


@dataclass(slots=True, eq=False)
class RequestSpans:
    """One request's spans, kept by `RequestTracer` under the sequence id."""

    request: Span
    context: Context  # holds `request`: the parent of the phase spans
    phase: Span  # the open phase span; once the request has finished, its last one
    end_ns: int | None = None  # when the request finished


class RequestTracer(EngineObserver):
    """Traces requests and engine steps; spans cost nothing for requests the sampler dropped."""

    def __init__(self, tracer_provider: TracerProvider, model: str) -> None:
        self._tracer = tracer_provider.get_tracer("textgen.engine")
        self._model = model
        self._span_name = f"{OPERATION} {model}"
        self._epoch_ns = time.time_ns() - time.monotonic_ns()
        self._lock = threading.Lock()
        self._requests: dict[int, RequestSpans | object] = {}  # by sequence id, until the request ends
        self._ended: dict[int, RequestSpans] = {}  # requests that ended since the last step, for its links

    def request_queued(self, seq: Sequence) -> None:
        self._spans(seq)

    def request_admitted(self, seq: Sequence) -> None:
        spans = self._spans(seq)
        if spans is not None:
            attributes = {
                "textgen.recompute": seq.num_preemptions > 0,
                "textgen.prefix_cache.hit_tokens": seq.num_computed_tokens,  # at admission: the cached ones
            }
            self._next_phase(spans, "prefill", self._now(), attributes)

    def first_token(self, seq: Sequence) -> None:
        spans = self._spans(seq)
        if spans is not None:
            ttft = seq.first_token_time - seq.request.arrival_time
            spans.request.set_attribute("textgen.time_to_first_token", ttft)
            spans.request.add_event("first_token", timestamp=self._ns(seq.first_token_time))

    def request_preempted(self, seq: Sequence) -> None:
        spans = self._spans(seq)
        if spans is not None:
            now = self._now()
            spans.request.add_event("preempted", {"textgen.preemptions": seq.num_preemptions}, now)
            spans.phase.set_attribute("textgen.preempted", True)
            self._next_phase(spans, "queue", now)

    def request_finished(self, seq: Sequence, error: Exception | None) -> None:
        spans = self._spans(seq)
        del self._requests[seq.seq_id]
        if spans is None:
            return
        self._ended[seq.seq_id] = spans
        spans.end_ns = now = self._now()
        request = spans.request
        request.set_attribute("gen_ai.usage.output_tokens", seq.num_completion_tokens)
        request.set_attribute("gen_ai.usage.cache_read.input_tokens", seq.num_cached_tokens)
        request.set_attribute("textgen.preemptions", seq.num_preemptions)
        if error is None:
            request.set_attribute("gen_ai.response.finish_reasons", (seq.finish_reason.value,))
        else:
            status = Status(StatusCode.ERROR, str(error))
            for span in (spans.phase, request):
                span.set_attribute("error.type", outcome(seq, error))
                span.set_status(status)
        spans.phase.end(now)
        request.end(now)

    def step_finished(self, step: Step, start: float, end: float, kv_used: int, kv_total: int) -> None:
        start_ns, end_ns = self._ns(start), self._ns(end)
        ended, self._ended = self._ended, {}
        served = [
            (row, spans)
            for row in step.rows
            if isinstance(spans := self._requests.get(row.seq_id) or ended.get(row.seq_id), RequestSpans)
        ]  # leaves out the padding rows of requests that finished in an earlier step (static batching)
        if not served:
            return
        kind = "prefill" if step.is_prefill else "decode"
        links = [
            Link(
                spans.phase.get_span_context(),
                {"textgen.step.tokens": row.num_tokens} if step.is_prefill else None,
            )
            for row, spans in served
        ]
        attributes = {
            "textgen.step.kind": kind,
            "textgen.step.batch_size": len(step.rows),
            "textgen.step.tokens": step.num_tokens,
            "textgen.step.preempted": len(step.preempted_seq_ids),
            "textgen.kv_cache.blocks_used": kv_used,
            "textgen.kv_cache.blocks_total": kv_total,
            "textgen.kv_cache.usage": kv_used / kv_total if kv_total else 0.0,
        }
        span = self._tracer.start_span(
            f"{kind} step", _NEW_TRACE, links=links, attributes=attributes, start_time=start_ns
        )
        span.end(end_ns)
        if step.is_prefill:
            self._after_prefill(served, span.get_span_context(), end_ns)

    def _after_prefill(self, served: list, step_context: trace.SpanContext, end_ns: int) -> None:
        """Link each prefill span back to this step; a request whose prompt is now cached starts decoding."""
        for row, spans in served:
            if spans.end_ns is None:
                spans.phase.add_link(step_context)
                if row.sample:
                    self._next_phase(spans, "decode", end_ns)

    def _spans(self, seq: Sequence) -> RequestSpans | None:
        """The request's spans, started on first use: the step loop may reach a request before `submit()`
        has called `request_queued`. None when the sampler dropped the request."""
        spans = self._requests.get(seq.seq_id)
        if spans is None:
            with self._lock:
                spans = self._requests.get(seq.seq_id)
                if spans is None:
                    spans = self._requests[seq.seq_id] = self._start(seq)
        return None if spans is _UNSAMPLED else spans

    def _start(self, seq: Sequence) -> object:
        request, sampling = seq.request, seq.request.sampling
        attributes = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.request.model": self._model,
            "gen_ai.request.max_tokens": seq.max_new_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
            "gen_ai.request.top_k": sampling.top_k,
            "gen_ai.usage.input_tokens": seq.num_prompt_tokens,
            "textgen.request.id": seq.id,
            "textgen.request.priority": request.priority,
        }
        if sampling.seed is not None:
            attributes["gen_ai.request.seed"] = sampling.seed
        start = self._ns(request.arrival_time)
        # Without a trace_context (offline generate()), the current context of this thread is the parent.
        span = self._tracer.start_span(
            self._span_name, request.trace_context, attributes=attributes, start_time=start
        )
        if not span.is_recording():
            return _UNSAMPLED
        context = trace.set_span_in_context(span)
        return RequestSpans(span, context, self._tracer.start_span("queue", context, start_time=start))

    def _next_phase(self, spans: RequestSpans, name: str, at_ns: int, attributes: dict | None = None) -> None:
        spans.phase.end(at_ns)
        spans.phase = self._tracer.start_span(name, spans.context, attributes=attributes, start_time=at_ns)

    def _ns(self, monotonic_s: float) -> int:
        return self._epoch_ns + int(monotonic_s * 1e9)

    def _now(self) -> int:
        return self._epoch_ns + time.monotonic_ns()

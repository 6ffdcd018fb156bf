"""Traces: the caller's span, the client span, the server span and each request's engine spans form one trace;
engine step spans link to the requests they served; cancelled, timed-out and failed requests say why."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from client import AsyncTextGenClient, TextGenClient
from engine.core.observer import EngineObserver
from engine.errors import RequestFailedError
from engine.frontend.engine import Engine, EngineConfig
from engine.request import StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from telemetry.exporters import tracer_provider_from_env
from telemetry.interceptors import server_interceptors
from telemetry.server import Telemetry

GENERATE = "/textgen.v1.TextGenerationService/Generate"
GENERATE_STREAM = "/textgen.v1.TextGenerationService/GenerateStream"
REPO = Path(__file__).resolve().parents[1]
LONG = 1500  # tokens: several seconds of the tiny model, so a call can end before its request does


@pytest.fixture(scope="module")
def exporter():
    """Spans of the global tracer provider: the clients' (they use the global one) and the server's here."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture(scope="module")
def traced_server(exporter, serve_with_telemetry):
    return serve_with_telemetry(Telemetry(tracer_provider=trace.get_tracer_provider()))


@pytest.fixture
def traced_engine(tiny_model_dir):
    """Factory: EngineConfig overrides -> (a started tiny engine, its spans), traced by its own provider."""
    engines = []

    def start(**config) -> tuple[Engine, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        telemetry = Telemetry(tracer_provider=provider)
        engine = Engine(
            EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", dtype="float32", **config),
            telemetry.observer,
        )
        engine.start()
        telemetry.attach(engine)
        engines.append(engine)
        return engine, exporter

    yield start
    for engine in engines:
        engine.shutdown()


def caller_span():
    return trace.get_tracer("test").start_as_current_span("caller")


def failed_call(target: str, prompt: str, **params) -> tuple[grpc.RpcError, int]:
    """Call Generate in a caller span, expecting it to fail; returns its error and the trace id."""
    with caller_span() as caller, TextGenClient(target) as client, pytest.raises(grpc.RpcError) as error:
        client.generate(prompt, **params)
    return error.value, caller.get_span_context().trace_id


def wait_for(condition, timeout_s: float = 10.0):
    """Poll until `condition()` is truthy and return it."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out waiting for spans"
        time.sleep(0.01)
    return result


def finished_trace(exporter: InMemorySpanExporter, trace_id: int, calls: int = 1) -> list[ReadableSpan]:
    """The trace's spans once the server and request spans of its `calls` calls have all ended (a server span
    ends after its client has the answer; the spans of a cancelled request, at the next engine step)."""

    def complete() -> list[ReadableSpan] | None:
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        servers = sum(s.kind is SpanKind.SERVER for s in spans)
        requests = sum(s.name.startswith("text_completion ") for s in spans)
        return spans if servers == requests == calls else None

    return wait_for(complete)


def only(spans: list[ReadableSpan], name: str, kind: SpanKind = SpanKind.INTERNAL) -> ReadableSpan:
    matches = [s for s in spans if (s.name == name or s.name.startswith(name + " ")) and s.kind is kind]
    assert len(matches) == 1, f"{len(matches)} spans named {name!r}: {[s.name for s in spans]}"
    return matches[0]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.parent and s.parent.span_id == parent.context.span_id), key=_start)


def _start(span: ReadableSpan) -> int:
    return span.start_time


async def test_client_server_and_request_spans_share_the_callers_trace(traced_server, exporter):
    with caller_span() as caller:
        async with AsyncTextGenClient(traced_server.target) as client:
            await client.generate("Hello there", max_new_tokens=6, ignore_eos=True)
    spans = finished_trace(exporter, caller.get_span_context().trace_id)

    client_span = only(spans, GENERATE, SpanKind.CLIENT)
    server_span = only(spans, GENERATE, SpanKind.SERVER)
    request = only(spans, "text_completion")
    assert client_span.parent.span_id == caller.get_span_context().span_id
    assert server_span.parent.span_id == client_span.context.span_id
    assert request.parent.span_id == server_span.context.span_id
    queue, prefill, decode = children(spans, request)
    assert [queue.name, prefill.name, decode.name] == ["queue", "prefill", "decode"]
    assert request.start_time == queue.start_time
    assert queue.end_time == prefill.start_time <= prefill.end_time == decode.start_time
    assert decode.end_time == request.end_time <= server_span.end_time


async def test_request_spans_carry_the_genai_attributes(traced_server, exporter):
    with caller_span() as caller:
        async with AsyncTextGenClient(traced_server.target) as client:
            result = await client.generate(
                "Hello there", max_new_tokens=6, ignore_eos=True, temperature=0.7, top_p=0.9, seed=1
            )
    request = only(finished_trace(exporter, caller.get_span_context().trace_id), "text_completion")

    attributes = request.attributes
    assert request.name == f"text_completion {traced_server.engine.model_info.name}"
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.model"] == traced_server.engine.model_info.name
    assert attributes["gen_ai.request.max_tokens"] == 6
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert attributes["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == result.usage.completion_tokens == 6
    assert attributes["textgen.request.id"] == result.request_id
    assert attributes["textgen.preemptions"] == 0
    assert 0 < attributes["textgen.time_to_first_token"] <= result.timing.total_s
    assert [e.name for e in request.events] == ["first_token"]
    assert request.status.status_code is StatusCode.UNSET


async def test_engine_step_spans_link_to_the_requests_they_served(traced_server, exporter):
    new_tokens = 8
    with caller_span() as caller:
        async with AsyncTextGenClient(traced_server.target) as client:
            await asyncio.gather(
                *(
                    client.generate(f"Request {i}", max_new_tokens=new_tokens, ignore_eos=True)
                    for i in range(3)
                )
            )
    trace_id = caller.get_span_context().trace_id
    spans = finished_trace(exporter, trace_id, calls=3)
    steps = [s for s in exporter.get_finished_spans() if s.name in ("prefill step", "decode step")]

    def steps_linking(span: ReadableSpan) -> list[ReadableSpan]:
        return [
            step for step in steps if any(link.context.span_id == span.context.span_id for link in step.links)
        ]

    decodes = [s for s in spans if s.name == "decode"]
    assert len(decodes) == 3
    for decode in decodes:
        linking = steps_linking(decode)
        assert [s.name for s in linking] == ["decode step"] * (new_tokens - 1)  # one token per decode step
        assert all(decode.start_time <= s.start_time < decode.end_time for s in linking)
    for prefill in (s for s in spans if s.name == "prefill"):
        linking = steps_linking(prefill)
        assert linking and {s.name for s in linking} == {"prefill step"}
        assert {link.context.span_id for link in prefill.links} == {s.context.span_id for s in linking}
    decode_ids = {d.context.span_id for d in decodes}
    shared = [s for s in steps if len({link.context.span_id for link in s.links} & decode_ids) >= 2]
    assert shared, "the three requests never decoded in the same step"
    for step in shared:
        assert step.attributes["textgen.step.batch_size"] == len(step.links) >= 2
        assert step.attributes["textgen.step.tokens"] == len(step.links)
        assert step.attributes["textgen.kv_cache.blocks_total"] == traced_server.engine.load.num_kv_blocks
        assert step.parent is None and step.context.trace_id != trace_id
    assert (
        max(s.attributes["textgen.kv_cache.blocks_used"] for s in shared) > 0
    )  # the last step freed them all


def test_a_cancelled_stream_ends_its_spans_cancelled(traced_server, exporter, wait_until_idle):
    with caller_span() as caller, TextGenClient(traced_server.target) as client:
        chunks = client.stream("Tell me a story", max_new_tokens=LONG, ignore_eos=True)
        for _ in zip(range(3), chunks, strict=False):
            pass
        chunks.close()  # the caller stops reading after three chunks: the client cancels the call
    spans = finished_trace(exporter, caller.get_span_context().trace_id)
    request = only(spans, "text_completion")

    server_span = only(spans, GENERATE_STREAM, SpanKind.SERVER)
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert server_span.attributes["error.type"] == "cancelled"
    assert server_span.status.status_code is StatusCode.ERROR
    client_span = only(spans, GENERATE_STREAM, SpanKind.CLIENT)
    assert client_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert request.attributes["error.type"] == "cancelled"
    assert request.status.status_code is StatusCode.ERROR
    assert 3 <= request.attributes["gen_ai.usage.output_tokens"] < LONG
    assert "gen_ai.response.finish_reasons" not in request.attributes
    decode = children(spans, request)[-1]
    assert decode.name == "decode" and decode.attributes["error.type"] == "cancelled"
    wait_until_idle(traced_server.engine)


def test_a_timed_out_call_ends_its_spans_deadline_exceeded(traced_server, exporter, wait_until_idle):
    story = dict(max_new_tokens=LONG, ignore_eos=True)
    error, trace_id = failed_call(traced_server.target, "Tell me a story", **story, timeout=0.3)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    spans = finished_trace(exporter, trace_id)
    request = only(spans, "text_completion")

    server_span = only(spans, GENERATE, SpanKind.SERVER)
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert server_span.status.status_code is StatusCode.ERROR
    assert request.attributes["error.type"] == "deadline_exceeded"
    assert request.status.status_code is StatusCode.ERROR
    wait_until_idle(traced_server.engine)


def test_the_server_span_continues_a_w3c_trace_context_from_any_caller(traced_server, exporter):
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
    request = pb.GenerateRequest(prompt="Hi", stopping=pb.StoppingCriteria(max_new_tokens=2, ignore_eos=True))
    with grpc.insecure_channel(traced_server.target) as channel:  # not instrumented: any language's caller
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        stub.Generate(request, metadata=[("traceparent", traceparent)], timeout=30)
    spans = finished_trace(exporter, trace_id)

    server_span = only(spans, GENERATE, SpanKind.SERVER)
    assert server_span.parent.span_id == parent_id and server_span.parent.is_remote
    assert only(spans, "text_completion").parent.span_id == server_span.context.span_id


def test_the_warm_up_request_is_not_traced(traced_engine):
    _, exporter = traced_engine()

    assert exporter.get_finished_spans() == ()


def test_a_preempted_request_queues_and_prefills_again(traced_engine):
    engine, exporter = traced_engine(num_kv_blocks=4, kv_block_size=16)  # 64 tokens of KV for 3 x 40 tokens
    results = engine.generate(
        [[5 + i] * 8 for i in range(3)], stopping=StoppingParams(max_new_tokens=32, ignore_eos=True)
    )
    spans = exporter.get_finished_spans()

    assert [r.completion_tokens for r in results] == [32] * 3
    preempted = [
        s for s in spans if s.name.startswith("text_completion ") and s.attributes["textgen.preemptions"]
    ]
    assert preempted, "the KV cache was never short: nothing was preempted"
    for request in preempted:
        phases = children(spans, request)
        times = request.attributes["textgen.preemptions"]
        assert [p.name for p in phases] == ["queue", "prefill", "decode"] * (times + 1)
        assert [p.attributes.get("textgen.recompute") for p in phases[1::3]] == [False] + [True] * times
        assert all(p.attributes.get("textgen.preempted") for p in phases[2:-1:3])
        assert [e.name for e in request.events].count("preempted") == times


def test_a_prefix_cache_hit_shows_on_the_request_and_prefill_spans(traced_engine):
    engine, exporter = traced_engine()
    prompt = list(range(300, 340))  # two whole 16-token blocks and a half
    stopping = StoppingParams(max_new_tokens=2, ignore_eos=True)
    engine.generate([prompt], stopping=stopping)
    engine.generate([prompt], stopping=stopping)
    requests = sorted(
        (s for s in exporter.get_finished_spans() if s.name.startswith("text_completion ")), key=_start
    )

    assert [r.attributes["gen_ai.usage.cache_read.input_tokens"] for r in requests] == [0, 32]
    prefills = [only(children(exporter.get_finished_spans(), r), "prefill") for r in requests]
    assert [p.attributes["textgen.prefix_cache.hit_tokens"] for p in prefills] == [0, 32]


def test_an_engine_fault_ends_its_requests_spans_with_the_cause(traced_engine, monkeypatch):
    engine, exporter = traced_engine()
    monkeypatch.setattr(engine.model_runner, "run", mock.Mock(side_effect=RuntimeError("device lost")))

    with pytest.raises(RequestFailedError):
        engine.generate([[5, 6, 7]], stopping=StoppingParams(max_new_tokens=4, ignore_eos=True))
    spans = exporter.get_finished_spans()

    request = only(list(spans), "text_completion")
    prefill = children(list(spans), request)[-1]
    for span in (request, prefill):
        assert span.attributes["error.type"] == "engine_fault"
        assert span.status.status_code is StatusCode.ERROR
        assert "device lost" in span.status.description


def test_with_telemetry_off_the_engine_gets_the_plain_observer(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)

    telemetry = Telemetry.from_env(metrics_port=0)

    assert type(telemetry.observer) is EngineObserver
    assert telemetry.server_interceptors() == []


def test_the_cli_prints_its_client_span_with_the_console_exporter(traced_server, exporter):
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "cli-under-test"}
    command = [
        sys.executable,
        "-m",
        "client",
        "Hi",
        "--target",
        traced_server.target,
        "--max-new-tokens",
        "2",
    ]
    cli = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)

    assert '"name": "/textgen.v1.TextGenerationService/Generate"' in cli.stdout
    assert '"service.name": "cli-under-test"' in cli.stdout
    trace_id = int(re.search(r'"trace_id": "0x([0-9a-f]{32})"', cli.stdout).group(1), 16)
    assert only(finished_trace(exporter, trace_id), GENERATE, SpanKind.SERVER)


@pytest.mark.parametrize("value", ["", "none"])
def test_no_traces_exporter_means_no_tracing(monkeypatch, value):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)

    assert tracer_provider_from_env() is None


def test_an_unknown_traces_exporter_is_refused(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")

    with pytest.raises(ValueError, match="zipkin"):
        tracer_provider_from_env()


def test_a_rejected_call_records_its_status_code_on_the_server_span(traced_server, exporter):
    error, trace_id = failed_call(traced_server.target, "Hi", temperature=-1.0)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    server_span = wait_for(
        lambda: [
            s
            for s in exporter.get_finished_spans()
            if s.context.trace_id == trace_id and s.kind is SpanKind.SERVER
        ]
    )[0]

    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert server_span.status.status_code is StatusCode.UNSET  # the caller's mistake, not a server error


def test_an_engine_fault_over_grpc_marks_the_server_span_internal(traced_server, exporter, monkeypatch):
    monkeypatch.setattr(
        traced_server.engine.model_runner, "run", mock.Mock(side_effect=RuntimeError("device lost"))
    )
    error, trace_id = failed_call(traced_server.target, "Hi", max_new_tokens=2)
    assert error.code() is grpc.StatusCode.INTERNAL
    spans = finished_trace(exporter, trace_id)

    server_span = only(spans, GENERATE, SpanKind.SERVER)
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert server_span.attributes["error.type"] == "internal"
    assert server_span.status.status_code is StatusCode.ERROR
    assert only(spans, "text_completion").attributes["error.type"] == "engine_fault"


class EndlessStream(textgen_pb2_grpc.TextGenerationServiceServicer):
    """Streams until cancelled, pausing `pause_s` between messages (0: always busy sending)."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s

    async def GenerateStream(self, request, context):
        while True:
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
            yield pb.GenerateStreamResponse(text="x" * 1000)


@pytest.mark.parametrize("pause_s", [0.0, 0.01], ids=["while-sending", "while-generating"])
async def test_a_cancelled_stream_is_recorded_wherever_the_handler_was(pause_s):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = grpc.aio.server(interceptors=server_interceptors(provider))
    textgen_pb2_grpc.add_TextGenerationServiceServicer_to_server(EndlessStream(pause_s), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = textgen_pb2_grpc.TextGenerationServiceStub(channel).GenerateStream(pb.GenerateRequest())
            for _ in range(3):
                await call.read()
            call.cancel()
        server_span = await asyncio.to_thread(wait_for, exporter.get_finished_spans)
    finally:
        await server.stop(grace=None)

    assert server_span[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert server_span[0].status.status_code is StatusCode.ERROR

"""Spans leave the server over the wire: OTLP/gRPC to a collector's trace service run in the test, configured
only by the standard OTEL_* variables."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from telemetry.server import Telemetry

GENERATE = "/textgen.v1.TextGenerationService/Generate"


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of an OpenTelemetry collector: keeps every span it is sent, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((attributes.get("service.name"), span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    receiver = TraceReceiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver
    server.stop(grace=None)


def test_the_servers_spans_reach_an_otlp_grpc_receiver(receiver, serve_with_telemetry, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "textgen-under-test")
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    server = serve_with_telemetry(Telemetry.from_env(metrics_port=0))
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7

    with grpc.insecure_channel(server.target) as channel:
        request = pb.GenerateRequest(
            prompt="Hi", stopping=pb.StoppingCriteria(max_new_tokens=3, ignore_eos=True)
        )
        textgen_pb2_grpc.TextGenerationServiceStub(channel).Generate(
            request, metadata=[("traceparent", f"00-{trace_id:032x}-{parent_id:016x}-01")], timeout=30
        )
    model = server.engine.model_info.name
    server.stop()  # shuts telemetry down, which exports every pending span

    assert {service for service, _ in receiver.spans} == {"textgen-under-test"}
    in_trace = {
        span.name: span for _, span in receiver.spans if span.trace_id == trace_id.to_bytes(16, "big")
    }
    assert set(in_trace) == {GENERATE, f"text_completion {model}", "queue", "prefill", "decode"}
    server_span = in_trace[GENERATE]
    assert server_span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server_span.parent_span_id == parent_id.to_bytes(8, "big")
    assert in_trace[f"text_completion {model}"].parent_span_id == server_span.span_id
    steps = [span for _, span in receiver.spans if span.name in ("prefill step", "decode step")]
    assert {step.name for step in steps} == {"prefill step", "decode step"}
    assert all(
        any(link.span_id == in_trace[phase].span_id for step in steps for link in step.links)
        for phase in ("prefill", "decode")
    )

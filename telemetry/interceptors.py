"""gRPC tracing at both ends: server interceptors for the grpc.aio server, a client interceptor for blocking
channels (asyncio channels use OpenTelemetry's `aio_client_interceptors()` as they are).

W3C trace context travels in the call's metadata (`traceparent`, `tracestate`), injected and extracted by
the global propagator, so the server span is the child of the caller's span whatever the caller's language.
Imports neither the engine nor torch: the client uses it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect

import grpc
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider


def server_interceptors(tracer_provider: TracerProvider | None) -> list[grpc.aio.ServerInterceptor]:
    """OpenTelemetry's interceptor (a server span per call, health checks left out), then ours on its span."""
    not_health = filters.negate(filters.health_check())
    return [aio_server_interceptor(tracer_provider, filter_=not_health), CallStatusInterceptor()]


# The codes the RPC semantic conventions count as a server's errors; a cancelled call is one here too.
_ERRORS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.CANCELLED,
}


class CallStatusInterceptor(grpc.aio.ServerInterceptor):
    """Records on the current (server) span how a call ended when that was not OK.

    OpenTelemetry's interceptor misses two endings: a call cancelled by its client or at its deadline
    (grpc.aio ends the handler with `asyncio.CancelledError`, which it ignores), and `abort_with_status`
    (which bypasses its context wrapper). Its span would claim status code OK for both.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=_watch_stream(handler.unary_stream))
        if not handler.response_streaming and inspect.iscoroutinefunction(handler.unary_unary):
            return handler._replace(unary_unary=_watch_unary(handler.unary_unary))
        return handler


def _watch_unary(behavior):
    async def unary(request, context):
        span = trace.get_current_span()
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            _record(span, _cancelled_code(context), _CANCELLED)
            raise
        except Exception:
            _record(span, context.code() or grpc.StatusCode.UNKNOWN, context.details() or "")
            raise

    return unary


def _watch_stream(behavior):
    async def stream(request, context):
        span = trace.get_current_span()
        running = True

        def on_done(_: object) -> None:
            # Cancelled while grpc.aio was sending a message, the handler never sees the cancellation: its
            # generator is only closed later, after the span has ended. Record it now, while the span is open.
            if running:
                _record(span, _cancelled_code(context), _CANCELLED)

        context.add_done_callback(on_done)
        try:
            async for response in behavior(request, context):
                yield response
        except asyncio.CancelledError:
            _record(span, _cancelled_code(context), _CANCELLED)
            raise
        except Exception:
            _record(span, context.code() or grpc.StatusCode.UNKNOWN, context.details() or "")
            raise
        finally:
            running = False

    return stream


_CANCELLED = "the call ended before its response"


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _record(span: trace.Span, code: grpc.StatusCode, details: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _ERRORS:
        span.set_attribute("error.type", code.name.lower())
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class ClientTracingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """A client span per call on a blocking channel, its context sent in the call's metadata.

    Use it instead of OpenTelemetry's blocking-client interceptor, which turns a response stream into a
    generator and so loses the call's `cancel()`. The span ends when the call does, with its status code.
    Spans go to the global tracer provider unless one is given.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("textgen.client", tracer_provider=tracer_provider)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._intercept(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._intercept(continuation, client_call_details, request)

    def _intercept(self, continuation, details: grpc.ClientCallDetails, request):
        service, _, method = details.method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        span = self._tracer.start_span(details.method, kind=SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, trace.set_span_in_context(span))
        metadata = [*(details.metadata or ()), *carrier.items()]
        call = continuation(
            _CallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                getattr(details, "compression", None),
            ),
            request,
        )
        call.add_done_callback(lambda done: _end_client_span(span, done))
        return call


def _end_client_span(span: trace.Span, call: grpc.Call) -> None:
    code = call.code()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {call.details()}"))
    span.end()

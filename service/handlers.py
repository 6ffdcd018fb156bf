"""gRPC method handlers (textgen.v1's, the SMG worker protocol's): each receives its request as bytes and
parses it itself.

gRPC Python parses a request before any handler runs, and answers one that does not parse (truncated, a
string that is not UTF-8) UNKNOWN "Unexpected DecodeError", with a traceback in the log for every call.
Parsed here, such a request gets INVALID_ARGUMENT (reason MALFORMED_REQUEST) and one log line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import descriptor, message, message_factory

from protos.textgen.v1 import textgen_pb2 as pb
from service.status import MalformedRequest, abort

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TextGenerationService"]


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The `time.monotonic()` instant the call's deadline falls at; None for a call without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def add_servicer_to_server(
    servicer: object, server: grpc.aio.Server, service: descriptor.ServiceDescriptor = SERVICE
) -> None:
    """Register `servicer`'s methods of `service` (textgen.v1's by default), as the generated
    `add_..._to_server` does, with bytes for requests."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name)) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _handler(method: descriptor.MethodDescriptor, behavior: Callable) -> grpc.RpcMethodHandler:
    """A unary-unary or unary-stream handler that parses the request, then calls `behavior` with it."""
    request_type = message_factory.GetMessageClass(method.input_type)
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString

    async def parse(data: bytes, context: grpc.aio.ServicerContext) -> message.Message:
        try:
            return request_type.FromString(data)
        except message.DecodeError as e:
            log.warning("malformed request to %s from %s: %s", method.full_name, context.peer(), e)
            await abort(context, MalformedRequest(str(e)))

    if method.server_streaming:

        async def stream(data: bytes, context: grpc.aio.ServicerContext):
            request = await parse(data, context)
            async with contextlib.aclosing(behavior(request, context)) as responses:  # closed when cancelled
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serialize)

    async def unary(data: bytes, context: grpc.aio.ServicerContext) -> message.Message:
        return await behavior(await parse(data, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)

"""The gRPC health service, open to every caller and so bounded: `Check` as standard, `Watch` only for the
services this server reports on, and only so many watchers at once; a request of more than a name's bytes
is never parsed.

grpc's reference servicer keeps a condition per watched name for as long as its stream is open, whatever
the name: 200 unauthenticated streams with 1 MB names held 1 GB. Here a name the server does not serve is
refused at once (NOT_FOUND), a request over `MAX_REQUEST_BYTES` INVALID_ARGUMENT before it is parsed (each
parse would copy the name twice more), and past `max_watchers` open streams a new one RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import message
from grpc_health.v1 import health, health_pb2

from service import memory

MAX_REQUEST_BYTES = 1024  # a served name is a few dozen bytes
_TOO_LARGE = f"a health request takes at most {MAX_REQUEST_BYTES} bytes"


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc's health servicer; `Watch` takes only the names given to `set`, `max_watchers` streams at once.

    Its methods take None for a request too large to parse (`add_health_to_server`)."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.num_watchers = 0

    async def Check(
        self, request: health_pb2.HealthCheckRequest | None, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _TOO_LARGE)
        return await super().Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest | None, context: grpc.aio.ServicerContext
    ) -> None:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _TOO_LARGE)
        if request.service not in self._server_status:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this server reports on no such service")
        if self.num_watchers >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.max_watchers} health watchers already open"
            )
        self.num_watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.num_watchers -= 1


def add_health_to_server(servicer: BoundedHealthServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` as grpc's generated `add_HealthServicer_to_server` does, but with requests over
    `MAX_REQUEST_BYTES` handed to it as None, unparsed."""
    check, listing = health_pb2.HealthCheckRequest, health_pb2.HealthListRequest
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, _bounded(check), health_pb2.HealthCheckResponse.SerializeToString
        ),
        "List": grpc.unary_unary_rpc_method_handler(
            servicer.List, _bounded(listing), health_pb2.HealthListResponse.SerializeToString
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, _bounded(check), health_pb2.HealthCheckResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(health.SERVICE_NAME, handlers)


def _bounded(kind: type[message.Message]) -> Callable[[bytes], message.Message | None]:
    def parse(data: bytes) -> message.Message | None:
        if len(data) > MAX_REQUEST_BYTES:
            memory.soon()  # the refused bytes went through the C heap: give the pages back after the burst
            return None
        return kind.FromString(data)

    return parse

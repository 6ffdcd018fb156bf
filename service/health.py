"""The gRPC health service, open to every caller and so bounded: `Check` as standard, `Watch` only for the
services this server reports on, and only so many watchers at once.

grpc's reference servicer keeps a condition per watched name for as long as its stream is open, whatever
the name: 200 unauthenticated streams with 1 MB names held 1 GB. Here a name the server does not serve is
refused at once (NOT_FOUND), and past `max_watchers` open streams a new one is refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc's health servicer; `Watch` takes only the names given to `set`, `max_watchers` streams at once."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.num_watchers = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
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

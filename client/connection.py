"""What both clients hold: a channel to one target, its stub, the metadata carrying the API key, the default
deadline and the retry policy. Each client opens its own kind of channel (`grpc` or `grpc.aio`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from client.channel import api_key_metadata
from client.retry import DEFAULT_RETRY, Retries, RetryPolicy
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc


class Connection:
    """The state of a client (`TextGenClient` documents the arguments); `_open_channel` is the client's."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel = self._open_channel(target, credentials, options)
        self._stub = pb_grpc.TextGenerationServiceStub(self._channel)
        self._metadata = api_key_metadata(api_key)  # sent with every call
        self._timeout = timeout
        self._retry = retry

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
    ) -> Any:
        raise NotImplementedError

    def _retries(self, timeout: float | None) -> Retries:
        """The attempts of one call: its own `timeout`, else the client's."""
        return Retries(self._retry, self._timeout if timeout is None else timeout)

"""`TextGenClient`: the blocking client."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from client.channel import open_channel
from client.connection import Connection
from client.params import Messages, generate_request, tokenize_request
from client.results import GenerationResult, ModelInfo, StreamChunk, TokenizeResult
from protos.textgen.v1 import textgen_pb2 as pb
from telemetry.interceptors import ClientTracingInterceptor


class TextGenClient(Connection):
    """A blocking textgen.v1 client for one target (`host:port`, or any gRPC target such as `dns:///...`).

    `timeout` is the default deadline of each call in seconds (None: no deadline), covering every
    retry. Calls failing with UNAVAILABLE, or with RESOURCE_EXHAUSTED that carries the server's
    RetryInfo, are retried per `retry`; a stream only until its first message arrives. Other errors
    raise `grpc.RpcError`. `credentials` (e.g. `tls_credentials(...)`) make the channel TLS; `api_key`
    (default: $TEXTGEN_API_KEY) goes with every call as `authorization: Bearer <key>` metadata.

        with TextGenClient("localhost:50051") as client:
            print(client.generate("The capital of France is", max_new_tokens=8).text)
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
    ) -> grpc.Channel:
        channel = open_channel(grpc, target, credentials, options)
        # A client span per call, its W3C context sent in the metadata.
        return grpc.intercept_channel(channel, ClientTracingInterceptor())

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **request: Any
    ) -> GenerationResult:
        """Generate from a prompt, or `messages` (a chat) or `input_ids`; the rest of `request` are
        `GenerateParams` fields."""
        return GenerationResult.from_proto(
            self._unary(self._stub.Generate, generate_request(prompt, **request), timeout)
        )

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **request: Any
    ) -> Iterator[StreamChunk]:
        """Like `generate`, but yields text and tokens as they are generated; stopping early cancels."""
        call, messages = self._unary(self._open_stream, generate_request(prompt, **request), timeout)
        try:
            yield from map(StreamChunk.from_proto, messages)
        finally:
            call.cancel()  # no-op once the call ended; stops generation if the caller stopped early

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model and the server's limits."""
        return ModelInfo.from_proto(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def tokenize(
        self, text: str | None = None, *, messages: Messages | None = None, timeout: float | None = None
    ) -> TokenizeResult:
        """The token ids the model sees for `text` or chat `messages`."""
        request = tokenize_request(text, messages)
        return TokenizeResult.from_proto(self._unary(self._stub.Tokenize, request, timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TextGenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_stream(self, request: pb.GenerateRequest, **options: Any) -> tuple[grpc.Call, Iterator]:
        """The call and its messages, its first received: until then, a stream is retried as a unary call."""
        call = self._stub.GenerateStream(request, **options)
        first = next(call, None)
        return call, itertools.chain(() if first is None else (first,), call)

    def _unary(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float | None) -> Any:
        retries = self._retries(timeout)
        while True:
            try:
                return method(request, timeout=retries.time_left(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = retries.delay_after(error)
            time.sleep(delay)

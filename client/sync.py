"""`TextGenClient`: the blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from client.channel import api_key_metadata, open_channel
from client.params import GenerateParams, Messages, generate_request, tokenize_request
from client.results import GenerationResult, ModelInfo, StreamChunk, TokenizeResult
from client.retry import DEFAULT_RETRY, Retries, RetryPolicy
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from telemetry.interceptors import ClientTracingInterceptor


class TextGenClient:
    """A blocking textgen.v1 client for one target (`host:port`, or any gRPC target such as `dns:///...`).

    `timeout` is the default deadline of each call in seconds (None: no deadline), covering every
    retry. Calls failing with UNAVAILABLE, or with RESOURCE_EXHAUSTED that carries the server's
    RetryInfo, are retried per `retry`; a stream only until its first message arrives. Other errors
    raise `grpc.RpcError`. `credentials` (e.g. `tls_credentials(...)`) make the channel TLS; `api_key`
    (default: $TEXTGEN_API_KEY) goes with every call as `authorization: Bearer <key>` metadata.

        with TextGenClient("localhost:50051") as client:
            print(client.generate("The capital of France is", max_new_tokens=8).text)
    """

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
        channel = open_channel(grpc, target, credentials, options)
        # A client span per call, its W3C context sent in the metadata.
        self._channel = grpc.intercept_channel(channel, ClientTracingInterceptor())
        self._stub = pb_grpc.TextGenerationServiceStub(self._channel)
        self._metadata = api_key_metadata(api_key)  # sent with every call
        self._timeout = timeout
        self._retry = retry

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        input_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Generate from a prompt, chat `messages` or `input_ids`; `params` are `GenerateParams` fields."""
        request = generate_request(prompt, messages, input_ids, GenerateParams(**params))
        return GenerationResult.from_proto(self._unary(self._stub.Generate, request, timeout))

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        input_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[StreamChunk]:
        """Like `generate`, but yields text and tokens as they are generated; stopping early cancels."""
        request = generate_request(prompt, messages, input_ids, GenerateParams(**params))
        retries = Retries(self._retry, self._timeout if timeout is None else timeout)
        while True:
            call = self._stub.GenerateStream(request, timeout=retries.time_left(), metadata=self._metadata)
            received = False
            try:
                for message in call:
                    received = True
                    yield StreamChunk.from_proto(message)
                return
            except grpc.RpcError as error:
                delay = retries.delay_after(error, received=received)
            finally:
                call.cancel()  # no-op once the call ended; stops generation if the caller stopped early
            time.sleep(delay)

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

    def _unary(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float | None) -> Any:
        retries = Retries(self._retry, self._timeout if timeout is None else timeout)
        while True:
            try:
                return method(request, timeout=retries.time_left(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = retries.delay_after(error)
            time.sleep(delay)

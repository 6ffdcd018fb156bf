"""`AsyncTextGenClient`: the asyncio client, with the same methods as `TextGenClient`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from client.channel import api_key_metadata, open_channel
from client.params import GenerateParams, Messages, generate_request, tokenize_request
from client.results import GenerationResult, ModelInfo, StreamChunk, TokenizeResult
from client.retry import DEFAULT_RETRY, Retries, RetryPolicy
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc


class AsyncTextGenClient:
    """An asyncio textgen.v1 client; see `TextGenClient` for targets, deadlines, retries, TLS and API keys.

    async with AsyncTextGenClient("localhost:50051") as client:
        async for chunk in client.stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
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
        tracing = aio_client_interceptors()  # a client span per call, its W3C context sent in the metadata
        self._channel = open_channel(grpc.aio, target, credentials, options, interceptors=tracing)
        self._stub = pb_grpc.TextGenerationServiceStub(self._channel)
        self._metadata = api_key_metadata(api_key)  # sent with every call
        self._timeout = timeout
        self._retry = retry

    async def generate(
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
        return GenerationResult.from_proto(await self._unary(self._stub.Generate, request, timeout))

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        input_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamChunk]:
        """Like `generate`, but yields text and tokens as they are generated; stopping early cancels."""
        request = generate_request(prompt, messages, input_ids, GenerateParams(**params))
        retries = Retries(self._retry, self._timeout if timeout is None else timeout)
        while True:
            call = self._stub.GenerateStream(request, timeout=retries.time_left(), metadata=self._metadata)
            received = False
            try:
                async for message in call:
                    received = True
                    yield StreamChunk.from_proto(message)
                return
            except grpc.RpcError as error:
                delay = retries.delay_after(error, received=received)
            finally:
                call.cancel()  # no-op once the call ended; stops generation if the caller stopped early
            await asyncio.sleep(delay)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model and the server's limits."""
        return ModelInfo.from_proto(
            await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        )

    async def tokenize(
        self, text: str | None = None, *, messages: Messages | None = None, timeout: float | None = None
    ) -> TokenizeResult:
        """The token ids the model sees for `text` or chat `messages`."""
        request = tokenize_request(text, messages)
        return TokenizeResult.from_proto(await self._unary(self._stub.Tokenize, request, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTextGenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable, request: Any, timeout: float | None
    ) -> Any:
        retries = Retries(self._retry, self._timeout if timeout is None else timeout)
        while True:
            try:
                return await method(request, timeout=retries.time_left(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = retries.delay_after(error)
            await asyncio.sleep(delay)

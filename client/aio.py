"""`AsyncTextGenClient`: the asyncio client, with the same methods as `TextGenClient`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from client.channel import open_channel
from client.connection import Connection
from client.params import Messages, generate_request, tokenize_request
from client.results import GenerationResult, ModelInfo, StreamChunk, TokenizeResult
from protos.textgen.v1 import textgen_pb2 as pb


class AsyncTextGenClient(Connection):
    """An asyncio textgen.v1 client; see `TextGenClient` for targets, deadlines, retries, TLS and API keys.

    async with AsyncTextGenClient("localhost:50051") as client:
        async for chunk in client.stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        tracing = aio_client_interceptors()  # a client span per call, its W3C context sent in the metadata
        return open_channel(grpc.aio, target, credentials, options, interceptors=tracing)

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **request: Any
    ) -> GenerationResult:
        """Generate from a prompt, or `messages` (a chat) or `input_ids`; the rest of `request` are
        `GenerateParams` fields."""
        request = generate_request(prompt, **request)
        return GenerationResult.from_proto(await self._unary(self._stub.Generate, request, timeout))

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **request: Any
    ) -> AsyncIterator[StreamChunk]:
        """Like `generate`, but yields text and tokens as they are generated; stopping early cancels."""
        call, messages = await self._unary(self._open_stream, generate_request(prompt, **request), timeout)
        try:
            async for message in messages:
                yield StreamChunk.from_proto(message)
        finally:
            call.cancel()  # no-op once the call ended; stops generation if the caller stopped early

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

    async def _open_stream(self, request: pb.GenerateRequest, **options: Any) -> tuple[grpc.aio.Call, Any]:
        """The call and its messages, its first received: until then, a stream is retried as a unary call."""
        call = self._stub.GenerateStream(request, **options)
        messages = aiter(call)
        first = await anext(messages, None)
        return call, _chained(first, messages)

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable, request: Any, timeout: float | None
    ) -> Any:
        retries = self._retries(timeout)
        while True:
            try:
                return await method(request, timeout=retries.time_left(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = retries.delay_after(error)
            await asyncio.sleep(delay)


async def _chained(first: Any, rest: AsyncIterator) -> AsyncIterator:
    if first is None:
        return
    yield first
    async for message in rest:
        yield message

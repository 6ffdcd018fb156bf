"""A load-generator client for textgen's OpenAI-compatible HTTP front: `/v1/completions` streamed as SSE.

One aiohttp session per run (kept-alive connections, as the gRPC client keeps one channel), so that the
two fronts are compared at the same load with the same connection reuse. A chunk carries one engine event,
which holds as many tokens as the engine produced while the server was busy sending the previous one (and
an event whose token ended inside a UTF-8 character sends no chunk): so tokens are counted from the usage so
far that every chunk carries (vLLM's `stream_options.continuous_usage_stats`), never one per chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Self

import aiohttp

from bench.loadgen import Chunk, StreamError


def completion_request(ids: Sequence[int], output_len: int) -> dict:
    """The benchmark request: the prompt's token ids, greedy, exactly `output_len` new tokens, streamed."""
    return {
        "prompt": list(ids),
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


async def sse_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON objects of a server-sent event stream, up to `[DONE]`."""
    async for line in response.content:
        data = line.removeprefix(b"data: ").strip()
        if not line.startswith(b"data: ") or data == b"[DONE]":
            continue
        yield json.loads(data)


class HttpSession:
    """One aiohttp session (kept-alive connections) for as long as the client is entered."""

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._session is not None
        await self._session.close()


class OpenAIHttpClient(HttpSession):
    """textgen's `/v1/completions` stream as a `StreamingClient` of the load generator."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    async def stream(self, ids: Sequence[int], output_len: int, timeout_s: float) -> AsyncIterator[Chunk]:
        assert self._session is not None, "use the client as an async context manager"
        url, body = f"{self.base_url}/v1/completions", completion_request(ids, output_len)
        tokens = 0
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._session.post(url, json=body, timeout=timeout) as response:
                if response.status != 200:
                    raise StreamError(f"HTTP {response.status}: {(await response.text())[:500]}")
                async for chunk in sse_chunks(response):
                    if "error" in chunk:
                        raise StreamError(f"{chunk['error']['code']}: {chunk['error']['message']}")
                    usage = chunk["usage"]  # every chunk's: the tokens so far
                    yield Chunk(usage["completion_tokens"] - tokens, usage["prompt_tokens"])
                    tokens = usage["completion_tokens"]
        except (aiohttp.ClientError, TimeoutError) as error:
            raise StreamError(f"{type(error).__name__}: {error}") from error

"""A load-generator client for llama.cpp's server: `/completion` streamed as server-sent events.

Standard library only: one HTTP/1.1 connection per request (`Connection: close`, on loopback), its body
read as it arrives. Each event is one JSON object; `tokens_predicted` counts the request's output tokens
so far (llama.cpp holds back a token that ends inside a UTF-8 character and sends it with the next), and
`tokens_evaluated` is the prompt's length as llama.cpp counted it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Self

from bench.loadgen import Chunk, StreamError
from bench.workload import RequestSpec, prompt_ids


def completion_request(ids: Sequence[int], output_len: int) -> dict:
    """The `/completion` body for textgen's benchmark request: the prompt's token ids, greedy, exactly
    `output_len` new tokens with EOS ignored, streamed."""
    return {
        "prompt": list(ids),
        "n_predict": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "top_k": 1,
        "cache_prompt": False,  # textgen runs with --no-prefix-caching here: both compute every prompt
        "stream": True,
    }


class EventDecoder:
    """Splits a server-sent-event byte stream, fed in pieces, into the `data` of each complete event."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        """The data of the events `data` completes; comments (`:` lines, llama.cpp's pings) are dropped."""
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        return [d for d in map(event_data, events) if d is not None]


def event_data(event: bytes) -> str | None:
    """The `data:` lines of one event joined by newlines, or None when it has none."""
    lines = [line.decode()[5:].removeprefix(" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return "\n".join(lines) if lines else None


def chunk_of(event: dict, tokens_so_far: int) -> Chunk:
    """The new tokens of one `/completion` stream event, given how many the request had before it."""
    if "error" in event:
        error = event["error"]
        raise StreamError(f"llama.cpp: {error.get('message', error) if isinstance(error, dict) else error}")
    return Chunk(event.get("tokens_predicted", tokens_so_far) - tokens_so_far, event.get("tokens_evaluated"))


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """An HTTP/1.1 response body as it arrives: chunked coding decoded, else read until the server closes."""
    if headers.get("transfer-encoding", "").lower() != "chunked":
        while data := await reader.read(65536):
            yield data
        return
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]  # each chunk ends with CRLF


async def post_stream(host: str, port: int, path: str, body: dict) -> AsyncIterator[bytes]:
    """POST `body` as JSON and yield the response body as it arrives; StreamError on a non-200 status."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    )
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        raise StreamError(f"cannot connect to {host}:{port}: {error}") from error
    try:
        writer.write(head.encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            text = b"".join([data async for data in read_body(reader, headers)])
            raise StreamError(f"HTTP {status}: {text.decode(errors='replace')[:500]}")
        async for data in read_body(reader, headers):
            yield data
    finally:
        writer.close()


class LlamaCppClient:
    """llama.cpp's `/completion` stream as a `StreamingClient` of the load generator."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def stream(self, ids: Sequence[int], output_len: int, timeout_s: float) -> AsyncIterator[Chunk]:
        decoder, tokens = EventDecoder(), 0
        try:
            async with asyncio.timeout(timeout_s):
                async for data in post_stream(
                    self.host, self.port, "/completion", completion_request(ids, output_len)
                ):
                    for text in decoder.feed(data):
                        chunk = chunk_of(json.loads(text), tokens)
                        tokens += chunk.num_tokens
                        yield chunk
        except TimeoutError as error:
            raise StreamError(f"no complete answer within {timeout_s:g} s") from error


def post_json(url: str, body: dict, timeout_s: float = 60.0) -> dict:
    """A plain (not streamed) JSON request, for the server's small endpoints."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def is_ready(base_url: str) -> bool:
    """True once `/health` answers 200 (503 while the model loads; refused before the port is bound)."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tokenize(base_url: str, text: str) -> list[int]:
    """`text` as llama.cpp's tokenizer splits it, without special tokens."""
    return post_json(f"{base_url}/tokenize", {"content": text, "add_special": False})["tokens"]


def tokenize_prompts(base_url: str, specs: Sequence[RequestSpec]) -> list[list[int]]:
    """Each request's prompt as exactly `prompt_len` token ids, tokenized by llama.cpp."""
    return [prompt_ids(spec, lambda text: tokenize(base_url, text)) for spec in specs]

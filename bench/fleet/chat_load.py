"""Load through a gateway's `/v1/chat/completions`, streamed: the workload replayed at its arrival times, or
a few callers sending back to back until told to stop.

A request asks for exactly its output length (`ignore_eos`); every chunk with text is a token's arrival
(TTFT is the first), and the usage chunk at the end (`stream_options.include_usage`) settles the count of
tokens and gives the prompt's. The traces are `bench.metrics.RequestTrace`s, summarized as every online
benchmark's are.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace

import aiohttp

from bench.fleet.tenants import ChatSpec
from bench.metrics import RequestTrace
from bench.serving.openai_client import HttpSession, sse_chunks


class ChatClient(HttpSession):
    """One aiohttp session (kept-alive connections) to `base_url`'s chat completions."""

    def __init__(self, base_url: str, model: str, temperature: float, timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.temperature = temperature
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def body(self, spec: ChatSpec) -> dict:
        return {
            "model": self.model,
            "messages": list(spec.messages),
            "max_tokens": spec.output_len,
            "temperature": self.temperature,
            "seed": spec.index,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def send(self, spec: ChatSpec) -> RequestTrace:
        """Stream one request; its trace, with `error` set when it failed or came back short."""
        assert self._session is not None, "use the client as an async context manager"
        trace = RequestTrace(spec.index, time.perf_counter(), 0.0, expected_output_tokens=spec.output_len)
        try:
            async with self._session.post(self.url, json=self.body(spec), timeout=self.timeout) as response:
                if response.status != 200:
                    trace.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                else:
                    await self._read(response, trace)
        except (aiohttp.ClientError, TimeoutError) as error:
            trace.error = f"{type(error).__name__}: {error}"
        if not trace.error and trace.output_tokens != spec.output_len:
            trace.error = f"expected {spec.output_len} tokens, got {trace.output_tokens}"
        trace.end_s = time.perf_counter()
        return trace

    @staticmethod
    async def _read(response: aiohttp.ClientResponse, trace: RequestTrace) -> None:
        async for chunk in sse_chunks(response):
            if "error" in chunk:
                trace.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                return
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
                trace.prompt_tokens = usage["prompt_tokens"]
                missing = usage["completion_tokens"] - trace.output_tokens
                trace.token_times_s.extend([now] * max(0, missing))  # tokens whose text was empty
            elif any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                trace.token_times_s.append(now)


async def replay(client: ChatClient, specs: Sequence[ChatSpec]) -> tuple[list[RequestTrace], float]:
    """Send each request at its arrival time; every trace, and first send to last response in seconds."""
    start = time.perf_counter()

    async def one(spec: ChatSpec) -> RequestTrace:
        await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
        return await client.send(spec)

    traces = list(await asyncio.gather(*(one(spec) for spec in specs)))
    return traces, max(t.end_s for t in traces) - start


class BackToBack:
    """`concurrency` callers, each sending the workload's requests in turn, until `stop()`."""

    def __init__(self, client: ChatClient, specs: Sequence[ChatSpec], concurrency: int) -> None:
        self._client = client
        self._specs = specs
        self._stopping = asyncio.Event()
        self._traces: list[RequestTrace] = []
        self._tasks = [asyncio.ensure_future(self._caller(i, concurrency)) for i in range(concurrency)]
        self.start_s = time.perf_counter()

    async def _caller(self, first: int, step: int) -> None:
        index = first
        while not self._stopping.is_set():
            spec = self._specs[index % len(self._specs)]
            self._traces.append(await self._client.send(replace(spec, index=index)))
            index += step

    @property
    def num_done(self) -> int:
        return len(self._traces)

    async def stop(self) -> tuple[list[RequestTrace], float]:
        """Start no more requests, wait for those in flight; every trace and the duration in seconds."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self._traces, time.perf_counter() - self.start_s

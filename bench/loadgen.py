"""The online load generator: replays a seeded workload against a running textgen server over gRPC.

Each request streams (`GenerateStream`) its prompt as token ids with `ignore_eos`, so it generates
exactly its workload length; the client records when every token arrived. Another server can be driven
through the same code (and measured by the same metrics) with a `StreamingClient` of its own
(bench/peers/llamacpp_client.py for llama.cpp's server).

    python -m bench.loadgen --target 127.0.0.1:50051 --num-requests 64 --request-rate 4 --slo-ttft 1
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Self

import grpc
from tqdm import tqdm

from bench.metrics import RequestTrace, Summary, summarize
from bench.report import to_json
from bench.workload import RequestSpec, WorkloadConfig, make_workload, prompt_ids
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc


@dataclass(slots=True)
class LoadResult:
    """The traces of one run and its duration: first send to last response."""

    traces: list[RequestTrace]
    duration_s: float

    def summary(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> Summary:
        return summarize(self.traces, self.duration_s, slo_ttft_s, slo_tpot_s)


async def tokenize_prompts(target: str, specs: Sequence[RequestSpec]) -> list[list[int]]:
    """Each request's prompt as exactly `prompt_len` token ids, tokenized by the server's own tokenizer."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)

        async def encode(spec: RequestSpec) -> list[int]:
            response = await stub.Tokenize(pb.TokenizeRequest(text=spec.prompt_text), timeout=60)
            return prompt_ids(spec, lambda _: list(response.ids))

        return list(await asyncio.gather(*(encode(s) for s in specs)))


def generate_request(ids: Sequence[int], output_len: int) -> pb.GenerateRequest:
    """Greedy, `ignore_eos`, exactly `output_len` new tokens."""
    return pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=ids),
        stopping=pb.StoppingCriteria(max_new_tokens=output_len, ignore_eos=True),
    )


@dataclass(slots=True, frozen=True)
class Chunk:
    """What one streamed message of a request carried: its new output tokens, and the prompt's length
    as the server counted it, where the server says."""

    num_tokens: int
    prompt_tokens: int | None = None


class StreamError(Exception):
    """A request that failed or was refused; its message is the trace's error."""


class StreamingClient(Protocol):
    """A server the load generator drives: one greedy request with EOS ignored, streamed as chunks.

    Used as an async context manager around a run (a connection held for the run, or none);
    `stream` raises `StreamError` when the request fails.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    def stream(self, ids: Sequence[int], output_len: int, timeout_s: float) -> AsyncIterator[Chunk]: ...


class GrpcClient:
    """textgen's `GenerateStream` over one gRPC channel."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TextGenerationServiceStub | None = None

    async def __aenter__(self) -> Self:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.TextGenerationServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._channel is not None
        await self._channel.close()

    async def stream(self, ids: Sequence[int], output_len: int, timeout_s: float) -> AsyncIterator[Chunk]:
        assert self._stub is not None, "use the client as an async context manager"
        try:
            async for message in self._stub.GenerateStream(
                generate_request(ids, output_len), timeout=timeout_s
            ):
                yield Chunk(len(message.tokens))
        except grpc.aio.AioRpcError as error:
            raise StreamError(f"{error.code().name}: {error.details()}") from error


async def send_one(
    client: StreamingClient, spec: RequestSpec, ids: Sequence[int], timeout_s: float
) -> RequestTrace:
    """Stream one request and record when each of its tokens arrived."""
    trace = RequestTrace(
        spec.index, time.perf_counter(), 0.0, prompt_tokens=len(ids), expected_output_tokens=spec.output_len
    )
    try:
        async for chunk in client.stream(ids, spec.output_len, timeout_s):
            trace.token_times_s.extend([time.perf_counter()] * chunk.num_tokens)
            if chunk.prompt_tokens is not None:
                trace.prompt_tokens = chunk.prompt_tokens
        if trace.output_tokens != spec.output_len:
            trace.error = f"expected {spec.output_len} tokens, got {trace.output_tokens}"
    except StreamError as error:
        trace.error = str(error)
    trace.end_s = time.perf_counter()
    return trace


async def run_load(
    target: str | StreamingClient,
    specs: Sequence[RequestSpec],
    prompts: Sequence[Sequence[int]],
    concurrency: int = 0,
    timeout_s: float = 600.0,
    progress: bool = True,
    desc: str = "requests",
) -> LoadResult:
    """Send each request at its arrival time (at most `concurrency` in flight, 0 = no limit); wait for all.

    `target` is a textgen server's gRPC address, or a client for another server.
    """
    assert len(specs) == len(prompts)
    client = GrpcClient(target) if isinstance(target, str) else target
    limit = asyncio.Semaphore(concurrency if concurrency > 0 else len(specs))
    bar = tqdm(total=len(specs), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    async with client:
        start = time.perf_counter()

        async def replay(spec: RequestSpec, ids: Sequence[int]) -> RequestTrace:
            await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
            async with limit:
                trace = await send_one(client, spec, ids, timeout_s)
            bar.update(1)
            return trace

        traces = await asyncio.gather(*(replay(s, p) for s, p in zip(specs, prompts, strict=True)))
    bar.close()
    duration = max(t.end_s for t in traces) - start
    return LoadResult(list(traces), duration)


async def warm_up(
    target: str | StreamingClient, prompt: Sequence[int], num_requests: int = 2, output_len: int = 4
) -> None:
    """A few short requests, so the first measured request pays no one-time cost."""
    specs = [RequestSpec(i, 0.0, len(prompt), output_len, "") for i in range(num_requests)]
    result = await run_load(target, specs, [prompt] * num_requests, progress=False)
    errors = [t.error for t in result.traces if not t.ok]
    assert not errors, f"warm-up failed: {errors[0]}"


def add_workload_args(parser: argparse.ArgumentParser, **defaults: float | None) -> None:
    """The workload flags shared by every online benchmark; `defaults` overrides their defaults."""
    d = {
        "num_requests": 32,
        "request_rate": math.inf,
        "prompt_len": 64,
        "output_len": 64,
        "len_sigma": 0.5,
        "slo_ttft": None,
        "slo_tpot": None,
    }
    d.update(defaults)
    parser.add_argument("--num-requests", type=int, default=d["num_requests"], help="requests to send")
    if d["request_rate"] is not None:  # None: the caller sets rates itself (the sweep)
        parser.add_argument(
            "--request-rate",
            type=float,
            default=d["request_rate"],
            help="Poisson rate in req/s; inf = all at once",
        )
    parser.add_argument("--concurrency", type=int, default=0, help="most requests in flight (0 = no limit)")
    parser.add_argument("--prompt-len", type=float, default=d["prompt_len"], help="mean prompt tokens")
    parser.add_argument("--output-len", type=float, default=d["output_len"], help="mean output tokens")
    parser.add_argument("--len-sigma", type=float, default=d["len_sigma"], help="lognormal sigma of lengths")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="prompt lengths are clipped here")
    parser.add_argument("--max-output-len", type=int, default=1024, help="output lengths are clipped here")
    parser.add_argument("--seed", type=int, default=0, help="workload seed: arrivals, lengths, prompts")
    parser.add_argument(
        "--slo-ttft", type=float, default=d["slo_ttft"], help="TTFT SLO in seconds, for goodput"
    )
    parser.add_argument(
        "--slo-tpot", type=float, default=d["slo_tpot"], help="TPOT SLO in seconds, for goodput"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def workload_config(args: argparse.Namespace, request_rate: float | None = None) -> WorkloadConfig:
    """The `WorkloadConfig` the workload flags describe (`request_rate` overrides the flag)."""
    return WorkloadConfig(
        num_requests=args.num_requests,
        request_rate=args.request_rate if request_rate is None else request_rate,
        prompt_len_mean=args.prompt_len,
        output_len_mean=args.output_len,
        len_sigma=args.len_sigma,
        prompt_len_range=(4, args.max_prompt_len),
        output_len_range=(1, args.max_output_len),
        seed=args.seed,
    )


def run_record(config: WorkloadConfig, result: LoadResult, summary: Summary, **extra: object) -> dict:
    """One run as JSON: the workload, the summary, and every request's trace."""
    return {
        "workload": asdict(config),
        **extra,
        "summary": summary.to_dict(),
        "traces": [asdict(t) for t in result.traces],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="gRPC address of a running textgen server"
    )
    add_workload_args(parser)
    parser.add_argument("--output", type=Path, default=None, help="write JSON results here")
    args = parser.parse_args(argv)

    config = workload_config(args)
    specs = make_workload(config)
    prompts = asyncio.run(tokenize_prompts(args.target, specs))
    result = asyncio.run(
        run_load(args.target, specs, prompts, args.concurrency, progress=not args.no_progress)
    )
    summary = result.summary(args.slo_ttft, args.slo_tpot)
    print(to_json(summary.to_dict()))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(to_json(run_record(config, result, summary, target=args.target)))


if __name__ == "__main__":
    main()

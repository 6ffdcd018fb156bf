"""`make bench-overhead`: the fronts' own cost, as served throughput over the engine's own on one workload.

The same seeded requests (greedy, EOS ignored, exactly their workload lengths) run at each concurrency
(`--streams`, default 1 and 32 in flight): first in-process through `Engine.submit` (no front, no
serialization), then through a `python -m service` subprocess over gRPC streaming (`GenerateStream`) and
over the OpenAI front's SSE (`/v1/completions`). Engine and server are built from the same flags
(`--server-arg`), so the model and batch settings are the same; they run one after the other, never at once.
Prints output tok/s for each and the served / engine ratio (issue 23's target at 32 streams: >= 0.90).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Self

from bench.loadgen import (
    Chunk,
    LoadResult,
    StreamError,
    add_workload_args,
    run_load,
    warm_up,
    workload_config,
)
from bench.report import environment, load_note, markdown_table
from bench.server import ServerProcess, free_port
from bench.serving.compare import RESULTS_DIR
from bench.serving.openai_client import OpenAIHttpClient
from bench.workload import RequestSpec, make_workload, prompt_ids
from engine.errors import EngineError
from engine.frontend.engine import Engine
from engine.request import GenerationRequest, SamplingParams, StoppingParams
from service.config import parse_config

ENGINE, GRPC, HTTP = "engine (in-process)", "gRPC GenerateStream", "OpenAI HTTP SSE"


class EngineClient:
    """The engine itself as a `StreamingClient` of the load generator: `Engine.submit`, no front."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    async def stream(self, ids: Sequence[int], output_len: int, timeout_s: float) -> AsyncIterator[Chunk]:
        request = GenerationRequest(
            list(ids), SamplingParams(), StoppingParams(max_new_tokens=output_len, ignore_eos=True)
        )
        try:
            async for event in self.engine.submit(request):
                yield Chunk(len(event.tokens))
        except EngineError as error:
            raise StreamError(str(error)) from error


def run_all(
    client: EngineClient | str | OpenAIHttpClient,
    specs: Sequence[RequestSpec],
    prompts: list[list[int]],
    streams: Sequence[int],
    progress: bool,
    desc: str,
) -> dict[int, LoadResult]:
    """The workload once per concurrency in `streams`, after a warm-up; a failed request fails the bench."""
    asyncio.run(warm_up(client, prompts[0]))
    results = {}
    for n in streams:
        result = asyncio.run(run_load(client, specs, prompts, n, progress=progress, desc=f"{desc} x{n}"))
        errors = [t.error for t in result.traces if not t.ok]
        assert not errors, f"{desc} at {n} streams: {len(errors)} requests failed, first: {errors[0]}"
        results[n] = result
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.overhead",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_workload_args(parser, num_requests=32, prompt_len=64, output_len=64)
    parser.add_argument(
        "--streams", default="1,32", help="comma-separated concurrencies (requests in flight)"
    )
    parser.add_argument("--fronts", default="grpc,http", help="comma-separated fronts among grpc, http")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="flag for both the engine and the server (repeat; e.g. --server-arg=--max-batch-size=16)",
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the server's log goes")
    return parser


def served(
    fronts: Sequence[str],
    server_args: list[str],
    specs: Sequence[RequestSpec],
    prompts: list[list[int]],
    streams: Sequence[int],
    progress: bool,
    log_path: Path,
) -> dict[str, dict[int, LoadResult]]:
    """The workload through each front of one server process."""
    http_port = free_port()
    results = {}
    with ServerProcess(
        ["--host", "127.0.0.1", "--http-port", str(http_port), *server_args], log_path
    ) as server:
        if "grpc" in fronts:
            results[GRPC] = run_all(server.target, specs, prompts, streams, progress, "grpc")
        if "http" in fronts:
            client = OpenAIHttpClient(f"http://127.0.0.1:{http_port}")
            results[HTTP] = run_all(client, specs, prompts, streams, progress, "http")
    return results


def report(results: dict[str, dict[int, LoadResult]], streams: Sequence[int]) -> str:
    """One row per path and concurrency: output tok/s and its ratio to the engine's own."""
    rows = []
    for n in streams:
        own = results[ENGINE][n].summary().output_throughput
        for name, by_streams in results.items():
            throughput = by_streams[n].summary().output_throughput
            rows.append([n, name, throughput, f"{throughput / own:.2f}"])
    return markdown_table(["streams", "path", "output tok/s", "served / engine"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    streams = [int(s) for s in args.streams.split(",")]
    config = workload_config(args)
    specs = make_workload(config)
    progress = not args.no_progress

    engine = Engine(parse_config(args.server_arg).engine)  # exactly the server's engine for these flags
    engine.start()
    try:
        encode = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        prompts = [prompt_ids(s, encode) for s in specs]
        results = {ENGINE: run_all(EngineClient(engine), specs, prompts, streams, progress, "engine")}
    finally:
        engine.shutdown()
    log_path = args.output_dir / "overhead-server.log"
    results |= served(args.fronts.split(","), args.server_arg, specs, prompts, streams, progress, log_path)

    print(
        f"\n{config.num_requests} requests, prompt ~{config.prompt_len_mean:g} / output "
        f"~{config.output_len_mean:g} tokens (lognormal sigma {config.len_sigma:g}, seed {config.seed}), "
        f"greedy, EOS ignored; server flags: {' '.join(args.server_arg) or '(defaults)'}\n"
    )
    print(report(results, streams))
    print(load_note(environment(load_before)))


if __name__ == "__main__":
    main()

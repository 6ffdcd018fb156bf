"""`make bench-overhead`: the fronts' own cost, as served throughput over the engine's own on one workload.

The same seeded requests (greedy, EOS ignored, exactly their workload lengths) run at each concurrency
(`--streams`, default 1 and 32 in flight): first in-process through `Engine.submit` (no front, no
serialization), then through a `python -m service` subprocess over gRPC streaming (`GenerateStream`) and
over the OpenAI front's SSE (`/v1/completions`). Engine and server are built from the same flags
(`--server-arg`), so the model and batch settings are the same; they run one after the other, never at once.
Prints output tok/s for each and the served / engine ratio (issue 23's target at 32 streams: >= 0.90).
A failed request fails the run: the command then names it and exits 1. `--quick` checks the setup in
seconds (a few short requests at 1 and 4 streams).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Self

from bench.loadgen import Chunk, LoadResult, StreamError, add_workload_args, run_load, workload_config
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
QUICK = {"num_requests": 4, "prompt_len": 16, "output_len": 8, "streams": "1,4"}


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


class BenchFailed(Exception):
    """A step of the run failed; the message says which, and why."""


def measured(
    client: EngineClient | str | OpenAIHttpClient,
    specs: Sequence[RequestSpec],
    prompts: Sequence[Sequence[int]],
    streams: int,
    progress: bool,
    desc: str,
) -> LoadResult:
    """`specs` sent with at most `streams` in flight; `BenchFailed` if any request failed."""
    result = asyncio.run(run_load(client, specs, prompts, streams, progress=progress, desc=desc))
    failed = [t for t in result.traces if not t.ok]
    if failed:
        raise BenchFailed(
            f"{desc}: {len(failed)} of {len(specs)} requests failed, the first: {failed[0].error}"
        )
    return result


def run_all(
    client: EngineClient | str | OpenAIHttpClient,
    specs: Sequence[RequestSpec],
    prompts: list[list[int]],
    streams: Sequence[int],
    progress: bool,
    name: str,
) -> dict[int, LoadResult]:
    """The workload once per concurrency in `streams`, after two short requests that pay one-time costs."""
    warm_up = [RequestSpec(i, 0.0, len(prompts[0]), 4, "") for i in range(2)]
    measured(client, warm_up, [prompts[0]] * 2, 0, False, f"{name} warm-up")
    return {n: measured(client, specs, prompts, n, progress, f"{name} at {n} streams") for n in streams}


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
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a few short requests (defaults {QUICK}; flags given win): checks the setup",
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


def in_process(
    server_args: list[str], specs: Sequence[RequestSpec], streams: Sequence[int], progress: bool
) -> tuple[list[list[int]], dict[str, dict[int, LoadResult]]]:
    """The workload's prompts as token ids, and the workload through the engine the server would build."""
    engine = Engine(parse_config(server_args).engine)
    engine.start()
    try:
        encode = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        prompts = [prompt_ids(s, encode) for s in specs]
        return prompts, {ENGINE: run_all(EngineClient(engine), specs, prompts, streams, progress, ENGINE)}
    finally:
        engine.shutdown()


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
            results[GRPC] = run_all(server.target, specs, prompts, streams, progress, GRPC)
        if "http" in fronts:
            client = OpenAIHttpClient(f"http://127.0.0.1:{http_port}")
            results[HTTP] = run_all(client, specs, prompts, streams, progress, HTTP)
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # its values as the defaults, so that flags given still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; 0 when every request of every step succeeded, else 1 (the failure on stderr)."""
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    streams = [int(s) for s in args.streams.split(",")]
    config = workload_config(args)
    specs = make_workload(config)
    progress = not args.no_progress
    try:
        prompts, results = in_process(args.server_arg, specs, streams, progress)
        log_path = args.output_dir / "overhead-server.log"
        fronts = args.fronts.split(",")
        results |= served(fronts, args.server_arg, specs, prompts, streams, progress, log_path)
    except BenchFailed as failure:
        print(f"bench-overhead failed: {failure}", file=sys.stderr)
        return 1
    print(
        f"\n{config.num_requests} requests, prompt ~{config.prompt_len_mean:g} / output "
        f"~{config.output_len_mean:g} tokens (lognormal sigma {config.len_sigma:g}, seed {config.seed}), "
        f"greedy, EOS ignored; server flags: {' '.join(args.server_arg) or '(defaults)'}\n"
    )
    print(report(results, streams))
    print(load_note(environment(load_before)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench-prefix`: what prefix caching buys when requests share a long system prompt.

Starts a server with prefix caching on, then one with `--no-prefix-caching`, and sends each the same
requests: one shared system prompt (~500 tokens by default) followed by a different question per request.
Before measuring, each server answers the system prompt once (as a deployed server has: its system prompt
is warm), so with the cache on every request prefills only its question. Prints TTFT and throughput side
by side; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from bench.loadgen import run_load, run_record, warm_up
from bench.metrics import Summary
from bench.report import environment, load_note, markdown_table, to_json
from bench.server import ServerProcess
from bench.workload import RequestSpec, WorkloadConfig, poisson_arrivals, prompt_text
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

RESULTS_DIR = Path(__file__).parents[1] / "results"
SETUPS = {"cache on": (), "cache off": ("--no-prefix-caching",)}


def shared_prefix_specs(
    num_requests: int, system_len: int, question_len: int, output_len: int, rate: float, seed: int
) -> tuple[str, list[RequestSpec]]:
    """The system prompt's text, and one request per question (`prompt_text` holds the question only)."""
    rng = np.random.default_rng(seed)
    system = prompt_text(rng, system_len)
    arrivals = poisson_arrivals(rng, num_requests, rate)
    specs = [
        RequestSpec(i, arrivals[i], system_len + question_len, output_len, prompt_text(rng, question_len))
        for i in range(num_requests)
    ]
    return system, specs


async def shared_prefix_prompts(
    target: str, system: str, specs: Sequence[RequestSpec], system_len: int
) -> list[list[int]]:
    """Each request's token ids: the system prompt cut to `system_len` tokens, then its own question."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationServiceStub(channel)

        async def encode(text: str, length: int) -> list[int]:
            ids = list((await stub.Tokenize(pb.TokenizeRequest(text=text), timeout=60)).ids)[:length]
            assert len(ids) == length, f"{text[:40]!r}... tokenized to {len(ids)} < {length} tokens"
            return ids

        prefix = await encode(system, system_len)
        question_len = specs[0].prompt_len - system_len
        questions = await asyncio.gather(*(encode(" " + s.prompt_text, question_len) for s in specs))
        return [prefix + question for question in questions]


def run_setup(
    name: str, server_args: Sequence[str], specs: list[RequestSpec], prompts: list[list[int]] | None,
    system_len: int, system: str, log_dir: Path, progress: bool,
) -> tuple[list[list[int]], Summary, dict]:  # fmt: skip
    """Start one server, warm its system prompt, replay the requests, stop it."""
    args = ["--host", "127.0.0.1", *SETUPS[name], *server_args]
    with ServerProcess(args, log_dir / f"server-{name.replace(' ', '-')}.log") as server:
        if prompts is None:
            prompts = asyncio.run(shared_prefix_prompts(server.target, system, specs, system_len))
        asyncio.run(warm_up(server.target, prompts[0][:system_len] + [prompts[0][-1]], num_requests=1))
        result = asyncio.run(run_load(server.target, specs, prompts, progress=progress, desc=name))
    summary = result.summary()
    return prompts, summary, run_record(_config(specs), result, summary, server_args=list(SETUPS[name]))


def _config(specs: list[RequestSpec]) -> WorkloadConfig:
    """The workload as the loader's config records it (fixed lengths: no spread)."""
    last = specs[-1]
    rate = math.inf if last.arrival_s == 0 else len(specs) / last.arrival_s
    return WorkloadConfig(len(specs), rate, specs[0].prompt_len, specs[0].output_len, 0.0)


COLUMNS = {
    "req/s": lambda s: s.request_throughput,
    "prompt+output tok/s": lambda s: s.total_token_throughput,
    "TTFT mean s": lambda s: s.mean_ttft_s,
    "TTFT p50 s": lambda s: s.ttft_s["p50"],
    "TTFT p99 s": lambda s: s.ttft_s["p99"],
    "E2E p50 s": lambda s: s.e2e_s["p50"],
}


def results_table(summaries: dict[str, Summary]) -> str:
    rows = [[name, *(f(s) for f in COLUMNS.values()), s.num_errors] for name, s in summaries.items()]
    table = markdown_table(["prefix caching", *COLUMNS, "errors"], rows)
    on, off = summaries.get("cache on"), summaries.get("cache off")
    if on is None or off is None or not on.mean_ttft_s:
        return table
    speedup = off.mean_ttft_s / on.mean_ttft_s
    throughput = on.request_throughput / off.request_throughput
    return table + f"\n\ncache on vs off: mean TTFT {speedup:.2f}x lower, {throughput:.2f}x the req/s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.shared_prefix",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--num-requests", type=int, default=32, help="requests, each with its own question")
    parser.add_argument("--system-len", type=int, default=500, help="tokens of the shared system prompt")
    parser.add_argument("--question-len", type=int, default=24, help="tokens of each request's question")
    parser.add_argument("--output-len", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson req/s; inf = at once")
    parser.add_argument("--seed", type=int, default=0, help="prompt text and arrival seed")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated among the defaults")
    parser.add_argument("--model", default=None, help="local model directory; unset = the default SmolLM2")
    parser.add_argument(
        "--server-arg", action="append", default=[], metavar="FLAG", help="extra flag for every server"
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where JSON and logs go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    server_args = [*args.server_arg, *(["--model", args.model] if args.model else [])]
    system, specs = shared_prefix_specs(
        args.num_requests, args.system_len, args.question_len, args.output_len, args.request_rate, args.seed
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = args.output_dir / f"shared_prefix-{stamp}-logs"
    prompts, summaries, records = None, {}, {}
    for name in args.setups.split(","):
        prompts, summaries[name], records[name] = run_setup(
            name, server_args, specs, prompts, args.system_len, system, log_dir, not args.no_progress
        )
    print(
        f"\n{args.num_requests} requests at {args.request_rate:g} req/s sharing a {args.system_len}-token"
        f" system prompt, each with its own {args.question_len}-token question, {args.output_len} output"
        f" tokens; the system prompt answered once before measuring\n"
    )
    print(results_table(summaries), end="\n\n")
    env = environment(load_before)
    print(load_note(env))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"shared_prefix-{stamp}.json"
    path.write_text(to_json({"environment": env, "runs": records}))
    print(f"results: {path}")


if __name__ == "__main__":
    main()

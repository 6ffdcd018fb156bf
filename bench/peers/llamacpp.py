"""`make bench-llamacpp`: textgen against llama.cpp's server on the same model, workloads and load generator.

Builds `llama-server` once (bench/peers/llamacpp_build.py), then starts textgen (`python -m service`, default
flags) and llama.cpp (`llama-server -np 32 -t 2 -c 65536`) on the same GGUF file, on loopback, one after the
other, never both at once, and replays the same seeded workloads through the project's load generator
against each: one request at a time, 32 at once, Poisson arrivals at 2 and 4 req/s, and ~1,000-token
prompts. The same prompt token ids go to both, greedy, EOS ignored. Prints one table with both systems and
the ratios; writes JSON and the markdown table to bench/results/.

The model is the GGUF textgen's default model comes from, or with `--shape` (or `--config`) a random-weight
model of a real model's shape written once as a Q4_1 GGUF (bench/random_gguf.py), which textgen serves
with `--model file.gguf`: the same bytes on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.loadgen import LoadResult, StreamingClient, run_load, run_record, tokenize_prompts, warm_up
from bench.metrics import Summary
from bench.peers import llamacpp_client
from bench.peers.llamacpp_build import DEFAULT_VERSION, ensure_server
from bench.peers.llamacpp_server import LlamaServerProcess
from bench.random_gguf import GGUF_SHAPES, shape_gguf
from bench.random_model import load_shape
from bench.report import environment, fmt, load_note, markdown_table, to_json
from bench.server import ServerProcess
from bench.workload import RequestSpec, WorkloadConfig, make_workload
from engine.execution.loader import default_gguf_path

RESULTS_DIR = Path(__file__).parents[1] / "results"
TEXTGEN, LLAMACPP = "textgen", "llama.cpp"
SYSTEMS = {"textgen": TEXTGEN, "llamacpp": LLAMACPP}

METRICS: dict[str, Callable[[Summary], float | None]] = {
    "output tok/s": lambda s: s.output_throughput,
    "TTFT p50 s": lambda s: s.ttft_s["p50"],
    "TTFT p99 s": lambda s: s.ttft_s["p99"],
    "TPOT p50 s": lambda s: s.tpot_s["p50"],
    "TPOT p99 s": lambda s: s.tpot_s["p99"],
    "prompt tokens": lambda s: s.prompt_tokens,  # as each server counted them: the prompts' check
    "errors": lambda s: s.num_errors,
}
LOAD_METRICS = ("output tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 s", "TPOT p99 s", "prompt tokens")


@dataclass(slots=True, frozen=True)
class Scenario:
    """One workload of the comparison: its requests, how many may be in flight, and the metrics shown."""

    name: str
    config: WorkloadConfig
    concurrency: int  # 0: no limit
    metrics: tuple[str, ...]


def scenarios(quick: bool, seed: int) -> list[Scenario]:
    """The comparison's workloads; `quick` keeps their shapes with fewer and shorter requests."""
    n_single, single_out, n_burst, n_poisson, n_long = (2, 32, 8, 16, 2) if quick else (4, 128, 32, 64, 4)

    def load(num_requests: int, rate: float) -> WorkloadConfig:
        return WorkloadConfig(num_requests, rate, 64.0, 64.0, 0.5, seed=seed)

    return [
        Scenario(
            f"single stream ({n_single} x {single_out} tokens, one at a time)",
            WorkloadConfig(n_single, math.inf, 64.0, float(single_out), 0.0, seed=seed),
            1,
            ("output tok/s", "TTFT p50 s", "TPOT p50 s", "prompt tokens"),
        ),
        Scenario(f"{n_burst} at once (~64 in / ~64 out)", load(n_burst, math.inf), 0, LOAD_METRICS),
        Scenario(f"Poisson 2 req/s ({n_poisson} requests)", load(n_poisson, 2.0), 0, LOAD_METRICS),
        Scenario(f"Poisson 4 req/s ({n_poisson} requests)", load(n_poisson, 4.0), 0, LOAD_METRICS),
        Scenario(
            f"~1,000-token prompt ({n_long}, one at a time, 8 out)",
            WorkloadConfig(n_long, math.inf, 1000.0, 8.0, 0.0, seed=seed),
            1,
            ("TTFT p50 s", "TTFT p99 s", "prompt tokens"),
        ),
    ]


@dataclass(slots=True)
class Runs:
    """The workloads of one comparison, and their prompt ids: tokenized by the first server, then reused."""

    scenarios: list[Scenario]
    specs: list[list[RequestSpec]]
    progress: bool
    prompts: list[list[list[int]]] | None = None

    def replay(self, client: str | StreamingClient, system: str) -> list[LoadResult]:
        """Warm the server up, then replay each scenario in turn against it."""
        assert self.prompts is not None, "tokenize the prompts first"
        asyncio.run(warm_up(client, self.prompts[0][0]))
        return [
            asyncio.run(
                run_load(client, specs, ids, s.concurrency, progress=self.progress, desc=f"{system} {s.name}")
            )
            for s, specs, ids in zip(self.scenarios, self.specs, self.prompts, strict=True)
        ]


def run_textgen(runs: Runs, server_args: Sequence[str], log_dir: Path) -> tuple[list[LoadResult], dict]:
    """Start `python -m service` on loopback, replay every scenario against it, stop it."""
    # Prefix caching off, as llama.cpp's cache_prompt: both compute every prompt in full.
    args = ["--host", "127.0.0.1", "--no-prefix-caching", *server_args]
    record: dict = {
        "command": ["python", "-m", "service", *args],
        "load_average_at_start": os.getloadavg()[0],
    }
    start = time.monotonic()
    with ServerProcess(args, log_dir / "textgen.log") as server:
        record["startup_s"] = round(time.monotonic() - start, 1)
        print(f"textgen serving after {record['startup_s']} s", flush=True)
        if runs.prompts is None:
            runs.prompts = [asyncio.run(tokenize_prompts(server.target, specs)) for specs in runs.specs]
        return runs.replay(server.target, TEXTGEN), record


def run_llamacpp(runs: Runs, binary: Path, gguf: Path, log_dir: Path) -> tuple[list[LoadResult], dict]:
    """Start `llama-server` on loopback, replay every scenario against it, stop it.

    With prompts from textgen, the record says how llama.cpp's own tokenizer splits the same texts.
    """
    server = LlamaServerProcess(binary, gguf, log_dir / "llama-server.log")
    record: dict = {"command": server.command, "load_average_at_start": os.getloadavg()[0]}
    with server:
        if runs.prompts is None:
            runs.prompts = [llamacpp_client.tokenize_prompts(server.base_url, specs) for specs in runs.specs]
        else:
            record["tokenizers"] = tokenizer_agreement(
                server.base_url,
                [s for specs in runs.specs for s in specs],
                [p for ps in runs.prompts for p in ps],
            )
        return runs.replay(server.client(), LLAMACPP), record


def tokenizer_agreement(
    base_url: str, specs: Sequence[RequestSpec], prompts: Sequence[Sequence[int]]
) -> dict:
    """How llama.cpp's tokenizer splits the prompt texts whose ids (textgen's) both servers get."""
    theirs = [llamacpp_client.tokenize(base_url, s.prompt_text)[: s.prompt_len] for s in specs]
    return {
        "prompts": len(specs),
        "identical_ids": sum(a == list(b) for a, b in zip(theirs, prompts, strict=True)),
        "tokens_textgen": sum(map(len, prompts)),
        "tokens_llamacpp": sum(map(len, theirs)),
    }


def ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else "-"


def comparison_table(chosen: Sequence[Scenario], summaries: dict[str, list[Summary]]) -> str:
    """One row per workload and metric: each system's value, and textgen / llama.cpp when both ran."""
    both = {TEXTGEN, LLAMACPP} <= summaries.keys()
    rows = []
    for i, scenario in enumerate(chosen):
        failed = any(s[i].num_errors for s in summaries.values())
        for metric in [*scenario.metrics, *(["errors"] if failed else [])]:
            value = METRICS[metric]
            cells = [fmt(value(s[i]), 3 if metric.endswith(" s") else 2) for s in summaries.values()]
            if both:
                cells.append(ratio(value(summaries[TEXTGEN][i]), value(summaries[LLAMACPP][i])))
            rows.append([scenario.name, metric, *cells])
    return markdown_table(
        ["workload", "metric", *summaries, *(["textgen / llama.cpp"] if both else [])], rows
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers.llamacpp",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests: checks the setup")
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--shape", choices=GGUF_SHAPES, help="a random model of this real shape, as a Q4_1 GGUF, not SmolLM2"
    )
    model.add_argument(
        "--config", type=Path, help="a random model of this config.json's shape, as a Q4_1 GGUF"
    )
    parser.add_argument("--weights-seed", type=int, default=0, help="the random weights' seed")
    parser.add_argument("--seed", type=int, default=0, help="workload seed: arrivals, lengths, prompts")
    parser.add_argument("--systems", default="textgen,llamacpp", help="which servers to run, in this order")
    parser.add_argument("--llamacpp-version", default=DEFAULT_VERSION, help="llama-cpp-python sdist to build")
    parser.add_argument("--build-jobs", type=int, default=2, help="parallel compile jobs for the first build")
    parser.add_argument(
        "--server-arg", action="append", default=[], metavar="FLAG", help="extra flag for textgen (repeat)"
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where JSON, tables and logs go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def model_gguf(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The GGUF both servers run, and the flags that point textgen at it (none for the default model)."""
    if args.shape is None and args.config is None:
        return default_gguf_path(), []
    gguf = shape_gguf(args.shape or load_shape(args.config), args.weights_seed)
    return gguf, ["--model", str(gguf)]


def notes(gguf: Path, records: dict[str, dict], env: dict) -> list[str]:
    """What a reader of the table needs to know: the model, the request settings, the ratios, the load."""
    lines = [
        f"model: {gguf.name} (llama.cpp runs its blocks as they are; textgen its default flags)",
        *([f"textgen served after {records[TEXTGEN]['startup_s']} s"] if TEXTGEN in records else []),
        "the same prompt token ids to both, greedy, EOS ignored; no prefix cache on either (no cache_prompt)",
        "textgen / llama.cpp: above 1x textgen is faster in output tok/s, slower in TTFT and TPOT",
        "load average at each server's start: "
        + ", ".join(f"{name} {r['load_average_at_start']:.1f}" for name, r in records.items()),
    ]
    if tokens := records.get(LLAMACPP, {}).get("tokenizers"):
        lines.append(
            f"llama.cpp's tokenizer on the same prompt texts: identical ids for {tokens['identical_ids']}"
            f" of {tokens['prompts']} prompts ({tokens['tokens_llamacpp']} tokens, textgen's"
            f" {tokens['tokens_textgen']})"
        )
    return [*lines, load_note(env)]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM exits through the with-blocks, so a server this run started is stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    systems = [SYSTEMS[name] for name in args.systems.split(",")]
    binary = ensure_server(args.llamacpp_version, args.build_jobs) if LLAMACPP in systems else None
    gguf, model_args = model_gguf(args)
    chosen = scenarios(args.quick, args.seed)
    runs = Runs(chosen, [make_workload(s.config) for s in chosen], progress=not args.no_progress)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = args.output_dir / f"peer_llamacpp-{stamp}-logs"
    load_before = os.getloadavg()[0]
    print(load_note(environment(load_before)))

    summaries: dict[str, list[Summary]] = {}
    records: dict[str, dict] = {}
    for system in systems:
        if system == TEXTGEN:
            results, records[system] = run_textgen(runs, [*model_args, *args.server_arg], log_dir)
        else:
            assert binary is not None
            results, records[system] = run_llamacpp(runs, binary, gguf, log_dir)
        summaries[system] = [r.summary() for r in results]
        records[system]["runs"] = {
            s.name: run_record(s.config, r, summary, concurrency=s.concurrency)
            for s, r, summary in zip(chosen, results, summaries[system], strict=True)
        }

    env = environment(load_before)
    text = (
        comparison_table(chosen, summaries) + "\n\n" + "".join(f"- {n}\n" for n in notes(gguf, records, env))
    )
    print("\n" + text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"peer_llamacpp-{stamp}"
    path.with_suffix(".md").write_text(text)
    record = {
        "quick": args.quick,
        "environment": env,
        "gguf": str(gguf),
        "shape": args.shape or (str(args.config) if args.config else None),
        "llamacpp_build": binary.parent.name if binary else None,
        "scenarios": [
            {"name": s.name, "workload": asdict(s.config), "concurrency": s.concurrency} for s in chosen
        ],
        "systems": records,
    }
    path.with_suffix(".json").write_text(to_json(record))
    print(f"results: {path}.json, {path}.md")


if __name__ == "__main__":
    main()

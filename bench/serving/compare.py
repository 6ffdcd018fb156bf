"""`make bench`: what continuous batching buys, measured online against its baselines in one run.

Starts each server configuration in turn (continuous batching, sequential, static batching), replays the
same seeded workload against each over gRPC, then runs the same requests offline through transformers'
`generate` in static batches. Prints a results table and a table of ratios; writes JSON to bench/results/.
The `continuous-http` setup is the default server driven through its OpenAI-compatible HTTP front:
`--setups continuous,continuous-http --no-offline` measures that front's overhead against gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.loadgen import (
    LoadResult,
    add_workload_args,
    run_load,
    run_record,
    tokenize_prompts,
    warm_up,
    workload_config,
)
from bench.metrics import Summary
from bench.peers import hf_generate
from bench.report import environment, load_note, markdown_table, to_json
from bench.server import ServerProcess, free_port
from bench.serving.openai_client import OpenAIHttpClient
from bench.workload import RequestSpec, make_workload

RESULTS_DIR = Path(__file__).parents[1] / "results"
OFFLINE = "transformers generate"


@dataclass(slots=True, frozen=True)
class ServerSetup:
    """A named server configuration: the flags given to `python -m service`, and the front the load uses."""

    name: str
    args: tuple[str, ...]
    http: bool = False  # the OpenAI-compatible HTTP front (`/v1/completions`) instead of gRPC


SETUPS = {
    "continuous": ServerSetup("continuous", ()),
    "sequential": ServerSetup("sequential", ("--max-batch-size", "1")),
    "static": ServerSetup("static", ("--scheduling", "static")),
    "continuous-http": ServerSetup("continuous-http", (), http=True),
}


def run_setup(
    setup: ServerSetup,
    server_args: Sequence[str],
    runs: Sequence[tuple[str, Sequence[RequestSpec]]],
    prompts: list[list[int]] | None,
    concurrency: int,
    progress: bool,
    log_dir: Path,
) -> tuple[list[list[int]], list[LoadResult]]:
    """Start one server, replay each named workload against it in turn, stop it.

    Prompts are tokenized by the first server when `prompts` is None, then reused, so every setup
    sees the same token ids.
    """
    args = ["--host", "127.0.0.1", *setup.args, *server_args]
    http_port = free_port()
    if setup.http:
        args += ["--http-port", str(http_port)]
    with ServerProcess(args, log_dir / f"server-{setup.name}.log") as server:
        if prompts is None:
            prompts = asyncio.run(tokenize_prompts(server.target, runs[0][1]))

        def target() -> str | OpenAIHttpClient:
            return OpenAIHttpClient(f"http://127.0.0.1:{http_port}") if setup.http else server.target

        asyncio.run(warm_up(target(), prompts[0]))
        results = [
            asyncio.run(
                run_load(
                    target(),
                    specs,
                    prompts,
                    concurrency,
                    progress=progress,
                    desc=f"{setup.name} {label}",
                )
            )
            for label, specs in runs
        ]
    return prompts, results


def run_offline(
    specs: Sequence[RequestSpec],
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    model: str | None,
    dtype: str,
) -> hf_generate.OfflineResult:
    """The same requests through transformers `generate`, `batch_size` at a time, after a warm-up batch."""
    hf_model, tokenizer = hf_generate.load_hf_model(model, dtype=dtype)
    pad = hf_generate.pad_token_id_of(tokenizer)
    hf_generate.generate_static_batch(hf_model, [prompts[0]] * 2, 4, pad)
    return hf_generate.run_static_batches(hf_model, prompts, [s.output_len for s in specs], batch_size, pad)


# Columns of the tables: higher is better for throughputs, lower is better for latencies (seconds).
THROUGHPUTS: dict[str, Callable[[Summary], float | None]] = {
    "req/s": lambda s: s.request_throughput,
    "output tok/s": lambda s: s.output_throughput,
    "goodput req/s": lambda s: s.goodput,
}
LATENCIES: dict[str, Callable[[Summary], float | None]] = {
    "TTFT p50": lambda s: s.ttft_s["p50"],
    "TTFT p99": lambda s: s.ttft_s["p99"],
    "TPOT p50": lambda s: s.tpot_s["p50"],
    "TPOT p99": lambda s: s.tpot_s["p99"],
    "ITL p99": lambda s: s.itl_s["p99"],
}


def ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def offline_cells(offline: hf_generate.OfflineResult) -> dict[str, float]:
    return {"req/s": offline.request_throughput, "output tok/s": offline.output_throughput}


def results_table(summaries: dict[str, Summary], offline: hf_generate.OfflineResult | None) -> str:
    """One row per setup: throughputs, latency percentiles in seconds, and failed requests."""
    headers = ["server", *THROUGHPUTS, *(f"{name} s" for name in LATENCIES), "errors"]
    rows = [
        [name, *(f(s) for f in THROUGHPUTS.values()), *(f(s) for f in LATENCIES.values()), s.num_errors]
        for name, s in summaries.items()
    ]
    if offline is not None:
        cells = offline_cells(offline)
        rows.append([f"{OFFLINE} (offline)", *map(cells.get, THROUGHPUTS), *[None] * len(LATENCIES), 0])
    return markdown_table(headers, rows)


def ratio_table(summaries: dict[str, Summary], offline: hf_generate.OfflineResult | None) -> str:
    """Continuous batching against each baseline, every ratio oriented so that above 1x means better."""
    ours = summaries["continuous"]
    rows = [
        [
            name,
            *(ratio(f(ours), f(s)) for f in THROUGHPUTS.values()),
            *(ratio(f(s), f(ours)) for f in LATENCIES.values()),
        ]
        for name, s in summaries.items()
        if name != "continuous"
    ]
    if offline is not None:
        cells = offline_cells(offline)
        rows.append(
            [
                f"{OFFLINE} (offline)",
                *(ratio(f(ours), cells.get(name)) for name, f in THROUGHPUTS.items()),
                *["-"] * len(LATENCIES),
            ]
        )
    table = markdown_table(["continuous vs", *THROUGHPUTS, *LATENCIES], rows)
    return table + "\n(throughputs: continuous / baseline; latencies: baseline / continuous)"


def add_server_args(parser: argparse.ArgumentParser, default_setups: str) -> None:
    """The flags that pick the server setups to run and pass extra flags to every server."""
    parser.add_argument(
        "--setups", default=default_setups, help=f"comma-separated server setups among {', '.join(SETUPS)}"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for every server (repeat; e.g. --server-arg=--max-wait-ms=20)",
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where JSON, plots and logs go")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.compare",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_workload_args(
        parser, num_requests=32, request_rate=4.0, prompt_len=32, output_len=32, slo_ttft=2.0, slo_tpot=0.5
    )
    add_server_args(parser, default_setups="continuous,sequential,static")
    parser.add_argument(
        "--model", default=None, help="local model directory; unset = the default SmolLM2-135M"
    )
    parser.add_argument("--dtype", default="auto", help="dtype for every server and the offline baseline")
    parser.add_argument("--offline-batch-size", type=int, default=32, help="static batch size for generate")
    parser.add_argument("--no-offline", action="store_true", help="skip the transformers generate baseline")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    setups = [SETUPS[name] for name in args.setups.split(",")]
    server_args = [*args.server_arg, "--dtype", args.dtype, *(["--model", args.model] if args.model else [])]
    config = workload_config(args)
    specs = make_workload(config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = args.output_dir / f"serve_compare-{stamp}-logs"

    prompts, records, summaries = None, {}, {}
    for setup in setups:
        prompts, (result,) = run_setup(
            setup, server_args, [("", specs)], prompts, args.concurrency, not args.no_progress, log_dir
        )
        summaries[setup.name] = result.summary(args.slo_ttft, args.slo_tpot)
        records[setup.name] = run_record(config, result, summaries[setup.name], server_args=list(setup.args))
    offline = None
    if not args.no_offline:
        offline = run_offline(specs, prompts, args.offline_batch_size, args.model, args.dtype)
        records[OFFLINE] = {"batch_size": args.offline_batch_size, **offline.to_dict()}

    print(
        f"\n{config.num_requests} requests, Poisson {config.request_rate:g} req/s,"
        f" prompt ~{config.prompt_len_mean:g} / output ~{config.output_len_mean:g} tokens"
        f" (lognormal, seed {config.seed}),"
        f" SLOs: TTFT {args.slo_ttft} s, TPOT {args.slo_tpot} s\n"
    )
    print(results_table(summaries, offline), end="\n\n")
    if "continuous" in summaries and (len(summaries) > 1 or offline):
        print(ratio_table(summaries, offline), end="\n\n")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"serve_compare-{stamp}.json"
    env = environment(load_before)
    print(load_note(env))
    path.write_text(to_json({"workload": asdict(config), "environment": env, "runs": records}))
    print(f"results: {path}")


if __name__ == "__main__":
    main()

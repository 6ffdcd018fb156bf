"""`make bench-sweep`: each server setup against a range of request rates, with a plot.

Every setup gets one server process; each rate replays the same seeded requests (only the arrival
times change). Writes JSON and a PNG (throughput, TTFT and TPOT against offered load) to bench/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace

from bench.loadgen import add_workload_args, run_record, workload_config
from bench.report import environment, load_note, markdown_table, to_json
from bench.serving.compare import SETUPS, add_server_args, run_setup
from bench.serving.plot import plot_sweep
from bench.workload import make_workload


def parse_rates(text: str) -> list[float]:
    """'0.5,1,2,inf' -> [0.5, 1.0, 2.0, inf]."""
    rates = [math.inf if r.strip() == "inf" else float(r) for r in text.split(",")]
    assert all(r > 0 for r in rates), "rates must be positive"
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.sweep",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_workload_args(
        parser, num_requests=32, request_rate=None, prompt_len=32, output_len=32, slo_ttft=2.0, slo_tpot=0.5
    )
    parser.add_argument(
        "--request-rates",
        type=parse_rates,
        default=parse_rates("0.5,1,2,4,8,inf"),
        help="comma-separated Poisson rates in req/s; inf = all at once",
    )
    add_server_args(parser, default_setups="continuous,static,sequential")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    base = workload_config(args, request_rate=math.inf)
    configs = [replace(base, request_rate=rate) for rate in args.request_rates]
    runs = [
        (f"{rate:g} req/s", make_workload(c)) for rate, c in zip(args.request_rates, configs, strict=True)
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = args.output_dir / f"sweep-{stamp}-logs"

    prompts, points, records = None, {}, {}
    for name in args.setups.split(","):
        prompts, results = run_setup(
            SETUPS[name], args.server_arg, runs, prompts, args.concurrency, not args.no_progress, log_dir
        )
        summaries = [r.summary(args.slo_ttft, args.slo_tpot) for r in results]
        points[name] = [(c.request_rate, s.to_dict()) for c, s in zip(configs, summaries, strict=True)]
        records[name] = [run_record(c, r, s) for c, r, s in zip(configs, results, summaries, strict=True)]

    headers = [
        "server",
        "rate req/s",
        "output tok/s",
        "goodput req/s",
        "TTFT p50 s",
        "TTFT p99 s",
        "TPOT p50 s",
        "TPOT p99 s",
        "errors",
    ]
    rows = [
        [
            name,
            f"{rate:g}",
            s["output_throughput"],
            s["goodput"],
            s["ttft_s"]["p50"],
            s["ttft_s"]["p99"],
            s["tpot_s"]["p50"],
            s["tpot_s"]["p99"],
            s["num_errors"],
        ]
        for name, series in points.items()
        for rate, s in series
    ]
    print("\n" + markdown_table(headers, rows) + "\n")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    png = args.output_dir / f"sweep-{stamp}.png"
    title = (
        f"{base.num_requests} requests per rate, prompt ~{base.prompt_len_mean:g} / output "
        f"~{base.output_len_mean:g} tokens (lognormal, seed {base.seed})"
    )
    plot_sweep(points, png, title)
    path = args.output_dir / f"sweep-{stamp}.json"
    env = environment(load_before)
    print(load_note(env))
    path.write_text(
        to_json({"workload": asdict(base), "rates": args.request_rates, "environment": env, "runs": records})
    )
    print(f"results: {path}\nplot: {png}")


if __name__ == "__main__":
    main()

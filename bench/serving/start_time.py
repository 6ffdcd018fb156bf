"""Seconds from `python -m service` to gRPC health SERVING: what a (re)start costs, the caches warm or not.

    python -m bench.serving.start_time --shape llama-3.2-1b --runs 3
    python -m bench.serving.start_time --model path/to/model.gguf --server-arg=--metrics-port=0

Each run starts a fresh server (one at a time: a 1B shape holds several GB), waits for SERVING (the model
loaded and its warm-up step run; health is polled every half second) and stops it. A run after the first
finds what the first cached (the converted checkpoint, q4_1 blocks, float16 layouts, kernels). Prints each
run's seconds and the machine's load: on a busy machine the numbers measure the other work too.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.random_gguf import GGUF_SHAPES, shape_gguf
from bench.report import environment, load_note
from bench.server import ServerProcess


def start_seconds(server_args: list[str], log_path: Path) -> float:
    """One server's seconds from its launch to SERVING (it is stopped after)."""
    started = time.perf_counter()
    with ServerProcess(server_args, log_path):
        return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving.start_time", description=__doc__.split("\n")[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", help="what `--model` the server gets (default: its own default)")
    group.add_argument("--shape", choices=GGUF_SHAPES, help="a random model of this shape, as a Q4_1 GGUF")
    parser.add_argument("--runs", type=int, default=3, help="servers started one after the other")
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeatable)")
    args = parser.parse_args(argv)
    model = str(shape_gguf(args.shape)) if args.shape else args.model
    server_args = (["--model", model] if model else []) + args.server_arg
    load_before = os.getloadavg()[0]
    seconds = []
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            seconds.append(start_seconds(server_args, Path(logs) / f"server-{run}.log"))
            print(f"run {run + 1}: SERVING after {seconds[-1]:.1f} s", flush=True)
    print(load_note(environment(load_before)))
    return seconds


if __name__ == "__main__":
    main()

"""Where an engine step's time goes: `make bench-engine`'s workload with torch.profiler on the loop thread.

Prints the wall time, the time of prefill and decode steps (decode by batch size), and the torch ops
that took the most time. The profiler costs some time of its own: compare shares, not totals, with
`make bench-engine`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

from torch.profiler import profile

from bench.workload import WorkloadConfig, make_workload, prompt_ids
from engine.core.observer import EngineObserver
from engine.frontend.engine import Engine, EngineConfig
from engine.request import StoppingParams


class StepTimes(EngineObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[bool, int, float]] = []  # (is prefill, sequences, seconds)

    def step_finished(self, step, start, end, kv_used, kv_total) -> None:
        self.steps.append((step.is_prefill, len(step.rows), end - start))


class ProfiledEngine(Engine):
    """The engine with torch.profiler around its loop (the profiler records the thread that starts it)."""

    profiler: profile | None = None

    def _loop(self) -> None:
        with profile() as self.profiler:
            super()._loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=float, default=64)
    parser.add_argument("--output-len", type=float, default=64)
    parser.add_argument("--rows", type=int, default=20, help="torch ops to list")
    args = parser.parse_args()
    specs = make_workload(
        WorkloadConfig(
            num_requests=args.num_requests,
            request_rate=math.inf,
            prompt_len_mean=args.prompt_len,
            output_len_mean=args.output_len,
            seed=0,
        )
    )
    times = StepTimes()
    engine = ProfiledEngine(EngineConfig(), observer=times)
    engine.start()
    encode = engine.tokenizer.encode
    prompts = [prompt_ids(s, lambda text: encode(text, add_special_tokens=False)) for s in specs]
    stopping = [StoppingParams(max_new_tokens=s.output_len, ignore_eos=True) for s in specs]
    times.steps.clear()
    start = time.perf_counter()
    engine.generate(prompts, stopping=stopping)
    wall = time.perf_counter() - start
    engine.shutdown()

    output_tokens = sum(s.output_len for s in specs)
    print(f"wall {wall:.2f} s for {output_tokens} output tokens ({output_tokens / wall:.1f} tok/s, profiled)")
    prefill = [s for s in times.steps if s[0]]
    print(f"prefill: {len(prefill)} steps, {sum(s[2] for s in prefill):.2f} s")
    by_batch: dict[int, list[float]] = defaultdict(list)
    for is_prefill, size, seconds in times.steps:
        if not is_prefill:
            by_batch[size].append(seconds)
    decode_total = sum(sum(v) for v in by_batch.values())
    print(f"decode: {sum(map(len, by_batch.values()))} steps, {decode_total:.2f} s")
    for size in sorted(by_batch):
        steps = by_batch[size]
        print(f"  batch {size:3d}: {len(steps):3d} steps, {1000 * sum(steps) / len(steps):6.1f} ms each")
    averages = engine.profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) / 1e6
    print(f"\ntorch ops on the loop thread: {total:.2f} s of self time (the rest is Python and C kernels)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

"""Which dtype should the CPU default to? Times decode and prefill per dtype, and checks greedy outputs.

For each dtype: one decode step at `--batch-size` sequences of `--context` tokens, a prefill of `--context`
tokens, and how many of the first `--new-tokens` greedy tokens of each test prompt agree with float32.
"""

from __future__ import annotations

import argparse
import time

from engine.engine import Engine, EngineConfig
from engine.model_runner import StepInput
from engine.request import StoppingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three primary colors:",
    "Translate to French: I like apples.",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "Explain why the sky is blue in one sentence.",
]


def time_steps(engine: Engine, batch_size: int, context: int, repeats: int) -> tuple[float, float]:
    """(seconds per decode step, prefill tokens per second), run directly on the model runner."""
    runner = engine.model_runner
    tables = []
    for _ in range(batch_size):
        table: list[int] = []
        assert runner.allocator.allocate(table, context + 1)
        tables.append(table)
    prompt = list(range(1000, 1000 + context))
    start = time.perf_counter()
    for table in tables:
        runner.run([StepInput(prompt, 0, table)], is_prefill=True)
    prefill_rate = batch_size * context / (time.perf_counter() - start)
    decode = [StepInput([5], context, table) for table in tables]
    runner.run(decode, is_prefill=False)
    start = time.perf_counter()
    for _ in range(repeats):
        runner.run(decode, is_prefill=False)
    step = (time.perf_counter() - start) / repeats
    for table in tables:
        runner.allocator.free(table)
    return step, prefill_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reference = None
    print(
        f"| dtype | decode step, batch {args.batch_size} (ms) | prefill (tok/s) | greedy tokens as float32 |"
    )
    print("|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        engine = Engine(EngineConfig(device="cpu", dtype=dtype))
        engine.start()
        step, prefill = time_steps(engine, args.batch_size, args.context, args.repeats)
        stopping = StoppingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        outputs = [r.token_ids for r in engine.generate(PROMPTS, stopping=stopping)]
        engine.shutdown()
        reference = reference or outputs
        agree = [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
            for x, y in zip(reference, outputs, strict=True)
        ]
        print(f"| {dtype} | {1000 * step:.0f} | {prefill:.0f} | {agree} |")


if __name__ == "__main__":
    main()

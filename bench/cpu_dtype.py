"""Which dtype, weight format and attention backend should the CPU default to?

For each configuration: the median of a few decode steps at batch 1 and at `--batch-size` sequences of
`--context` tokens, prefill throughput (`--batch-size` prompts of `--context` tokens in one step), how
many of the first `--new-tokens` greedy tokens of each test prompt agree with the first configuration's,
and the perplexity of a fixed text (bench/data/perplexity.txt, read token by token through decode steps).
Everything runs on this thread, through the model runner (the engine's loop thread does the same work).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from engine.model_runner import ModelRunner, StepInput

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

# (dtype, weight format, attention backend): the first is the reference for greedy agreement.
CONFIGS = {
    "float32-native-torch": ("float32", "native", "torch"),
    "float32-fp16packed-cpu": ("float32", "fp16-packed", "cpu"),
    "float32-q4_1-cpu": ("float32", "q4_1", "cpu"),
    "bfloat16-native-torch": ("bfloat16", "native", "torch"),
}


def _tables(runner: ModelRunner, count: int, tokens: int) -> list[list[int]]:
    tables = []
    for _ in range(count):
        table: list[int] = []
        assert runner.allocator.allocate(table, tokens)
        tables.append(table)
    return tables


def decode_step_s(runner: ModelRunner, batch_size: int, context: int, repeats: int) -> float:
    """Median seconds of one decode step of `batch_size` sequences with `context` cached tokens."""
    tables = _tables(runner, batch_size, context + 1)
    decode = [StepInput([5], context, table) for table in tables]
    runner.run(decode, is_prefill=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(decode, is_prefill=False)
        times.append(time.perf_counter() - start)
    for table in tables:
        runner.allocator.free(table)
    return statistics.median(times)


def prefill_tokens_per_s(runner: ModelRunner, batch_size: int, context: int) -> float:
    tables = _tables(runner, batch_size, context)
    prompt = list(range(1000, 1000 + context))
    start = time.perf_counter()
    runner.run([StepInput(prompt, 0, table) for table in tables], is_prefill=True)
    rate = batch_size * context / (time.perf_counter() - start)
    for table in tables:
        runner.allocator.free(table)
    return rate


def greedy_tokens(runner: ModelRunner, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding straight on the runner: one prefill, then one decode step per token."""
    table: list[int] = []
    assert runner.allocator.allocate(table, len(prompt) + new_tokens)
    out = [int(runner.run([StepInput(prompt, 0, table)], is_prefill=True)[0].argmax())]
    while len(out) < new_tokens:
        position = len(prompt) + len(out) - 1
        out.append(int(runner.run([StepInput([out[-1]], position, table)], is_prefill=False)[0].argmax()))
    runner.allocator.free(table)
    return out


def perplexity(runner: ModelRunner, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:], each token predicted by a decode step."""
    table: list[int] = []
    assert runner.allocator.allocate(table, len(ids))
    logits = runner.run([StepInput(ids[:1], 0, table)], is_prefill=True)
    nll = 0.0
    for position in range(1, len(ids)):
        nll -= float(torch.log_softmax(logits[0].float(), dim=-1)[ids[position]])
        if position + 1 < len(ids):
            logits = runner.run([StepInput([ids[position]], position, table)], is_prefill=False)
    runner.allocator.free(table)
    return math.exp(nll / (len(ids) - 1))


TEXT = Path(__file__).parent / "data" / "perplexity.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    reference = None
    print(
        "| dtype, weights, attention | decode step, batch 1 (ms) "
        f"| decode step, batch {args.batch_size} (ms) | prefill (tok/s) | greedy tokens as the first row "
        "| perplexity |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        dtype, weight_format, backend = CONFIGS[name]
        runner = ModelRunner(
            None, "cpu", dtype, num_kv_blocks=1024, attention_backend=backend, weight_format=weight_format
        )
        step_1 = decode_step_s(runner, 1, args.context, args.repeats)
        step_b = decode_step_s(runner, args.batch_size, args.context, args.repeats)
        prefill = prefill_tokens_per_s(runner, args.batch_size, args.context)
        encode = runner.tokenizer.encode
        outputs = [greedy_tokens(runner, encode(p), args.new_tokens) for p in PROMPTS]
        ppl = perplexity(runner, encode(TEXT.read_text()))
        reference = reference or outputs
        agree = [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
            for x, y in zip(reference, outputs, strict=True)
        ]
        print(
            f"| {dtype}, {weight_format}, {backend} | {1000 * step_1:.0f} | {1000 * step_b:.0f} "
            f"| {prefill:.0f} | {agree} | {ppl:.3f} |",
            flush=True,
        )
        del runner


if __name__ == "__main__":
    main()

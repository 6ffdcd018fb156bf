"""Which dtype, weight format and attention backend should the CPU default to?

For each configuration: the median of a few decode steps at batch 1 and at `--batch-size` sequences of
`--context` tokens, prefill throughput (`--batch-size` prompts of `--context` tokens in one step), and a
fixed text (bench/data/perplexity.txt) read token by token through decode steps: its perplexity, and at
each position whether the top token is the first configuration's and how far the next-token distribution
is from it (KL). Each position is predicted from the text itself, so one difference does not cascade.
Everything runs on this thread, through the model runner (the engine's loop thread does the same work).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from engine.core.step import StepRow
from engine.execution.model_runner import ModelRunner

# (dtype, weight format, attention backend): the first is the reference the others are compared with.
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
    decode = [StepRow([5], context, table) for table in tables]
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
    runner.run([StepRow(prompt, 0, table) for table in tables], is_prefill=True)
    rate = batch_size * context / (time.perf_counter() - start)
    for table in tables:
        runner.allocator.free(table)
    return rate


def teacher_forced_logits(runner: ModelRunner, ids: list[int], prefill_tokens: int) -> torch.Tensor:
    """Float32 logits [len(ids) - prefill_tokens, vocab]: row j predicts ids[prefill_tokens + j] from the
    tokens before it, as serving does: one prefill step of the first `prefill_tokens`, then a decode step
    for each following token (the text's own tokens, not the model's choices, so an early difference
    does not cascade)."""
    table: list[int] = []
    assert runner.allocator.allocate(table, len(ids))
    rows = [runner.run([StepRow(ids[:prefill_tokens], 0, table)], is_prefill=True).float()]
    for position in range(prefill_tokens, len(ids) - 1):
        rows.append(runner.run([StepRow([ids[position]], position, table)], is_prefill=False).float())
    runner.allocator.free(table)
    return torch.cat(rows)


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float, float]:
    """Position by position against the reference's logits: the share of positions whose top token is the
    reference's, the mean and the largest KL(reference || these) in nats."""
    top_1 = float((reference.argmax(-1) == logits.argmax(-1)).float().mean())
    p, q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return top_1, float(kl.mean()), float(kl.max())


TEXT = Path(__file__).parents[1] / "data" / "perplexity.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    reference = None
    print(
        "| dtype, weights, attention | decode step, batch 1 (ms) "
        f"| decode step, batch {args.batch_size} (ms) | prefill (tok/s) | top token as the first row's "
        "| KL to the first row, mean / max | perplexity |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        dtype, weight_format, backend = CONFIGS[name]
        runner = ModelRunner(
            None, "cpu", dtype, num_kv_blocks=1024, attention_backend=backend, weight_format=weight_format
        )
        step_1 = decode_step_s(runner, 1, args.context, args.repeats)
        step_b = decode_step_s(runner, args.batch_size, args.context, args.repeats)
        prefill = prefill_tokens_per_s(runner, args.batch_size, args.context)
        ids = runner.tokenizer.encode(TEXT.read_text())
        logits = teacher_forced_logits(runner, ids, prefill_tokens=1)
        ppl = math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))
        reference = logits if reference is None else reference
        top_1, kl_mean, kl_max = agreement(reference, logits)
        print(
            f"| {dtype}, {weight_format}, {backend} | {1000 * step_1:.0f} | {1000 * step_b:.0f} "
            f"| {prefill:.0f} | {100 * top_1:.1f}% | {kl_mean:.4f} / {kl_max:.3f} | {ppl:.3f} |",
            flush=True,
        )
        del runner


if __name__ == "__main__":
    main()

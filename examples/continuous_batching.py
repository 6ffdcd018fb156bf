"""Continuous batching, shown twice: the batcher forming batches, then the engine serving SmolLM2.

Run with `make example`. Part 1 feeds requests to a `ContinuousBatcher` over time and prints every
batch it forms. Part 2 submits prompts to the engine at staggered times and prints, step by step, the
requests joining and leaving the running batch: nobody waits for the longest sequence.
"""

from __future__ import annotations

import asyncio
import random
import time

from engine.batching import BatchConfig, BatchRequest, ContinuousBatcher
from engine.core.observer import EngineObserver
from engine.frontend.engine import Engine, EngineConfig
from engine.request import GenerationRequest, StoppingParams


def batcher_demo() -> None:
    config = BatchConfig(max_batch_size=4, max_batch_tokens=256, min_batch_size=3, max_wait_ms=30)
    print(f"Part 1: the batcher alone, {config}")
    batcher = ContinuousBatcher(config)
    rng = random.Random(0)
    start = time.monotonic()
    for i in range(14):
        request = BatchRequest(f"r{i}", input_tokens=rng.randint(16, 120), max_new_tokens=32)
        batcher.add(request.with_priority(1 if i % 5 == 0 else 0))
        time.sleep(rng.choice([0.002, 0.005, 0.02]))
        if (batch := batcher.try_form_batch()) is not None:
            ids = ", ".join(f"{r.id}(p{r.priority},{r.input_tokens}t)" for r in batch.requests)
            print(
                f"  t={1000 * (time.monotonic() - start):5.0f} ms  batch of {batch.size}: "
                f"{batch.total_input_tokens:3d} input tokens, wait avg {1000 * batch.avg_wait_time:4.1f} ms"
                f" / longest {1000 * batch.max_wait_time:4.1f} ms  [{ids}]"
            )
    while (batch := batcher.try_form_batch()) is not None or len(batcher):
        if batch is None:
            time.sleep(0.005)  # fewer than min_batch_size left: wait for max_wait_ms
            continue
        print(f"  leftover batch of {batch.size} after waiting up to {1000 * batch.max_wait_time:.0f} ms")


class PrintingObserver(EngineObserver):
    """Prints the engine steps at which requests join or leave the running batch."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.known: set[int] = set()  # sequence ids of the demo's own requests
        self.joined: list[str] = []
        self.left: list[str] = []
        self.step = 0

    def request_admitted(self, seq) -> None:
        if seq.id in self.names:
            self.known.add(seq.seq_id)
        self.joined.append(self.names.get(seq.id, "?"))

    def request_finished(self, seq, error) -> None:
        self.left.append(self.names.get(seq.id, "?"))

    def step_finished(self, step, start, end, kv_used, kv_total) -> None:
        joined, left, self.joined, self.left = self.joined, self.left, [], []
        if any(row.seq_id not in self.known for row in step.rows):
            return  # the engine's warm-up
        self.step += 1
        if joined or left:
            kind = "prefill" if step.is_prefill else "decode "
            line = f"  step {self.step:3d} {kind} {1000 * (end - start):4.0f} ms, batch of {len(step.rows)}"
            line += f"  +joined {', '.join(joined)}" if joined else ""
            line += f"  -left {', '.join(left)}" if left else ""
            print(line)


async def engine_demo() -> None:
    prompts = [
        ("A", "The capital of France is", 24, 0.0),
        ("B", "The opposite of hot is", 8, 0.0),
        ("C", "List three colors:", 40, 0.3),
        ("D", "def add(a, b):", 16, 0.6),
        ("E", "Once upon a time", 12, 0.6),
        ("F", "The quick brown fox", 20, 1.2),
    ]
    names: dict[str, str] = {}
    observer = PrintingObserver(names)
    print("\nPart 2: the engine on SmolLM2-135M-Instruct (loading...)")
    engine = Engine(EngineConfig(device="cpu", dtype="float32"), observer=observer)
    engine.start()
    print("  name  arrives  max_new_tokens  prompt")
    for name, prompt, n, at in prompts:
        print(f"  {name}     {at:4.1f} s   {n:3d}             {prompt!r}")

    async def run(name: str, prompt: str, n: int, at: float) -> tuple[str, str]:
        await asyncio.sleep(at)
        request = GenerationRequest(engine.tokenize(prompt), stopping=StoppingParams(max_new_tokens=n))
        names[request.request_id] = name
        text = "".join([event.text async for event in engine.submit(request)])
        return name, text

    results = await asyncio.gather(*(run(*p) for p in prompts))
    print("\n  outputs:")
    for name, text in results:
        print(f"  {name}: {text!r}")
    engine.shutdown()


if __name__ == "__main__":
    batcher_demo()
    asyncio.run(engine_demo())

"""The engine on a CUDA GPU: bfloat16, the Triton kernel, one-call prefill, decode replayed from CUDA graphs.

They run on `TEXTGEN_TEST_DEVICE`: by default CUDA where there is a GPU, else the CPU, with Triton in its
interpreter and the padded decode buffers run eagerly instead of replayed from graphs, so `make test`
checks their logic everywhere. Marked `cuda`: `make bench-gpu` (bench/gpu/check.py) runs them on a GPU with
`TEXTGEN_TEST_DEVICE=cuda` (they are skipped, and the run fails, if CUDA is missing) and `--noconftest`:
these tests build their own tiny random-weight models (bench.random_model), since the GPU image lacks the
server's dependencies.
"""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("TEXTGEN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":  # before anything imports triton: its interpreter is chosen then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.random_model import random_model, save_random_model  # noqa: E402
from engine.core.step import StepRow  # noqa: E402
from engine.execution.attention.torch_backend import (  # noqa: E402
    PrefillSegment,
    paged_decode_attention,
    plan_prefill,
    prefill_attention,
)
from engine.execution.model_runner import ModelRunner  # noqa: E402
from engine.frontend.engine import Engine, EngineConfig  # noqa: E402
from engine.request import StoppingParams  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason=f"TEXTGEN_TEST_DEVICE={DEVICE} asks for a CUDA GPU and torch sees none",
    ),
]

PROMPTS = [[5, 17, 300, 42, 7], [90, 91, 92], list(range(100, 140)), [11, 12, 13, 14, 15, 16, 17, 18, 19]]
BF16 = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_random_model("tiny", tmp_path_factory.mktemp("tiny"), torch.device("cpu"), torch.float32, 512)


def test_triton_decode_kernel_matches_the_torch_path_in_bfloat16():
    from engine.execution.attention.triton_backend import paged_decode_attention as triton_decode

    rng = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 8, 32 * 16, 128, generator=rng).to(DEVICE, torch.bfloat16)
    tables = torch.randint(0, 32, (5, 6), generator=rng).to(DEVICE)
    lens = torch.tensor([1, 17, 96, 40, 64], device=DEVICE)
    q = torch.randn(5, 32, 128, generator=rng).to(DEVICE, torch.bfloat16)
    scale = 128**-0.5
    expected = paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, 16, scale)
    got = triton_decode(q, k_cache, v_cache, tables, lens, 16, scale)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, **BF16)


@pytest.mark.parametrize(
    ("starts", "lengths"),
    [([0, 0, 0], [40, 33, 17]), ([0, 0, 0], [60, 1, 2]), ([48, 0, 0], [16, 30, 5])],
    ids=["padded batch", "mask, new only", "mask, from the cache"],
)
def test_prefill_in_one_call_matches_attention_per_sequence(starts, lengths):
    rng = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block = 8, 2, 64, 16
    k_cache = torch.zeros(kv_heads, 64 * block, dim, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    segments, new_slots, queries, keys, values, expected, row, next_slot = [], [], [], [], [], [], 0, 0
    for start, n in zip(starts, lengths, strict=True):
        q = torch.randn(heads, start + n, dim, generator=rng).to(DEVICE, torch.bfloat16)
        k, v = (torch.randn(kv_heads, start + n, dim, generator=rng).to(DEVICE, torch.bfloat16) for _ in "kv")
        slots = torch.arange(next_slot, next_slot + start + n, device=DEVICE)
        next_slot += -(-(start + n) // block) * block
        k_cache[:, slots], v_cache[:, slots] = k, v  # as `attend` does before attention
        segments.append(PrefillSegment(row, row + n, start + n, slots if start else None))
        new_slots.append(slots[start:])
        queries.append(q[:, start:])
        keys.append(k[:, start:])
        values.append(v[:, start:])
        full = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
        )
        expected.append(full[:, start:].transpose(0, 1))
        row += n
    plan = plan_prefill(segments, torch.cat(new_slots), torch.bfloat16)
    out = prefill_attention(
        torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1), k_cache, v_cache, plan, None
    )
    torch.testing.assert_close(out.float(), torch.cat(expected), **BF16)


def decode_inputs(runner: ModelRunner, prompts: list[list[int]]) -> list[StepRow]:
    inputs = []
    for prompt in prompts:
        table: list[int] = []
        assert runner.allocator.allocate(table, 64)
        inputs.append(StepRow(prompt, 0, table))
    runner.run(inputs, is_prefill=True)
    return [StepRow([p[-1]], len(p), item.block_table) for p, item in zip(prompts, inputs, strict=True)]


def test_decode_replayed_from_cuda_graphs_gives_the_eager_logits():
    loaded = random_model("tiny", torch.device(DEVICE), torch.bfloat16, 512)
    runner = ModelRunner(loaded, num_kv_blocks=128, attention_backend="triton", model_impl="lean")
    steps = decode_inputs(runner, PROMPTS[:3])  # three rows: a bucket of four
    eager = runner.run(steps, is_prefill=False)
    if not runner.capture_decode_graphs(max_batch_size=8, max_context_len=512):
        assert DEVICE == "cpu"
        runner.pad_decode_batches(max_batch_size=8, max_context_len=512)
    assert runner.cuda_graphs == (DEVICE == "cuda")
    replayed = runner.run(steps, is_prefill=False)  # the same step again: it rewrites the same KV
    torch.testing.assert_close(replayed.float(), eager.float(), **BF16)
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))


def make_engine(path, **overrides) -> Engine:
    config = EngineConfig(model=str(path), device=DEVICE, num_kv_blocks=256, **overrides)
    engine = Engine(config)
    engine.start()
    return engine


def teacher_forced_logits(
    runner: ModelRunner, prompts: list[list[int]], steps: int = 3
) -> list[torch.Tensor]:
    """Per prompt [1 + steps, vocab]: the logits of 1 + `steps` decode steps after one prefill step of all
    `prompts`, each fed a token fixed by the prompt and the step (a batch and a lone row see the same)."""
    inputs = decode_inputs(runner, prompts)  # the prefill, all prompts in one step
    logits = [runner.run(inputs, is_prefill=False)]
    for step in range(steps):
        inputs = [StepRow([(s.token_ids[0] * 7 + step) % runner.vocab_size], s.start_pos + 1, s.block_table)
                  for s in inputs]  # fmt: skip
        logits.append(runner.run(inputs, is_prefill=False))
    for item in inputs:
        runner.allocator.free(item.block_table)
    return list(torch.stack(logits, dim=1).float().unbind(0))


# What the engine guarantees of a row alone and in a batch, in bfloat16: its logits agree within
# BATCH_ULPS bfloat16 epsilons (2^-7, the gap after 1.0: bfloat16 keeps 8 significant bits) of the row's
# largest logit. Not bit for bit: on CUDA a row's arithmetic depends on the batch around it (cuBLAS picks a
# GEMM kernel by shape, and a CUDA graph bucket is a shape), so a bfloat16 rounding between layers can land
# on the neighbouring value; accumulations are in float32, far finer. A greedy pick between two logits
# closer than that can therefore differ.
BATCH_ULPS = 4


def test_a_rows_logits_alone_and_in_a_batch_agree_within_bfloat16_rounding():
    loaded = random_model("tiny", torch.device(DEVICE), torch.bfloat16, 512)
    runner = ModelRunner(loaded, num_kv_blocks=256, attention_backend="triton", model_impl="lean")
    if not runner.capture_decode_graphs(max_batch_size=8, max_context_len=512):
        runner.pad_decode_batches(max_batch_size=8, max_context_len=512)
    alone = [teacher_forced_logits(runner, [prompt])[0] for prompt in PROMPTS]  # buckets of one
    together = teacher_forced_logits(runner, PROMPTS * 2)  # one bucket of eight
    eps = torch.finfo(torch.bfloat16).eps
    for row, logits in enumerate(together):
        expected = alone[row % len(PROMPTS)]
        tolerance = BATCH_ULPS * eps * expected.abs().amax(-1, keepdim=True)
        assert ((logits - expected).abs() <= tolerance).all(), (row, (logits - expected).abs().max())


def test_engine_in_float32_matches_transformers_greedy(tiny_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to(DEVICE).eval()
    engine = make_engine(tiny_dir, dtype="float32", attention_backend="triton")
    try:
        results = engine.generate(PROMPTS, stopping=StoppingParams(max_new_tokens=8, ignore_eos=True))
    finally:
        engine.shutdown()
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(8):
                ids.append(int(reference(torch.tensor([ids], device=DEVICE)).logits[0, -1].argmax()))
        assert result.token_ids == ids[len(prompt) :]

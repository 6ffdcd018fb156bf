"""The engine on the real default model (SmolLM2-135M-Instruct, float32): batch invariance, references."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from bench.engine.cpu_dtype import TEXT, teacher_forced_logits
from engine.execution.model_runner import ModelRunner
from engine.frontend.engine import Engine, EngineConfig
from engine.request import GenerationRequest, SamplingParams, StoppingParams

NEW_TOKENS = 32
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


def greedy() -> StoppingParams:
    return StoppingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_engine) -> list[list[int]]:
    return [smollm2_engine.tokenize(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(smollm2_engine, prompt_ids) -> list[list[int]]:
    return [smollm2_engine.generate([ids], stopping=greedy())[0].token_ids for ids in prompt_ids]


@pytest.fixture(scope="module")
def float32_greedy(smollm2_dir, prompt_ids) -> list[list[int]]:
    """transformers' float32 `generate`, greedy, on each reference prompt."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    outputs = []
    for ids in prompt_ids:
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def test_the_exact_path_matches_transformers_generate(prompt_ids, float32_greedy):
    engine = Engine(EngineConfig(device="cpu", dtype="float32", weight_format="native"))
    try:
        ours = [r.token_ids for r in engine.generate(prompt_ids, stopping=greedy())]
    finally:
        engine.shutdown()
    assert ours == float32_greedy


SCORED_TOKENS = 128  # the text's last tokens, each predicted by a decode step from the text before it


@pytest.fixture(scope="module")
def teacher_forced() -> dict[str, torch.Tensor]:
    """Logits of the q4_1 path (the CPU default: int8 activations, C kernels) and of the float32 path (the
    same weights, dequantized) for the same text, token by token."""
    logits = {}
    for weight_format, backend in (("native", "torch"), ("q4_1", "cpu")):
        runner = ModelRunner(None, "cpu", "float32", num_kv_blocks=64, attention_backend=backend,
                             weight_format=weight_format)  # fmt: skip
        ids = runner.tokenizer.encode(TEXT.read_text())
        logits[weight_format] = teacher_forced_logits(runner, ids, prefill_tokens=len(ids) - SCORED_TOKENS)
        logits["target"] = torch.tensor(ids[-SCORED_TOKENS:])
        del runner
    return logits


# Bounds for a lossy path, checked position by position on the text's own tokens (so nothing cascades): int8
# activations round each value by up to 1/254 of its block's largest, which moves logits by a fraction of a
# unit, while a wrong kernel scrambles them. Each bound is several times what was measured (README, "CPU
# dtype"), and none depends on the order of rounding.
def test_the_q4_1_path_predicts_the_float32_top_token_almost_everywhere(teacher_forced):
    native, q4_1 = teacher_forced["native"], teacher_forced["q4_1"]
    agreement = (native.argmax(-1) == q4_1.argmax(-1)).float().mean().item()
    assert agreement >= 0.85, agreement


def test_the_float32_top_token_is_in_the_q4_1_top_5_at_every_position(teacher_forced):
    native, q4_1 = teacher_forced["native"], teacher_forced["q4_1"]
    in_top_5 = (q4_1.topk(5, dim=-1).indices == native.argmax(-1, keepdim=True)).any(-1)
    assert bool(in_top_5.all()), in_top_5.logical_not().nonzero().flatten().tolist()


def test_the_q4_1_perplexity_is_within_5_percent_of_float32(teacher_forced):
    target = teacher_forced["target"]
    native, q4_1 = (math.exp(float(F.cross_entropy(teacher_forced[k], target))) for k in ("native", "q4_1"))
    assert q4_1 <= 1.05 * native, (native, q4_1)


def test_the_q4_1_next_token_distribution_stays_close_to_float32_at_each_position(teacher_forced):
    native, q4_1 = teacher_forced["native"].log_softmax(-1), teacher_forced["q4_1"].log_softmax(-1)
    kl = (native.exp() * (native - q4_1)).sum(-1)  # KL(float32 || q4_1) in nats, per position
    assert kl.mean().item() <= 0.05 and kl.max().item() <= 0.5, (kl.mean().item(), kl.max().item())


async def test_staggered_batch_gives_the_same_greedy_output_as_alone(smollm2_engine, prompt_ids, alone):
    # Background traffic that is running when the prompts arrive, and keeps running after.
    background = [asyncio.create_task(collect(smollm2_engine, ids, NEW_TOKENS * 2)) for ids in prompt_ids[:3]]
    await asyncio.sleep(0.2)

    async def staggered(i: int, ids: list[int]) -> list[int]:
        await asyncio.sleep(0.15 * i)
        return await collect(smollm2_engine, ids, NEW_TOKENS)

    together = await asyncio.gather(*(staggered(i, ids) for i, ids in enumerate(prompt_ids)))
    await asyncio.gather(*background)
    assert together == alone


def test_seeded_sample_is_the_same_alone_and_in_a_batch(smollm2_engine, prompt_ids):
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    solo = smollm2_engine.generate([prompt_ids[0]], sampling=sampling, stopping=greedy())[0].token_ids
    mixed = [sampling] + [SamplingParams(temperature=1.0, seed=i) for i in range(1, len(prompt_ids))]
    batch = smollm2_engine.generate(prompt_ids, sampling=mixed, stopping=greedy())
    assert batch[0].token_ids == solo


def test_chat_template_renders_a_prompt(smollm2_engine):
    ids = smollm2_engine.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    text = smollm2_engine.decode(ids)
    assert "What is 2+2?" in text and ids[-1] != smollm2_engine.tokenize("?")[-1]


async def collect(engine, ids: list[int], n: int) -> list[int]:
    request = GenerationRequest(ids, stopping=StoppingParams(max_new_tokens=n, ignore_eos=True))
    return [t.id async for event in engine.submit(request) for t in event.tokens]

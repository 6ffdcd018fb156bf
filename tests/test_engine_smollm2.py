"""The engine on the real default model (SmolLM2-135M-Instruct, float32): batch invariance, references."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.cpu_dtype import PROMPTS  # the prompts whose greedy outputs the dtype benchmark compares
from engine.engine import Engine, EngineConfig
from engine.request import GenerationRequest, SamplingParams, StoppingParams

NEW_TOKENS = 32


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


def test_the_default_q4_1_path_stays_close_to_float32(alone, float32_greedy):
    # int8 activations (llama.cpp's arithmetic) round differently from float32, so a greedy output may
    # take another token after a while; a wrong kernel would diverge at once. Measured: 186 of 256 tokens
    # agree before the first difference, at least 10 on each prompt (README, "CPU dtype").
    agreed = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), NEW_TOKENS)
        for x, y in zip(alone, float32_greedy, strict=True)
    ]
    assert min(agreed) >= 8 and sum(agreed) >= 160, agreed


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

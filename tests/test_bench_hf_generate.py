"""Tests for bench.peers.hf_generate: left padding, exact output lengths, and what a static batch computes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.peers.hf_generate import generate_static_batch, left_padded_batch, run_static_batches

PAD = 0


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def test_prompts_are_padded_on_the_left_with_a_matching_mask():
    input_ids, attention_mask = left_padded_batch([[5, 6, 7], [8]], pad_token_id=PAD)
    assert input_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generate_returns_exactly_the_requested_new_tokens(tiny_model):
    new_tokens = generate_static_batch(tiny_model, [[5, 6, 7], [8, 9]], num_new_tokens=6, pad_token_id=PAD)
    assert new_tokens.shape == (2, 6)


def test_generate_is_greedy(tiny_model):
    first = generate_static_batch(tiny_model, [[5, 6, 7]], num_new_tokens=4, pad_token_id=PAD)
    second = generate_static_batch(tiny_model, [[5, 6, 7]], num_new_tokens=4, pad_token_id=PAD)
    assert torch.equal(first, second)


def test_static_batches_compute_the_longest_output_but_count_only_requested_tokens(tiny_model):
    prompts = [[5, 6], [7, 8, 9], [10]]
    result = run_static_batches(tiny_model, prompts, output_lens=[2, 5, 3], batch_size=2, pad_token_id=PAD)
    assert result.num_requests == 3
    assert result.prompt_tokens == 6
    assert result.output_tokens == 10
    assert result.computed_output_tokens == 2 * 5 + 1 * 3  # batch [2, 5] runs 5 steps, batch [3] runs 3
    assert result.output_throughput == pytest.approx(10 / result.duration_s)
    assert result.request_throughput == pytest.approx(3 / result.duration_s)

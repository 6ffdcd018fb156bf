"""Decode steps padded to batch-size buckets (what a CUDA graph replays) give every real row its unpadded
result, up to the float32 rounding of the linear layers (a BLAS may block a GEMM of 3 rows and one of 4
differently: MKL does on an AVX-512 Xeon); on the CPU the padded steps run eagerly on the same buffers.

With the kernels that read only the blocks a row holds (C; Triton, which CUDA graphs use, in its
interpreter), as the torch backend's gather would be padded to the widest block table a graph allows.
"""

from __future__ import annotations

import pytest
import torch

from engine.core.step import StepRow
from engine.execution.decode_graphs import decode_buckets
from engine.execution.model_runner import ModelRunner

PROMPTS = [[5, 17, 300, 42, 7], [900, 901, 902], list(range(100, 140)), [11, 12, 13, 14, 15, 16, 17, 18, 19]]
MAX_CONTEXT = 64


def test_decode_buckets_are_powers_of_two_then_every_eight_up_to_the_largest_batch():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(5) == (1, 2, 4, 5)
    assert decode_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert decode_buckets(30) == (1, 2, 4, 8, 16, 24, 30)


def make_runner(path, padded: bool, backend: str = "cpu") -> ModelRunner:
    runner = ModelRunner(
        str(path), "cpu", "float32", num_kv_blocks=256, block_size=4, attention_backend=backend,
        weight_format="native", model_impl="lean",
    )  # fmt: skip
    if padded:
        runner.pad_decode_batches(max_batch_size=8, max_context_len=MAX_CONTEXT)
    return runner


def prefill(runner: ModelRunner, prompts: list[list[int]]) -> list[StepRow]:
    """Prefill `prompts`; the decode inputs of their next token (each feeds back its prompt's last id)."""
    inputs = []
    for prompt in prompts:
        table: list[int] = []
        assert runner.allocator.allocate(table, MAX_CONTEXT)
        inputs.append(StepRow(prompt, 0, table))
    runner.run(inputs, is_prefill=True)
    return [StepRow([p[-1]], len(p), item.block_table) for p, item in zip(prompts, inputs, strict=True)]


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    """Unpadded and padded runners on the C kernel."""
    path = tiny_model_dir("llama")
    return make_runner(path, False), make_runner(path, True)


@pytest.fixture(scope="module")
def triton_runners(tiny_model_dir):
    """The same on the Triton kernel (what CUDA graphs replay), in its interpreter."""
    pytest.importorskip("triton")
    path = tiny_model_dir("llama")
    return make_runner(path, False, "triton"), make_runner(path, True, "triton")


def decode_both(runners, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    logits = []
    for runner in runners:
        steps = prefill(runner, prompts)
        logits.append(runner.run(steps, is_prefill=False))
        for step in steps:
            runner.allocator.free(step.block_table)
    return tuple(logits)


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within torch's float32 tolerance, and the same greedy token in every row."""
    torch.testing.assert_close(got, expected)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("num_rows", [1, 3, 4])
def test_padded_decode_gives_every_real_row_its_unpadded_logits(runners, num_rows):
    expected, got = decode_both(runners, PROMPTS[:num_rows])
    assert got.shape == expected.shape == (num_rows, runners[0].vocab_size)
    if num_rows in runners[1].decode_graphs.buckets:  # no padding: the very same step
        assert torch.equal(got, expected)
    assert_same_logits(got, expected)


def test_padded_decode_on_the_triton_kernel_gives_the_unpadded_logits(triton_runners):
    expected, got = decode_both(triton_runners, PROMPTS[:3])
    assert_same_logits(got, expected)


def test_a_smaller_step_after_a_larger_one_reads_no_stale_rows(runners):
    decode_both(runners, PROMPTS * 2)  # 8 rows: fills every buffer row
    expected, got = decode_both(runners, PROMPTS[2:3])
    assert torch.equal(got, expected)


def test_padding_rows_write_only_their_reserved_block(tiny_model_dir):
    runner = make_runner(tiny_model_dir("llama"), padded=True)
    assert runner.allocator.num_blocks == 255  # the padding block left the pool
    steps = prefill(runner, PROMPTS[:3])  # three rows run as a bucket of four
    before = runner.kv_cache.data.clone()
    runner.run(steps, is_prefill=False)
    bs = runner.block_size
    written = {s.block_table[s.start_pos // bs] * bs + s.start_pos % bs for s in steps}
    changed = set((runner.kv_cache.data != before).any(-1).any(2).any(1).any(0).nonzero().flatten().tolist())
    held = {block for s in steps for block in s.block_table}
    others = {slot // bs for slot in changed - written}
    assert written <= changed
    assert len(others) == 1 and not others & held  # the one padding block, which no sequence holds


def test_decode_steps_larger_than_the_largest_bucket_run_unpadded(runners):
    expected, got = decode_both(runners, (PROMPTS * 3)[:10])
    assert torch.equal(got, expected)

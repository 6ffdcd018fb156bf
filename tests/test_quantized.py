"""Q4_1 / Q8_0 weights and their C kernels (int8 activations): formats, the GGUF blocks, accuracy, batch
invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM

from engine.core.step import StepRow
from engine.execution import quantized
from engine.execution.model_runner import ModelRunner
from engine.execution.quantized import Q4_1, Q8_0, QuantizedLinear, dequantize, quantize
from engine.frontend.engine import Engine, EngineConfig
from engine.request import StoppingParams

pytestmark = pytest.mark.skipif(quantized.load() is None, reason="the quantized kernels cannot be built here")

FORMATS = {Q4_1: GGMLQuantizationType.Q4_1, Q8_0: GGMLQuantizationType.Q8_0}


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def linear(weight: torch.Tensor, fmt: int, bias: torch.Tensor | None = None) -> QuantizedLinear:
    return QuantizedLinear.from_blocks(quantize(weight, fmt), bias, *weight.shape, fmt)


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
def test_dequantize_matches_the_gguf_package_bit_for_bit(fmt):
    blocks = quantize(random_weight(6, 64), fmt)
    ours = dequantize(blocks, fmt, 6, 64)
    theirs = gguf_dequantize(blocks.numpy(), FORMATS[fmt]).reshape(6, 64)
    assert np.array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize(("fmt", "levels"), [(Q4_1, 15), (Q8_0, 254)])
def test_quantizing_rounds_each_weight_to_within_half_a_step(fmt, levels):
    weight = random_weight(8, 128)
    error = (dequantize(quantize(weight, fmt), fmt, 8, 128) - weight).abs().reshape(-1, 32)
    span = weight.reshape(-1, 32)
    step = (span.amax(1) - span.amin(1)) / levels if fmt == Q4_1 else 2 * span.abs().amax(1) / levels
    # Half a step, plus what storing the block's scale (and minimum) as float16 adds: 2^-11 of each.
    fp16 = 2**-11 * (16 * step + span.abs().amax(1))
    assert (error.amax(1) <= step * 0.5 + fp16).all()


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each row's blocks of 32 rounded to int8 at scale max|x| / 127."""
    blocks = x.reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(scale > 0, 1 / scale, 0)).clamp(-127, 127)
    return (q * scale).reshape(x.shape)


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_matmul_computes_int8_activations_times_the_dequantized_weights(fmt, rows):
    weight, bias = random_weight(37, 96), torch.randn(37)
    layer = linear(weight, fmt, bias)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(1))
    expected = int8_activations(x) @ dequantize(layer.blocks, fmt, 37, 96).T + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_int8_activations_cost_little_accuracy():
    layer = linear(random_weight(64, 576), Q4_1)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3))
    exact = x @ dequantize(layer.blocks, Q4_1, 64, 576).T
    # Rounding to 1/254 of each block's range: ~0.3% of the output's scale, as llama.cpp's Q8_1.
    assert (layer(x) - exact).norm() / exact.norm() < 0.01


def test_an_all_zero_activation_block_gives_zero_not_nan():
    layer = linear(random_weight(8, 64), Q4_1)
    x = torch.zeros(2, 64)
    x[1, 32:] = 1.0  # the first block of row 1 is all zeros, the second is not
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.zeros(8))


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
def test_each_rows_result_is_the_same_bits_alone_or_in_any_batch(fmt):
    layer = linear(random_weight(45, 160), fmt)  # 45 outputs: the last tile is partly empty
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(2))
    batched = layer(x)
    for i in range(9):  # one row takes the direct path, more rows the tiled one
        assert torch.equal(layer(x[i : i + 1])[0], batched[i])
        assert torch.equal(layer(x[max(0, i - 1) : i + 2])[min(i, 1)], batched[i])


def test_the_default_models_gguf_blocks_are_exactly_its_weights(smollm2_dir):
    runner = ModelRunner(None, "cpu", "float32", num_kv_blocks=16, weight_format="q4_1")
    model = runner._model_forward
    assert model._decode is not None  # decode steps take the C layer
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for ours, theirs in zip(model.layers, reference.model.layers, strict=True):
        attn, mlp = theirs.self_attn, theirs.mlp
        for layer, parts in [
            (ours.qkv, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (ours.o, [attn.o_proj]),
            (ours.gate_up, [mlp.gate_proj, mlp.up_proj]),
            (ours.down, [mlp.down_proj]),
        ]:
            weight = torch.cat([p.weight for p in parts])
            assert torch.equal(dequantize(layer.decode.blocks, Q4_1, *weight.shape), weight)
    head = model.lm_head.decode
    assert torch.equal(dequantize(head.blocks, Q8_0, head.n, head.k), reference.lm_head.weight)


LINEARS = ("qkv", "o", "gate_up", "down")


def run_steps(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill `prompts` together, then `steps` greedy decode steps; the logits of every step."""
    tables = []
    for prompt in prompts:
        table: list[int] = []
        assert runner.allocator.allocate(table, len(prompt) + steps + 1)
        tables.append(table)
    logits = [runner.run([StepRow(p, 0, t) for p, t in zip(prompts, tables, strict=True)], True)]
    tokens = logits[-1].argmax(-1).tolist()
    for step in range(steps):
        inputs = [StepRow([tok], len(p) + step, t) for p, t, tok in zip(prompts, tables, tokens, strict=True)]
        logits.append(runner.run(inputs, False))
        tokens = logits[-1].argmax(-1).tolist()
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_c_decode_layer_computes_what_the_torch_layers_do(tiny_model_dir, arch):
    path = str(tiny_model_dir(arch))
    c_layer = ModelRunner(path, "cpu", "float32", num_kv_blocks=64, weight_format="q4_1")
    torch_layers = ModelRunner(path, "cpu", "float32", num_kv_blocks=64, weight_format="q4_1")
    assert c_layer._model_forward._decode is not None
    torch_layers._model_forward._decode = None  # decode steps through the torch code
    for model in (c_layer._model_forward, torch_layers._model_forward):  # every step on the same blocks
        for linear in [model.lm_head, *(getattr(layer, n) for layer in model.layers for n in LINEARS)]:
            linear.prefill = linear.decode
    prompts = [[5, 17, 300, 42, 7], list(range(100, 140)), [900, 901, 902]]
    for ours, reference in zip(
        run_steps(c_layer, prompts, 6), run_steps(torch_layers, prompts, 6), strict=True
    ):
        # Mostly equal to ~1e-7; but a last-bit difference before an int8 rounding moves that activation by
        # one step (seen once: 0.7% of the logits' scale), while a wrong layer is off by the whole scale.
        scale = reference.abs().max().item()
        torch.testing.assert_close(ours, reference, rtol=0, atol=2e-2 * scale)


def test_a_q4_1_engines_output_does_not_depend_on_the_batch(tiny_model_dir):
    config = EngineConfig(
        model=str(tiny_model_dir("llama")), device="cpu", weight_format="q4_1", kv_block_size=4
    )
    engine = Engine(config)
    prompts = [[5, 17, 300, 42, 7], list(range(100, 140)), [900, 901, 902], [11, 12, 13]]
    stopping = StoppingParams(max_new_tokens=12, ignore_eos=True)
    try:
        alone = [engine.generate([p], stopping=stopping)[0].token_ids for p in prompts]
        together = [r.token_ids for r in engine.generate(prompts, stopping=stopping)]
    finally:
        engine.shutdown()
    assert together == alone


def test_q4_1_needs_the_lean_model_code(tiny_model_dir):
    with pytest.raises(ValueError, match="lean model code"):
        ModelRunner(str(tiny_model_dir("gpt2")), "cpu", "float32", num_kv_blocks=16, weight_format="q4_1")

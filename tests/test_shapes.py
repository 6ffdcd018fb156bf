"""Real model shapes as Q4_1 GGUF files (bench.random_gguf), served from `--model file.gguf`, and the cache
of quantized blocks: the same bytes in the GGUF, in textgen's kernels, and from a float checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize as gguf_quantize

from bench.random_gguf import GGUF_SHAPES, random_weights, shape_gguf
from bench.random_model import SHAPES, load_shape, shape_config
from engine.core.step import StepRow
from engine.execution import loader, quantized
from engine.execution.model_runner import ModelRunner
from engine.execution.quantized import Q4_1, Q8_0, block_cache_path, quantize

needs_kernels = pytest.mark.skipif(
    quantized.load() is None, reason="the quantized kernels cannot be built here"
)

# The tiny shape with a vocabulary that holds SmolLM2's tokenizer (49,152 tokens) and some padding.
TINY = {"llama": dict(SHAPES["tiny"], vocab_size=49152 + 32)}
TINY["qwen2"] = dict(TINY["llama"], model_type="qwen2")
LINEARS = ("qkv", "o", "gate_up", "down")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A textgen cache of this module's own for GGUF files, converted checkpoints and cached weights (the
    kernels stay where they were built)."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        for module in ("bench.random_gguf", "engine.execution.loader", "engine.execution.weight_cache"):
            patch.setattr(f"{module}.cache_dir", lambda: path)
        yield path


def test_every_shape_is_a_consistent_transformers_config():
    for name, fields in SHAPES.items():
        config = shape_config(name)
        assert config.model_type == fields["model_type"]
        assert config.num_attention_heads % config.num_key_value_heads == 0, name
        assert config.rope_parameters["rope_theta"] == fields["rope_theta"]
        assert config.tie_word_embeddings == fields["tie_word_embeddings"]
        # Q4_1 blocks hold 32 weights of a row: every matmul's input width is a multiple of 32.
        for width in (
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads * config.head_dim,
        ):
            assert width % 32 == 0, name


def test_a_config_json_reads_as_a_shape(tmp_path):
    config = shape_config("qwen2.5-0.5b").to_dict()
    del config["head_dim"]  # Qwen2.5's own config.json has none: hidden / heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = load_shape(tmp_path / "config.json")
    assert {k: shape[k] for k in SHAPES["qwen2.5-0.5b"]} == SHAPES["qwen2.5-0.5b"]


def test_a_config_json_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config().to_dict()))
    with pytest.raises(ValueError, match="model_type must be one of"):
        load_shape(tmp_path / "config.json")


@pytest.mark.parametrize(
    ("fmt", "qtype"), [(Q4_1, GGMLQuantizationType.Q4_1), (Q8_0, GGMLQuantizationType.Q8_0)]
)
def test_textgen_quantizes_to_the_bytes_gguf_py_writes(fmt, qtype):
    weight = torch.empty(2048, 1024).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(quantize(weight, fmt).numpy(), gguf_quantize(weight.numpy(), qtype))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_gguf_holds_the_shape_and_smollm2s_padded_tokenizer(arch):
    reader = GGUFReader(str(shape_gguf(TINY[arch])))
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields[f"{arch}.block_count"].contents() == TINY[arch]["num_hidden_layers"]
    assert fields[f"{arch}.attention.head_count_kv"].contents() == TINY[arch]["num_key_value_heads"]
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == TINY[arch]["vocab_size"] and tokens[-1] == f"<|pad_{len(tokens) - 1}|>"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_1"
    assert types["output_norm.weight"] == "F32"
    assert ("blk.0.attn_q.bias" in types) == (arch == "qwen2")


def test_a_shapes_gguf_is_written_once():
    path = shape_gguf(TINY["llama"])
    written = path.stat().st_mtime_ns
    assert shape_gguf(TINY["llama"]) == path and path.stat().st_mtime_ns == written
    assert shape_gguf(TINY["llama"], seed=1) != path


def greedy(runner: ModelRunner, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill `prompt`, then `steps` greedy decode steps: the tokens and every step's logits."""
    table: list[int] = []
    assert runner.allocator.allocate(table, len(prompt) + steps + 1)
    logits = [runner.run([StepRow(prompt, 0, table)], True)]
    tokens = [int(logits[-1].argmax())]
    for step in range(steps):
        logits.append(runner.run([StepRow([tokens[-1]], len(prompt) + step, table)], False))
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def decode_blocks(runner: ModelRunner) -> list[torch.Tensor]:
    model = runner._model_forward
    layers = [getattr(layer, name).decode for layer in model.layers for name in LINEARS]
    return [linear.blocks for linear in [*layers, model.lm_head.decode]]


def count_quantizing(monkeypatch) -> list[int]:
    """Counts the weights `quantize` is called on from now on."""
    calls = [0]
    real = quantized.quantize

    def counted(weight, fmt):
        calls[0] += 1
        return real(weight, fmt)

    monkeypatch.setattr(quantized, "quantize", counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_serves_its_own_blocks_bit_equal_to_its_float_checkpoint_through_q4_1(
    tmp_path, monkeypatch, arch
):
    path = shape_gguf(TINY[arch])
    calls = count_quantizing(monkeypatch)
    served = ModelRunner(str(path), "cpu", "float32", num_kv_blocks=32)
    assert served.weight_format == "q4_1" and served.model_impl == "lean"  # auto, for a Llama-family model
    assert calls[0] == 0  # every block is the GGUF's own
    # The same weights as a float checkpoint (the GGUF's, dequantized) elsewhere, quantized by textgen.
    checkpoint = shutil.copytree(loader.gguf_checkpoint_dir(path), tmp_path / "float")
    from_float = ModelRunner(str(checkpoint), "cpu", "float32", num_kv_blocks=32)
    assert calls[0] > 0
    for ours, theirs in zip(decode_blocks(served), decode_blocks(from_float), strict=True):
        assert torch.equal(ours, theirs)
    prompt = served.tokenizer("The same bytes on both sides").input_ids
    tokens, logits = greedy(served, prompt, 6)
    float_tokens, float_logits = greedy(from_float, prompt, 6)
    assert tokens == float_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, float_logits, strict=True))


@needs_kernels
def test_the_original_float_weights_quantize_to_the_gguf_bytes(tmp_path):
    config = shape_config(TINY["llama"])
    weights = dict(random_weights(config))
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weights, strict=False)  # tied: no lm_head of its own
    model.save_pretrained(tmp_path / "float")
    transformers.AutoTokenizer.from_pretrained(loader.default_model_dir()).save_pretrained(tmp_path / "float")
    from_float = ModelRunner(str(tmp_path / "float"), "cpu", "float32", num_kv_blocks=32)
    served = ModelRunner(str(shape_gguf(TINY["llama"])), "cpu", "float32", num_kv_blocks=32)
    for ours, theirs in zip(decode_blocks(from_float), decode_blocks(served), strict=True):
        assert torch.equal(ours, theirs)


def save_tiny_checkpoint(path, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(shape_config("tiny"))
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(loader.default_model_dir()).save_pretrained(path)


@needs_kernels
def test_a_second_load_reads_the_cached_blocks_instead_of_quantizing(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "model", seed=0)
    calls = count_quantizing(monkeypatch)
    first = ModelRunner(str(tmp_path / "model"), "cpu", "float32", num_kv_blocks=32)
    assert calls[0] > 0 and block_cache_path(tmp_path / "model").exists()
    calls[0] = 0
    second = ModelRunner(str(tmp_path / "model"), "cpu", "float32", num_kv_blocks=32)
    assert calls[0] == 0
    for a, b in zip(decode_blocks(first), decode_blocks(second), strict=True):
        assert torch.equal(a, b)
    assert greedy(first, [1, 5, 9, 13], 4)[0] == greedy(second, [1, 5, 9, 13], 4)[0]


@needs_kernels
def test_a_changed_checkpoint_is_quantized_again_not_served_stale(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "model", seed=0)
    stale = decode_blocks(ModelRunner(str(tmp_path / "model"), "cpu", "float32", num_kv_blocks=32))
    save_tiny_checkpoint(tmp_path / "model", seed=1)  # the same path, new weights
    calls = count_quantizing(monkeypatch)
    runner = ModelRunner(str(tmp_path / "model"), "cpu", "float32", num_kv_blocks=32)
    assert calls[0] > 0
    fresh = decode_blocks(runner)
    assert not any(torch.equal(a, b) for a, b in zip(stale, fresh, strict=True))
    weight = runner.model.get_input_embeddings().weight
    assert torch.equal(fresh[-1], quantize(weight, Q8_0))  # the tied head, from the new weights


def test_auto_keeps_the_transformers_path_off_q4_1():
    loaded = loader.load(
        str(shape_gguf(TINY["llama"])), torch.device("cpu"), torch.float32, model_impl="transformers"
    )
    assert loaded.weight_format != "q4_1"


def test_the_gguf_shapes_are_those_whose_vocabulary_holds_smollm2s_tokenizer():
    assert set(GGUF_SHAPES) == {"qwen2.5-0.5b", "llama-3.2-1b", "smollm2-1.7b", "llama-3-8b"}
    assert all(SHAPES[name]["vocab_size"] >= 49152 for name in GGUF_SHAPES)

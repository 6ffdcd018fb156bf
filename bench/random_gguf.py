"""A random-weight model of a real shape as a Q4_1 GGUF file: the same bytes for llama.cpp and for textgen.

The weights are drawn tensor by tensor from a seeded generator (normal, transformers' 0.02 standard
deviation; norms one). As in SmolLM2's own Q4_1 GGUF, the linear layers are Q4_1, the token embedding (and
an untied output head) Q8_0, norms and biases float32; gguf-py quantizes them (its ports of ggml's reference
quantizers, which textgen's `engine.execution.quantized.quantize` matches byte for byte). The tokenizer is
SmolLM2's, from the default model's GGUF, padded with unused tokens `<|pad_N|>` to the shape's vocabulary
(smollm2-1.7b has exactly SmolLM2's): prompts are real text, tokenized the same way by both servers.

Files are written once and cached under `<textgen cache>/shapes/`, named for the shape's fields and seed.

    python -m bench.random_gguf --shape llama-3.2-1b       # prints the file's path, writing it if needed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

from bench.random_model import SHAPES, load_shape, shape_config
from engine.execution.loader import default_gguf_path
from engine.execution.paths import cache_dir
from engine.execution.quantized import GGUF_NAMES

GGUF_SHAPES = tuple(name for name in SHAPES if name != "tiny")
"""The shapes whose vocabulary holds SmolLM2's tokenizer (the tiny one's 512 tokens do not)."""

WRITER_VERSION = 1
"""Part of each cached file's name: bump it when the weights or the file's layout change."""

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **GGUF_NAMES,
}
_QUANTIZE_ROWS = 8192  # rows quantized at a time: bounds gguf-py's float32 temporaries on large embeddings


def gguf_name(name: str) -> str:
    """A transformers Llama/Qwen2 parameter's GGUF tensor name."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if name in top or name == "lm_head.weight":
        return top.get(name, "output.weight")
    _, _, layer, rest = name.split(".", 3)  # model.layers.{i}.{rest}
    module, _, kind = rest.rpartition(".")
    return f"blk.{layer}.{_LAYER_NAMES.get(rest) or _LAYER_NAMES[module] + '.' + kind}"


def random_weights(
    config: transformers.PretrainedConfig, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """The float32 weights of a random model of `config`, by transformers name, each drawn from its own
    generator (seeded by `seed` and the name), so that any one of them can be made without the others."""
    hidden, dim = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * dim, config.num_key_value_heads * dim
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, q),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (config.intermediate_size, hidden),
        "mlp.up_proj.weight": (config.intermediate_size, hidden),
        "mlp.down_proj.weight": (hidden, config.intermediate_size),
    }
    if config.model_type == "qwen2":  # Qwen2 has biases on q, k and v
        layer |= {f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape)
            continue
        digest = hashlib.sha256(f"{seed} {name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        yield name, torch.empty(shape).normal_(0.0, 0.02, generator=generator)


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows in llama.cpp's order for RoPE (what llama.cpp's convert_hf_to_gguf.py does)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _quantize(weight: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    rows = weight.numpy()
    return np.concatenate(
        [
            gguf.quants.quantize(rows[i : i + _QUANTIZE_ROWS], qtype)
            for i in range(0, len(rows), _QUANTIZE_ROWS)
        ]
    )


def _copy_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """SmolLM2's tokenizer fields, its token list padded with unused tokens to `vocab_size`."""
    fields = gguf.GGUFReader(str(default_gguf_path())).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    if vocab_size < len(tokens):
        raise ValueError(f"a vocabulary of {vocab_size} is smaller than SmolLM2's tokenizer ({len(tokens)})")
    padding = range(len(tokens), vocab_size)
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"].contents())
    writer.add_token_list([*tokens, *(f"<|pad_{i}|>" for i in padding)])
    writer.add_token_types([*types, *(gguf.TokenType.UNUSED for _ in padding)])
    writer.add_token_merges(fields["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"].contents())
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"].contents())
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"].contents())
    writer.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"].contents())
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(fields["tokenizer.chat_template"].contents())


def write_gguf(
    config: transformers.PretrainedConfig, weights: Iterable[tuple[str, torch.Tensor]], path: Path, name: str
) -> Path:
    """Write `weights` (transformers names, float32) of a Llama or Qwen2 model of `config` to `path` as a
    Q4_1 GGUF (see the module's docstring), atomically; `path`."""
    architecture = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[config.model_type]
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(staging), architecture)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_tokenizer(writer, config.vocab_size)
    for hf_name, weight in weights:
        target = gguf_name(hf_name)
        if weight.dim() == 1:
            writer.add_tensor(target, weight.float().numpy())
            continue
        if architecture == "llama" and ".attn_q." in target:
            weight = _permute(weight, config.num_attention_heads)
        elif architecture == "llama" and ".attn_k." in target:
            weight = _permute(weight, config.num_key_value_heads)
        qtype = (
            gguf.GGMLQuantizationType.Q8_0
            if target in ("token_embd.weight", "output.weight")
            else gguf.GGMLQuantizationType.Q4_1
        )
        writer.add_tensor(target, _quantize(weight.float().contiguous(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.rename(path)
    return path


def shape_gguf(shape: str | dict, seed: int = 0) -> Path:
    """The cached Q4_1 GGUF of a random model of `shape` (a name in `SHAPES` or a shape's fields), written
    first if missing."""
    fields = SHAPES[shape] if isinstance(shape, str) else shape
    label = shape if isinstance(shape, str) else f"{fields['model_type']}-{fields['hidden_size']}"
    identity = json.dumps({"shape": fields, "seed": seed, "writer": WRITER_VERSION}, sort_keys=True)
    path = cache_dir() / "shapes" / f"{label}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.Q4_1.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    config = shape_config(fields)
    print(f"writing random {label} weights as Q4_1 to {path} (once)", flush=True)
    return write_gguf(config, random_weights(config, seed), path, f"random {label}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.random_gguf", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--shape", choices=GGUF_SHAPES, help="a real model's shape")
    group.add_argument("--config", type=Path, help="a transformers config.json of a Llama-family model")
    parser.add_argument("--seed", type=int, default=0, help="the weights' seed")
    args = parser.parse_args(argv)
    print(shape_gguf(args.shape or load_shape(args.config), args.seed))


if __name__ == "__main__":
    main()

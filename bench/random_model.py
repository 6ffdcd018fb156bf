"""Random-weight models of real shapes, built from configs written in code: nothing is downloaded.

The shapes are real models' configs (dimensions, layers, heads, KV heads, vocabulary, tied embeddings,
RoPE theta, norm epsilon), with plain RoPE (Llama-3.2's long-context RoPE scaling left out: the speed of a
step does not depend on it), and a tiny one for runs on the CPU. `load_shape` reads one more from a
transformers `config.json`. The tokenizer here is a word-level one made on the spot ("t0", "t1", ...),
enough for an engine that is handed token ids; `bench.random_gguf` gives the GGUF files a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from engine.execution.loader import LoadedModel, loaded_model

_LLAMA3_VOCAB = 128256

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=_LLAMA3_VOCAB, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
    ),
    "smollm2-1.7b": dict(
        model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, head_dim=64, tie_word_embeddings=True,
        rope_theta=130000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    "llama-3-8b": dict(
        model_type="llama", vocab_size=_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    "tiny": dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
    ),
}  # fmt: skip
"""Each shape's config, as transformers names the fields (the model's own `config.json`)."""

_SHAPE_FIELDS = (*SHAPES["tiny"], "attention_bias")
_MODEL_TYPES = ("llama", "mistral", "qwen2")


def load_shape(path: Path) -> dict:
    """A shape from a transformers `config.json`: the fields of `SHAPES`, for a Llama-family model."""
    config = json.loads(Path(path).read_text())
    if config.get("model_type") not in _MODEL_TYPES:
        raise ValueError(f"{path}: model_type must be one of {', '.join(_MODEL_TYPES)}")
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("tie_word_embeddings", False)
    config.setdefault("max_position_embeddings", 8192)
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    config.setdefault("rms_norm_eps", 1e-6)
    missing = [name for name in SHAPES["tiny"] if name not in config]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    return {name: config[name] for name in _SHAPE_FIELDS if name in config}


def shape_config(shape: str | dict, max_context_len: int | None = None) -> transformers.PretrainedConfig:
    """The transformers config of `shape` (a name in `SHAPES`, or a shape's fields), plain RoPE; ids 0, 1
    and 2 are pad, BOS and EOS."""
    fields = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if max_context_len is not None:
        fields["max_position_embeddings"] = max_context_len
    return transformers.AutoConfig.for_model(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word "t{i}"; ids 0, 1, 2 are pad, BOS and EOS."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


def parameter_bytes(shape: str, dtype: torch.dtype) -> int:
    """Bytes of the weights a decode step reads: every layer, the final norm and the output head (the
    embedding's rows for the step's tokens are few)."""
    s = SHAPES[shape]
    hidden, dim = s["hidden_size"], s["head_dim"]
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    per_layer = hidden * (heads + 2 * kv_heads) * dim + heads * dim * hidden  # qkv, o
    per_layer += 3 * hidden * s["intermediate_size"] + 2 * hidden  # gate, up, down; the two norms
    total = s["num_hidden_layers"] * per_layer + hidden + s["vocab_size"] * hidden
    return total * torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(shape: str, dtype: torch.dtype) -> int:
    s = SHAPES[shape]
    elements = 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"]
    return elements * torch.empty((), dtype=dtype).element_size()


def random_model(
    shape: str, device: torch.device, dtype: torch.dtype, max_context_len: int, seed: int = 0
) -> LoadedModel:
    """A random-weight model of `shape`, initialised on `device` (fast on a GPU), ready for a ModelRunner."""
    torch.manual_seed(seed)
    config = shape_config(shape, max_context_len)
    with torch.device(device):
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return loaded_model(hf_model, word_tokenizer(config.vocab_size), f"random {shape}")


def save_random_model(
    shape: str, path: Path, device: torch.device, dtype: torch.dtype, max_context_len: int
) -> Path:
    """A random-weight model of `shape` saved as a transformers checkpoint with its tokenizer in `path`."""
    loaded = random_model(shape, device, dtype, max_context_len)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path

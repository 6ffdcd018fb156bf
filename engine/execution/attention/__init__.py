"""Paged attention, plugged into transformers' attention interface as "textgen_paged".

The model runner sets a `StepContext` before each forward pass; every attention layer then writes
its new keys and values into the paged KV cache and attends over each sequence's cached context.
All sequences of a step are packed into one row of tokens (batch size 1, no padding).

Prefill attention is torch's SDPA (`torch_backend`): one call per layer for all of a step's sequences
on CUDA, one per sequence on the CPU.
Decode attention has backends behind one interface, `DecodeAttention`: `torch_backend` (gathers the
blocks; any device), `cpu_backend` (a C kernel) and `triton_backend` (CUDA). `resolve_decode_backend`
picks one once, at start-up; the triton module is imported only when it is picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface

from engine.core.kv_cache import KVCache
from engine.execution.attention import cpu_backend, torch_backend
from engine.execution.attention.torch_backend import (
    PrefillPlan,
    PrefillSegment,
    plan_prefill,
    prefill_attention,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_NAME",
    "DecodeAttention",
    "PrefillPlan",
    "PrefillSegment",
    "StepContext",
    "plan_prefill",
    "prefill_attention",
    "attend",
    "paged_attention",
    "resolve_decode_backend",
    "set_context",
]

ATTENTION_NAME = "textgen_paged"
ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")


class DecodeAttention(Protocol):
    """One query token per sequence against its cached context, read through its block table.

    q [batch, heads, dim]; k_cache, v_cache [kv_heads, slots, dim] (one layer); block_tables [batch,
    blocks] (padded); context_lens [batch] (the new token included) -> [batch, heads, dim].
    """

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor: ...


def resolve_decode_backend(
    name: str, device: torch.device, dtype: torch.dtype
) -> tuple[str, DecodeAttention]:
    """The decode backend `name` ("auto", "torch", "cpu", "triton") as (resolved name, function).

    'auto' is the C kernel for float32 on the CPU (torch if it cannot be built), else torch. Triton
    stays opt-in until it has run on a GPU.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {name!r}")
    cpu_float32 = device.type == "cpu" and dtype == torch.float32
    if name == "auto":
        name = "cpu" if cpu_float32 and cpu_backend.load() is not None else "torch"
    elif name == "cpu":
        if not cpu_float32:
            raise ValueError("the cpu attention backend is for float32 models on the CPU")
        if cpu_backend.load() is None:
            raise ValueError(f"the cpu attention kernel could not be built: {cpu_backend.load_error()}")
    if name == "cpu":
        return name, cpu_backend.paged_decode_attention
    if name == "triton":
        from engine.execution.attention import triton_backend  # imports triton: only when it is the backend

        return name, triton_backend.paged_decode_attention
    return name, torch_backend.paged_decode_attention


@dataclass(slots=True)
class StepContext:
    """What the attention layers need to know about the current step."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's key and value go
    is_prefill: bool
    segments: list[PrefillSegment] | None = None  # prefill only
    prefill_plan: PrefillPlan | None = None  # prefill only: made from `segments` by the first layer
    block_tables: torch.Tensor | None = None  # decode only: [batch, max_blocks] block ids, padded
    context_lens: torch.Tensor | None = None  # decode only: [batch] tokens of context, the new one included
    decode_attention: DecodeAttention = torch_backend.paged_decode_attention  # as resolved at start-up


_context: StepContext | None = None


def set_context(context: StepContext | None) -> None:
    global _context
    _context = context


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [1, heads, tokens, dim], key/value [1, kv_heads, tokens,
    dim] -> [1, tokens, heads, dim], in the step context the runner set."""
    assert _context is not None, "paged attention called outside an engine step"
    out = attend(_context, module.layer_idx, query[0], key[0], value[0], scaling)
    return out.unsqueeze(0), None


def attend(
    ctx: StepContext,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None = None,
) -> torch.Tensor:
    """Write one layer's new keys and values into the cache and attend over each sequence's context.

    query [heads, tokens, dim], key/value [kv_heads, tokens, dim] -> [tokens, heads, dim].
    """
    k_cache, v_cache = ctx.kv_cache.layer(layer_idx)
    k_cache[:, ctx.slot_mapping] = key.to(k_cache.dtype)
    v_cache[:, ctx.slot_mapping] = value.to(v_cache.dtype)
    if ctx.is_prefill:
        if ctx.prefill_plan is None:
            one_call = query.device.type != "cpu"  # see PrefillPlan: a call per sequence is cheaper there
            ctx.prefill_plan = plan_prefill(ctx.segments, ctx.slot_mapping, query.dtype, one_call)
        return prefill_attention(query, key, value, k_cache, v_cache, ctx.prefill_plan, scaling)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return ctx.decode_attention(
        query.transpose(0, 1), k_cache, v_cache, ctx.block_tables, ctx.context_lens,
        ctx.kv_cache.block_size, scale,
    )  # fmt: skip


AttentionInterface.register(ATTENTION_NAME, paged_attention)

"""Paged attention, plugged into transformers' attention interface as "textgen_paged".

The model runner sets a `StepContext` before each forward pass; every attention layer then writes
its new keys and values into the paged KV cache and attends over each sequence's cached context.
All sequences of a step are packed into one row of tokens (batch size 1, no padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.kv_cache import KVCache

ATTENTION_NAME = "textgen_paged"


@dataclass(slots=True)
class PrefillSegment:
    """One sequence's share of a prefill step: query rows [start, end) against `num_context` keys."""

    start: int
    end: int
    num_context: int
    context_slots: torch.Tensor  # [num_context] slots holding this sequence's keys, the new ones included


@dataclass(slots=True)
class StepContext:
    """What the attention layers need to know about the current step."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's key and value go
    is_prefill: bool
    segments: list[PrefillSegment] | None = None  # prefill only
    decode_slots: torch.Tensor | None = None  # decode only: [batch, max_context] slots, padded
    decode_mask: torch.Tensor | None = None  # decode only: [batch, 1, 1, max_context] True where valid


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
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> [1, tokens, heads, dim]."""
    ctx = _context
    assert ctx is not None, "paged attention called outside an engine step"
    k_cache, v_cache = ctx.kv_cache.layer(module.layer_idx)
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [tokens, kv_heads, dim]
    k_cache[ctx.slot_mapping] = k_new.to(k_cache.dtype)
    v_cache[ctx.slot_mapping] = v_new.to(v_cache.dtype)
    if ctx.is_prefill:
        out = _prefill_attention(query[0], k_new, v_new, k_cache, v_cache, ctx.segments, scaling)
    else:
        out = _decode_attention(query[0], k_cache, v_cache, ctx.decode_slots, ctx.decode_mask, scaling)
    return out.unsqueeze(0), None


def _prefill_attention(q, k_new, v_new, k_cache, v_cache, segments, scaling) -> torch.Tensor:
    """Causal attention per sequence; a sequence with earlier chunks reads them from the cache."""
    outputs = []
    for seg in segments:
        q_seg = q[:, seg.start : seg.end]  # [heads, n, dim]
        n = seg.end - seg.start
        if seg.num_context == n:  # the whole context is in this step: no need to read the cache
            k, v = k_new[seg.start : seg.end], v_new[seg.start : seg.end]
            out = F.scaled_dot_product_attention(
                q_seg, k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            k = k_cache[seg.context_slots].to(q.dtype).transpose(0, 1)
            v = v_cache[seg.context_slots].to(q.dtype).transpose(0, 1)
            offset = seg.num_context - n
            rows = torch.arange(n, device=q.device)[:, None] + offset
            mask = torch.arange(seg.num_context, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(q_seg, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        outputs.append(out.transpose(0, 1))  # [n, heads, dim]
    return torch.cat(outputs, dim=0)


def _decode_attention(q, k_cache, v_cache, slots, mask, scaling) -> torch.Tensor:
    """One query token per sequence against its whole cached context, all sequences in one batched matmul."""
    num_heads, batch, head_dim = q.shape
    k = k_cache[slots].to(q.dtype)  # [batch, context, kv_heads, dim]
    v = v_cache[slots].to(q.dtype)
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    # Grouped-query attention without repeating keys: [batch, kv_heads, group, dim] x [batch, kv_heads, dim, ctx].
    q = q.permute(1, 0, 2).reshape(batch, num_kv_heads, group, head_dim)
    scale = scaling if scaling is not None else head_dim**-0.5
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [batch, kv_heads, group, dim]
    return out.reshape(batch, num_heads, head_dim)


AttentionInterface.register(ATTENTION_NAME, paged_attention)

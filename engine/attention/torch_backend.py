"""Attention in plain torch: prefill for every backend, and the reference decode backend (any device).

Prefill runs SDPA per sequence. Decode gathers each sequence's KV blocks into new tensors and runs
batched matmuls over them; the kernel backends (`cpu_backend`, `triton_backend`) compute the same
thing reading the blocks in place, and are tested against this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSegment:
    """One sequence's share of a prefill step: query rows [start, end) against `num_context` keys."""

    start: int
    end: int
    num_context: int
    context_slots: torch.Tensor  # [num_context] slots holding this sequence's keys, the new ones included


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: list[PrefillSegment],
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention per sequence; a sequence with earlier chunks reads them from the cache.

    q [heads, tokens, dim], k_new/v_new [kv_heads, tokens, dim] -> [tokens, heads, dim]. The inputs
    keep a batch dimension of one: with it the CPU takes SDPA's flash kernel, without it the unfused
    math path (README, "CPU dtype, weights and attention").
    """
    q = q[None]  # [1, heads, tokens, dim]
    outputs = []
    for seg in segments:
        q_seg = q[:, :, seg.start : seg.end]
        n = seg.end - seg.start
        if seg.num_context == n:  # the whole context is in this step: no need to read the cache
            k, v = k_new[None, :, seg.start : seg.end], v_new[None, :, seg.start : seg.end]
            out = F.scaled_dot_product_attention(q_seg, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            k = k_cache[None, :, seg.context_slots].to(q.dtype)
            v = v_cache[None, :, seg.context_slots].to(q.dtype)
            offset = seg.num_context - n
            rows = torch.arange(n, device=q.device)[:, None] + offset
            mask = torch.arange(seg.num_context, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(q_seg, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))  # [n, heads, dim]
    return torch.cat(outputs, dim=0)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [batch, heads, dim], caches [kv_heads, slots, dim], tables [batch, blocks] -> [batch, heads, dim].

    One query token per sequence against its whole cached context, all sequences in one batched
    matmul. Whole blocks are gathered (not single slots): far fewer, larger copies.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    blocks_shape = (num_kv_heads, -1, block_size, head_dim)
    context = (num_kv_heads, batch, -1, head_dim)
    flat_tables = block_tables.flatten()
    k = (
        k_cache.view(blocks_shape).index_select(1, flat_tables).view(context).to(q.dtype)
    )  # [kv_heads, batch, ctx, dim]
    v = v_cache.view(blocks_shape).index_select(1, flat_tables).view(context).to(q.dtype)
    # Grouped-query attention without repeating keys: query heads h = kv_head * group + g.
    # [batch, heads, dim] -> [kv_heads, batch, group, dim]
    q = q.transpose(0, 1).view(num_kv_heads, group, batch, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [kv_heads, batch, group, ctx]
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens[:, None]  # [batch, ctx]
    probs = scores.masked_fill_(~valid[None, :, None, :], float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs, v)  # [kv_heads, batch, group, dim]
    return out.permute(1, 0, 2, 3).reshape(batch, num_heads, head_dim)

"""Attention in plain torch: prefill for every backend, and the reference decode backend (any device).

Prefill runs every sequence of a step in one SDPA call on CUDA (a padded batch or a block-diagonal
causal mask, planned once per step by `plan_prefill`), one call per sequence on the CPU. Decode gathers
each sequence's KV blocks into new tensors and runs batched matmuls over them; the kernel backends
(`cpu_backend`, `triton_backend`) compute the same thing reading the blocks in place, and are tested
against this one.
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
    # [num_context] slots holding this sequence's keys, the new ones included; None when every key is new
    context_slots: torch.Tensor | None = None


@dataclass(slots=True)
class PrefillPlan:
    """How every layer of one prefill step attends, worked out once per step.

    One SDPA call for every sequence of the step (on CUDA, where each call is a launch) in one of three
    shapes, whichever computes least: one new sequence runs plainly causal (nothing set); new sequences
    only may run as a batch padded at the end to the longest (`padded_rows` [tokens]: each token's row
    in that [sequences * longest] layout), causal, so that the kernel skips what lies above the
    diagonal; otherwise every token against every key under `mask` [tokens, keys] (additive: 0 where a
    query sees a key of its own sequence at or before its position, -inf elsewhere), with the keys read
    from the cache at `context_slots` [keys] when some sequence continues an earlier chunk (None: the
    keys are the new tokens). Or, with `segments` set, one call per sequence: on the CPU a call costs
    little next to its arithmetic, and the batched and masked calls compute more (README, "GPU").
    """

    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    padded_rows: torch.Tensor | None = None
    num_sequences: int = 1
    longest: int = 0
    segments: list[PrefillSegment] | None = None


def plan_prefill(
    segments: list[PrefillSegment], slot_mapping: torch.Tensor, dtype: torch.dtype, one_call: bool = True
) -> PrefillPlan:
    """The plan of a prefill step whose new tokens, in `segments`, go to the cache at `slot_mapping`;
    one SDPA call for them all, or with `one_call` False one per sequence."""
    if not one_call:
        return PrefillPlan(segments=segments)
    device = slot_mapping.device
    lengths = [seg.end - seg.start for seg in segments]
    fresh = all(seg.num_context == n for seg, n in zip(segments, lengths, strict=True))
    if fresh and len(segments) == 1:
        return PrefillPlan()
    new = torch.tensor(lengths, device=device)
    num_tokens, longest = sum(lengths), max(lengths)
    num_keys = sum(seg.num_context for seg in segments)
    if fresh and len(segments) * longest * longest // 2 <= num_tokens * num_keys:
        starts = torch.arange(len(segments), device=device) * longest
        rows = _local_index(new, num_tokens) + starts.repeat_interleave(new, output_size=num_tokens)
        return PrefillPlan(padded_rows=rows, num_sequences=len(segments), longest=longest)
    context_slots = None
    if not fresh:
        context_slots = torch.cat([
            slot_mapping[seg.start : seg.end] if seg.context_slots is None else seg.context_slots
            for seg in segments
        ])  # fmt: skip
    context = torch.tensor([seg.num_context for seg in segments], device=device)
    sequences = torch.arange(len(segments), device=device)
    # A query's position in its sequence, and a key's: queries are the last `new` of `context` positions.
    query_pos = _local_index(new, num_tokens) + (context - new).repeat_interleave(new, output_size=num_tokens)
    key_pos = _local_index(context, num_keys)
    query_seq = sequences.repeat_interleave(new, output_size=num_tokens)
    key_seq = sequences.repeat_interleave(context, output_size=num_keys)
    same_sequence = query_seq[:, None] == key_seq[None, :]
    visible = same_sequence & (key_pos[None, :] <= query_pos[:, None])
    # Rows padded to a multiple of 16 elements: CUDA's memory-efficient kernel reads masks aligned so.
    padded = -(-num_keys // 16) * 16
    mask = torch.full((num_tokens, padded), float("-inf"), dtype=dtype, device=device)[:, :num_keys]
    return PrefillPlan(context_slots, mask.masked_fill_(visible, 0.0))


def _local_index(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """0, 1, .., n-1 for each n of `lengths` (which sum to `total`), one after the other."""
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=lengths.device) - starts.repeat_interleave(lengths, output_size=total)


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PrefillPlan,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention of every sequence of the step as `plan` says; earlier chunks are read from the cache.

    q [heads, tokens, dim], k_new/v_new [kv_heads, tokens, dim] -> [tokens, heads, dim]. The inputs
    keep a batch dimension: with it the CPU takes SDPA's flash kernel, without it the unfused math path
    (README, "CPU dtype, weights and attention").
    """
    if plan.segments is not None:
        return _attention_per_sequence(q, k_new, v_new, k_cache, v_cache, plan.segments, scaling)
    if plan.padded_rows is not None:
        return _padded_attention(q, k_new, v_new, plan, scaling)
    if plan.context_slots is None:
        k, v = k_new[None], v_new[None]
    else:
        k = k_cache[None, :, plan.context_slots].to(q.dtype)
        v = v_cache[None, :, plan.context_slots].to(q.dtype)
    q = q[None]
    gqa = True
    if plan.mask is not None and q.device.type == "cuda":
        # CUDA's kernels that take a mask take no grouped keys: give every query head its own.
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None, scale=scaling, enable_gqa=gqa
    )
    return out[0].transpose(0, 1)


def _padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan, scaling: float | None
) -> torch.Tensor:
    """New sequences as one causal batch [sequences, heads, longest, dim], each padded at its end."""
    size = plan.num_sequences * plan.longest

    def padded(x: torch.Tensor) -> torch.Tensor:  # [heads, tokens, dim] -> [sequences, heads, longest, dim]
        out = x.new_zeros(size, x.shape[0], x.shape[2])
        out.index_copy_(0, plan.padded_rows, x.transpose(0, 1))
        return out.view(plan.num_sequences, plan.longest, x.shape[0], x.shape[2]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), is_causal=True, scale=scaling, enable_gqa=True
    )  # padding follows every real row, so the causal mask keeps it out of them
    return out.transpose(1, 2).reshape(size, q.shape[0], q.shape[2]).index_select(0, plan.padded_rows)


def _attention_per_sequence(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: list[PrefillSegment],
    scaling: float | None,
) -> torch.Tensor:
    """One causal SDPA call per sequence."""
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
            rows = torch.arange(n, device=q.device)[:, None] + (seg.num_context - n)
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

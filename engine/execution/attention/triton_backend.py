"""The "triton" decode backend: paged decode attention as one Triton kernel for CUDA, no gathered copy.

One program per (sequence, KV head) walks the sequence's block table, reading each KV block straight
from the cache, and keeps an online softmax (running max and sum) in float32, so the whole context is
read once and nothing is padded. The query heads that share a KV head are handled together.
Tested against the torch path on the CPU with TRITON_INTERPRET=1 (tests/test_attention_kernels.py,
tests/test_triton_offsets.py) and compiled ahead of time for sm_80 and sm_90 (bench/gpu/triton_aot.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
    scale,
    stride_qb, stride_qh,
    stride_kh, stride_ks,
    stride_tb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # 64-bit offsets: a layer's pool can hold over 2^31 elements, and `kv_head * stride_kh` (int32 times
    # int32) would wrap around past that.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    context_len = tl.load(lens_ptr + seq)
    groups = tl.arange(0, GROUP_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    group_mask = groups < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + groups
    q_mask = group_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale  # [GROUP_P2, HEAD_DIM_P2]

    running_max = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_tb + i).to(tl.int64)
        valid = i * BLOCK_SIZE + offsets < context_len
        slots = block * BLOCK_SIZE + offsets
        kv_offsets = kv_head * stride_kh + slots[:, None] * stride_ks + dims[None, :]
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, HEAD_DIM_P2]
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P2, BLOCK_SIZE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.sum(probs[:, :, None] * v[None, :, :], axis=1)
        running_max = new_max
    out = acc / running_sum[:, None]
    out_offsets = seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [batch, heads, dim], caches [kv_heads, slots, dim], tables [batch, blocks] -> [batch, heads, dim]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    assert k_cache.stride(2) == 1 and v_cache.stride() == k_cache.stride()
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, HEAD_DIM_P2=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
    )  # fmt: skip
    return out

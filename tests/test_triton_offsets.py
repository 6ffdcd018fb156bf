"""The Triton decode kernel addresses a KV pool of more than 2^31 elements (in its interpreter on the CPU;
on CUDA where there is one).

A layer's pool is [kv_heads, slots, head_dim]: with 3 KV heads of 2^30 elements each, the third head
starts at element 2^31, where `kv_head * stride` in 32 bits wraps around to a negative offset. On the CPU
the pool is `torch.empty`: its pages are only reserved (6 GiB of address space), and only the blocks the
kernel reads are written, so the test touches a few MiB of memory.
"""

from __future__ import annotations

import pytest
import torch

from engine.execution.attention.torch_backend import paged_decode_attention as torch_decode

pytest.importorskip("triton")

BLOCK, DIM, KV_HEADS, GROUP = 16, 64, 3, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_triton_kernel_reads_kv_heads_that_start_past_two_to_the_31_elements():
    from engine.execution.attention.triton_backend import paged_decode_attention as triton_decode

    slots = (1 << 30) // DIM  # each head's stride is 2^30 elements: below 2^31, so passed as int32
    try:
        cache = torch.empty(KV_HEADS, slots, DIM, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError as error:  # the allocator refused 6 GiB of address space
        pytest.skip(f"cannot reserve a {KV_HEADS << 31}-byte pool here: {error}")
    assert (KV_HEADS - 1) * cache.stride(0) >= 1 << 31
    last = slots // BLOCK - 1
    used = torch.cat([torch.arange(0, BLOCK), torch.arange(last * BLOCK, (last + 1) * BLOCK)])
    rng = torch.Generator().manual_seed(0)
    cache[:, used] = torch.randn(KV_HEADS, 2 * BLOCK, DIM, generator=rng).to(DEVICE, torch.bfloat16)
    q = torch.randn(1, KV_HEADS * GROUP, DIM, generator=rng).to(DEVICE, torch.bfloat16)
    lens = torch.tensor([2 * BLOCK], device=DEVICE)
    # Keys and values the same tensor: one pool's worth of address space instead of two.
    got = triton_decode(q, cache, cache, torch.tensor([[0, last]], device=DEVICE), lens, BLOCK, DIM**-0.5)
    small = cache[:, used].float()  # the two blocks, copied into a pool of their own
    expected = torch_decode(
        q.float(), small, small, torch.tensor([[0, 1]], device=DEVICE), lens, BLOCK, DIM**-0.5
    )
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)

"""The "cpu" decode backend: the C paged decode-attention kernel (engine/execution/csrc/paged_attention.c).

The torch decode path gathers every sequence's KV blocks into new tensors and then runs small batched
matmuls over them; on the CPU both are bound by memory and per-call overheads. The C kernel reads the
blocks in place, once. `engine.execution.kernels` compiles it the first time it is needed; when no compiler is
there the engine says so and falls back to the torch path.
"""

from __future__ import annotations

import ctypes

import torch

from engine.execution import kernels


def _declare(library: ctypes.CDLL) -> None:
    fn = library.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float] + [ctypes.c_int64] * 2


_library = kernels.Library("paged_attention", _declare)


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None (with the reason in `load_error()`) if it cannot be."""
    return _library.get()


def load_error() -> str | None:
    return _library.error


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

    Float32 CPU tensors only; `load()` must have succeeded.
    """
    library = load()
    assert library is not None, load_error()
    batch, num_heads, head_dim = q.shape
    num_kv_heads, num_slots, _ = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = library.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        out.data_ptr(), num_heads, num_kv_heads, head_dim, num_slots, tables.shape[1], block_size,
        scale, 0, batch * num_kv_heads,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scores")
    return out

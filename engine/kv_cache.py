"""The paged KV cache: one preallocated pool of fixed-size blocks, and the allocator that hands them out."""

from __future__ import annotations

from collections import deque

import torch


class BlockAllocator:
    """Hands out block ids from a fixed pool; a sequence's blocks form its block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` to hold `num_tokens` slots; False (and no change) if the pool is short."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        block_table.extend(self._free.popleft() for _ in range(missing))
        return True

    def reserve(self) -> int:
        """Take one free block out of the pool for good (the pool is one block smaller from now on)."""
        assert self._free, "no free block to reserve"
        self.num_blocks -= 1
        return self._free.pop()

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` to the pool and empty it."""
        self._free.extend(block_table)
        block_table.clear()
        assert len(self._free) <= self.num_blocks


class KVCache:
    """Key and value tensors for every layer, addressed by slot = block id * block size + offset.

    Heads come first ([kv_heads, slots, head_dim] per layer), so gathering a batch's blocks gives
    tensors that the attention matmuls read as they are, with no transposing copies.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (2, num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks, block_size)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each [kv_heads, slots, head_dim]."""
        return self.data[0, layer_idx], self.data[1, layer_idx]

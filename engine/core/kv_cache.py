"""The paged KV cache: one preallocated pool of fixed-size blocks, and the allocator that hands them out.

Prefix caching: a full block whose keys and values are computed is indexed by a hash chained over the
token ids of every block up to and including it (`block_hashes`), so the hash names the whole prefix,
not just the block's own tokens, and started from the request's partition (`cache_seed`: the service's
tenant and the caller's cache salt), so requests of different partitions share nothing. A later sequence
whose prompt starts with the same whole blocks shares them (reference-counted) instead of recomputing
them. A cached block that no sequence holds stays in the index until a block is needed and none is free:
then the least recently used one is evicted.
With a `KvEventLog` attached, every change to the index is reported to it (gateways mirror the index).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict, deque

import numpy as np
import torch

from engine.core.kv_events import KvEventLog


def check_block_size(block_size: int) -> None:
    """Refuse a KV block size that is not a power of two, at start: the Triton decode kernel walks a block
    as `tl.arange(0, block_size)`, which needs one, and every backend takes the same sizes."""
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"the KV block size must be a power of two (1, 2, 4, 8, 16, ...), not {block_size}")


def block_hashes(
    token_ids: list[int], block_size: int, hashes: list[bytes], seed: bytes = b""
) -> list[bytes]:
    """Extend `hashes` to one per full block of `token_ids`, each chained on the one before; return it.

    The first block is chained on `seed` (`cache_seed`), the prefix cache's partition: prompts of
    different partitions never share a hash. SHA-256 rather than Python's `hash`: a collision would
    silently hand one prompt another's keys.
    """
    for index in range(len(hashes), len(token_ids) // block_size):
        digest = hashlib.sha256(hashes[-1] if hashes else seed)
        digest.update(array("q", token_ids[index * block_size : (index + 1) * block_size]).tobytes())
        hashes.append(digest.digest())
    return hashes


def cache_seed(tenant: str, salt: str) -> bytes:
    """The seed of a prefix-cache partition's hash chain: b"" (the shared one) when both are empty.

    A digest, so a partition's seed is never the hash of some prompt's block (which would let a crafted
    salt line its first block up with another prompt's later one)."""
    if not (tenant or salt):
        return b""
    return hashlib.sha256(b"textgen prefix-cache partition\0" + f"{tenant}\0{salt}".encode()).digest()


class BlockAllocator:
    """Hands out block ids from a fixed pool; a sequence's blocks form its block table.

    Every block has a reference count (how many block tables hold it). A free block is either empty
    (`_free`) or cached (`_evictable`, least recently freed first), and both count as free: allocation
    takes empty blocks first, then evicts cached ones. Only blocks handed to `cache` are ever indexed.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # prefix hash -> the block holding its keys and values
        self._hash_of: dict[int, bytes] = {}
        self.events: KvEventLog | None = None  # told of every block indexed, evicted or cleared

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix index, held by sequences or not."""
        return len(self._block_of)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` to hold `num_tokens` slots; False (and no change) if the pool is short."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if missing > self.num_free:
            return False
        for _ in range(missing):
            block = self._free.popleft() if self._free else self._evict()
            self._refs[block] = 1
            block_table.append(block)
        return True

    def reserve(self) -> int:
        """Take one free block out of the pool for good (the pool is one block smaller from now on)."""
        assert self._free, "no free block to reserve"
        self.num_blocks -= 1
        return self._free.pop()

    def free(self, block_table: list[int]) -> None:
        """Release every block of `block_table` and empty it; blocks nobody holds any more become free.

        Last blocks first, so that a prompt's later blocks (the least likely to be shared) are evicted
        before its first ones.
        """
        for block in reversed(block_table):
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()
        assert self.num_free <= self.num_blocks

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first (nothing is taken)."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, block_table: list[int], blocks: list[int]) -> None:
        """Append `blocks` (computed elsewhere: cached, or a sibling's) to `block_table`, holding each."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            block_table.append(block)

    def cache(self, block: int, block_hash: bytes, parent_hash: bytes | None, token_ids: list[int]) -> None:
        """Index a held, fully computed block under its prefix hash, unless that prefix is indexed already;
        `parent_hash` is the previous block's (None for the first) and `token_ids` the block's tokens."""
        if block_hash not in self._block_of and block not in self._hash_of:
            assert self._refs[block] > 0
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash
            if self.events is not None:
                self.events.stored(block_hash, parent_hash, token_ids)

    def clear_cache(self) -> int:
        """Drop the whole prefix index (blocks in use stay with their sequences, unshared from now on);
        returns how many blocks it held."""
        num_cached = len(self._block_of)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()
        if self.events is not None:
            self.events.cleared()
        return num_cached

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        block_hash = self._hash_of.pop(block)
        del self._block_of[block_hash]
        if self.events is not None:
            self.events.removed(block_hash)
        return block


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU in fresh pages from the OS (numpy's calloc), zeroed as they are first written
    instead of all at start (a second or more for the default 1 GiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


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
        self.data = _zeros(shape, dtype, torch.device(device))
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

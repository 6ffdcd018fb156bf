"""BlockAllocator hands out fixed-size blocks; KVCache is one preallocated tensor addressed by slot."""

from __future__ import annotations

import random

import pytest
import torch

from engine.core.kv_cache import BlockAllocator, KVCache
from engine.execution.model_runner import ModelRunner
from engine.frontend.engine import EngineConfig
from service.config import parse_config


def test_blocks_needed_rounds_tokens_up_to_whole_blocks():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    assert [allocator.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_block_table_by_ceil_of_tokens_over_block_size():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    table: list[int] = []
    sizes = []
    for num_tokens in (1, 4, 5, 13):
        assert allocator.allocate(table, num_tokens)
        sizes.append(len(table))
    assert sizes == [1, 1, 2, 4]
    assert allocator.num_free == 4


def test_allocate_for_tokens_already_covered_takes_no_block():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    table: list[int] = []
    allocator.allocate(table, 8)
    before = list(table)
    assert allocator.allocate(table, 3)
    assert table == before and allocator.num_free == 6


def test_allocate_when_the_pool_is_short_returns_false_and_changes_nothing():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    first: list[int] = []
    assert allocator.allocate(first, 12)  # 3 of the 4 blocks
    grown_before = list(first)
    second: list[int] = []
    assert not allocator.allocate(second, 8)  # needs 2, 1 left
    assert not allocator.allocate(first, 20)  # needs 2 more, 1 left
    assert second == [] and first == grown_before
    assert allocator.num_free == 1
    assert allocator.allocate(second, 4)  # the untouched block is still there


def test_free_returns_the_blocks_and_empties_the_table():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    table: list[int] = []
    allocator.allocate(table, 16)
    assert allocator.num_free == 0
    allocator.free(table)
    assert table == []
    assert allocator.num_free == 4
    again: list[int] = []
    assert allocator.allocate(again, 16)


def test_no_block_is_ever_held_by_two_tables():
    allocator = BlockAllocator(num_blocks=16, block_size=4)
    rng = random.Random(0)
    tables: list[list[int]] = [[] for _ in range(5)]
    for _ in range(300):
        table = rng.choice(tables)
        if rng.random() < 0.3:
            allocator.free(table)
        else:
            allocator.allocate(table, len(table) * 4 + rng.randint(1, 9))
        held = [block for t in tables for block in t]
        assert len(held) == len(set(held))
        assert len(held) + allocator.num_free == 16
        assert all(0 <= block < 16 for block in held)


def make_cache(dtype: torch.dtype = torch.float32) -> KVCache:
    return KVCache(
        num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype, device="cpu"
    )


def test_kv_cache_holds_keys_and_values_for_every_layer_and_slot():
    cache = make_cache(torch.bfloat16)
    assert cache.data.shape == (2, 3, 2, 5 * 4, 8)  # heads before slots
    assert cache.data.dtype == torch.bfloat16
    assert cache.allocator.num_blocks == 5 and cache.allocator.block_size == 4


def test_layer_returns_views_into_the_cache():
    cache = make_cache()
    keys, values = cache.layer(1)
    assert keys.shape == values.shape == (2, 20, 8)
    keys[:, 7] = 1.0
    values[:, 7] = 2.0
    assert bool((cache.data[0, 1, :, 7] == 1.0).all()) and bool((cache.data[1, 1, :, 7] == 2.0).all())
    assert int(cache.data.count_nonzero()) == 2 * 2 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_block_is_the_cache_memory_per_block(dtype):
    per_block = KVCache.bytes_per_block(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)
    cache = make_cache(dtype)
    assert per_block == 2 * 3 * 4 * 2 * 8 * dtype.itemsize
    assert cache.data.numel() * cache.data.element_size() == 5 * per_block


@pytest.mark.parametrize("block_size", [3, 12, 24])
def test_a_block_size_that_is_not_a_power_of_two_is_refused_at_start(block_size, capsys):
    with pytest.raises(ValueError, match=f"power of two .*not {block_size}"):
        EngineConfig(kv_block_size=block_size)
    with pytest.raises(ValueError, match="power of two"):  # before it loads anything
        ModelRunner("/nonexistent", "cpu", "float32", num_kv_blocks=8, block_size=block_size)
    with pytest.raises(SystemExit):
        parse_config(["--kv-block-size", str(block_size)])
    assert f"the KV block size must be a power of two (1, 2, 4, 8, 16, ...), not {block_size}" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("block_size", [1, 2, 16, 128])
def test_power_of_two_block_sizes_are_accepted(block_size):
    assert parse_config(["--kv-block-size", str(block_size)]).engine.kv_block_size == block_size

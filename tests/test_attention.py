"""paged_attention against plain causal attention: packed and chunked prefill, padded decode, cache writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine.core.kv_cache import KVCache
from engine.execution import attention
from engine.execution.attention import PrefillSegment, StepContext, paged_attention

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE = 2, 8, 4
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
LAYER = SimpleNamespace(layer_idx=1)  # the one attribute paged_attention reads from the module


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def kv_cache(rng) -> KVCache:
    """A cache full of random values, so that reading a wrong slot changes the result."""
    cache = KVCache(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    cache.data.copy_(torch.randn(cache.data.shape, generator=rng))
    return cache


@pytest.fixture(autouse=True)
def clear_context():
    yield
    attention.set_context(None)


def random_qkv(num_tokens: int, rng: torch.Generator):
    """query [heads, tokens, dim], key and value [kv_heads, tokens, dim] for one sequence."""
    q = torch.randn(NUM_HEADS, num_tokens, HEAD_DIM, generator=rng)
    k = torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=rng)
    v = torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=rng)
    return q, k, v


def slots_of(block_table: list[int], positions: range) -> torch.Tensor:
    return torch.tensor([block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions])


def reference(q, k, v, offset: int = 0) -> torch.Tensor:
    """Causal attention of queries at positions offset.. over keys 0..: [tokens, heads, dim]."""
    group = NUM_HEADS // NUM_KV_HEADS
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    rows = torch.arange(q.shape[1])[:, None] + offset
    mask = torch.arange(k.shape[1])[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


def run_step(context: StepContext, q, k, v) -> torch.Tensor:
    """Call paged_attention as transformers does, on [1, heads, tokens, dim]; return [tokens, heads, dim]."""
    attention.set_context(context)
    out, weights = paged_attention(LAYER, q[None], k[None], v[None], attention_mask=None)
    assert weights is None and out.shape == (1, q.shape[1], NUM_HEADS, HEAD_DIM)
    return out[0]


def prefill_context(kv_cache, tables: list[list[int]], starts: list[int], lengths: list[int]) -> StepContext:
    """A prefill step running tokens [start, start + length) of each sequence."""
    segments, new_slots, row = [], [], 0
    for table, start, n in zip(tables, starts, lengths, strict=True):
        segments.append(PrefillSegment(row, row + n, start + n, slots_of(table, range(start + n))))
        new_slots.append(slots_of(table, range(start, start + n)))
        row += n
    return StepContext(kv_cache, torch.cat(new_slots), is_prefill=True, segments=segments)


def test_prefill_of_two_packed_sequences_matches_causal_attention(kv_cache, rng):
    a, b = random_qkv(5, rng), random_qkv(3, rng)
    context = prefill_context(kv_cache, [[3, 1], [6]], starts=[0, 0], lengths=[5, 3])
    out = run_step(context, *(torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)))
    torch.testing.assert_close(out[:5], reference(*a), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[5:], reference(*b), rtol=0, atol=1e-5)


def test_prefill_writes_new_keys_and_values_to_their_slots_only(kv_cache, rng):
    before = kv_cache.data.clone()
    a, b = random_qkv(5, rng), random_qkv(3, rng)
    context = prefill_context(kv_cache, [[3, 1], [6]], starts=[0, 0], lengths=[5, 3])
    run_step(context, *(torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)))
    keys, values = kv_cache.layer(1)
    slots_a, slots_b = slots_of([3, 1], range(5)), slots_of([6], range(3))
    assert slots_a.tolist() == [12, 13, 14, 15, 4]
    torch.testing.assert_close(keys[:, slots_a], a[1], rtol=0, atol=0)
    torch.testing.assert_close(values[:, slots_a], a[2], rtol=0, atol=0)
    torch.testing.assert_close(keys[:, slots_b], b[1], rtol=0, atol=0)
    torch.testing.assert_close(values[:, slots_b], b[2], rtol=0, atol=0)
    untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[torch.cat([slots_a, slots_b])] = False
    assert torch.equal(kv_cache.data[:, 1, :, untouched], before[:, 1, :, untouched])
    assert torch.equal(kv_cache.data[:, 0], before[:, 0])  # another layer's cache


def test_second_prefill_chunk_reads_the_first_chunks_keys_from_the_cache(kv_cache, rng):
    table = [5, 2, 7]  # not contiguous, not in order
    q, k, v = random_qkv(10, rng)
    first = run_step(
        prefill_context(kv_cache, [table], starts=[0], lengths=[6]), q[:, :6], k[:, :6], v[:, :6]
    )
    second = run_step(
        prefill_context(kv_cache, [table], starts=[6], lengths=[4]), q[:, 6:], k[:, 6:], v[:, 6:]
    )
    expected = reference(q, k, v)
    torch.testing.assert_close(first, expected[:6], rtol=0, atol=1e-5)
    torch.testing.assert_close(second, expected[6:], rtol=0, atol=1e-5)


def test_chunked_and_fresh_sequences_packed_in_one_prefill_step(kv_cache, rng):
    table_a, table_b = [5, 2, 7], [0, 4]
    a, b = random_qkv(10, rng), random_qkv(7, rng)
    run_step(prefill_context(kv_cache, [table_a], starts=[0], lengths=[6]), *(t[:, :6] for t in a))
    context = prefill_context(kv_cache, [table_a, table_b], starts=[6, 0], lengths=[4, 7])
    out = run_step(context, *(torch.cat([ta[:, 6:], tb], dim=1) for ta, tb in zip(a, b, strict=True)))
    torch.testing.assert_close(out[:4], reference(*a)[6:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[4:], reference(*b), rtol=0, atol=1e-5)


def decode_context(kv_cache, tables: list[list[int]], context_lens: list[int]) -> StepContext:
    """A decode step: one new token per sequence at position context_len - 1; tables padded with block 0."""
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.long)
    for i, table in enumerate(tables):
        block_tables[i, : len(table)] = torch.tensor(table)
    pairs = zip(tables, context_lens, strict=True)
    new_slots = torch.stack([slots_of(t, range(n - 1, n))[0] for t, n in pairs])
    lens = torch.tensor(context_lens)
    return StepContext(kv_cache, new_slots, is_prefill=False, block_tables=block_tables, context_lens=lens)


def write_context(kv_cache, table: list[int], k, v) -> None:
    """Put a sequence's earlier keys and values [kv_heads, tokens, dim] into its slots of the tested layer."""
    keys, values = kv_cache.layer(LAYER.layer_idx)
    slots = slots_of(table, range(k.shape[1]))
    keys[:, slots], values[:, slots] = k, v


DECODE_TABLES = [[3, 1], [6, 0, 2], [5]]
DECODE_LENGTHS = [5, 9, 2]  # the new token included; slot 0 (padding) belongs to the second sequence


def test_decode_of_three_sequences_with_different_context_lengths_matches_attention(kv_cache, rng):
    sequences = [random_qkv(n, rng) for n in DECODE_LENGTHS]
    for table, (_, k, v) in zip(DECODE_TABLES, sequences, strict=True):
        write_context(kv_cache, table, k[:, :-1], v[:, :-1])
    new = [torch.cat([s[i][:, -1:] for s in sequences], dim=1) for i in range(3)]  # one token per sequence
    out = run_step(decode_context(kv_cache, DECODE_TABLES, DECODE_LENGTHS), *new)
    for i, (q, k, v) in enumerate(sequences):
        expected = reference(q[:, -1:], k, v, offset=k.shape[1] - 1)[0]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_decode_writes_each_new_key_and_value_to_its_sequences_next_slot(kv_cache, rng):
    before = kv_cache.data.clone()
    new = random_qkv(3, rng)
    run_step(decode_context(kv_cache, DECODE_TABLES, DECODE_LENGTHS), *new)
    keys, values = kv_cache.layer(1)
    next_slots = torch.tensor([1 * 4 + 0, 2 * 4 + 0, 5 * 4 + 1])  # positions 4, 8 and 1
    torch.testing.assert_close(keys[:, next_slots], new[1], rtol=0, atol=0)
    torch.testing.assert_close(values[:, next_slots], new[2], rtol=0, atol=0)
    untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    untouched[next_slots] = False
    assert torch.equal(kv_cache.data[:, 1, :, untouched], before[:, 1, :, untouched])
    assert torch.equal(kv_cache.data[:, 0], before[:, 0])


def test_paged_attention_outside_a_step_fails_loudly(rng):
    q, k, v = random_qkv(2, rng)
    with pytest.raises(AssertionError, match="outside an engine step"):
        paged_attention(LAYER, q[None], k[None], v[None], attention_mask=None)


# ---- one SDPA call per prefill step (varlen prefill; what CUDA runs) --------------------------------------

PREFILL_SHAPES = {  # (block tables, first position, new tokens) of each sequence -> the plan's shape
    "padded": ([[0, 1], [2, 3], [4]], [0, 0, 0], [6, 5, 3]),
    "masked, new only": ([[0, 1, 2, 3], [5], [6]], [0, 0, 0], [14, 1, 2]),
    "masked, from the cache": ([[0, 1, 2], [4, 5]], [5, 0], [4, 7]),
}


def prefill_shape(kv_cache, rng, tables, starts, lengths):
    """Cache the sequences' earlier tokens; return the step's context, its new q, k, v, and the references."""
    sequences = [random_qkv(start + n, rng) for start, n in zip(starts, lengths, strict=True)]
    for table, start, (_, k, v) in zip(tables, starts, sequences, strict=True):
        if start:
            write_context(kv_cache, table, k[:, :start], v[:, :start])
    pairs = list(zip(sequences, starts, strict=True))
    new = [torch.cat([s[i][:, start:] for s, start in pairs], dim=1) for i in range(3)]
    references = [reference(*s)[start:] for s, start in pairs]
    return prefill_context(kv_cache, tables, starts, lengths), new, references


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_in_one_sdpa_call_equals_causal_attention_per_sequence(kv_cache, rng, monkeypatch, shape):
    tables, starts, lengths = PREFILL_SHAPES[shape]
    context, (q, k, v), references = prefill_shape(kv_cache, rng, tables, starts, lengths)
    k_cache, v_cache = kv_cache.layer(LAYER.layer_idx)
    k_cache[:, context.slot_mapping], v_cache[:, context.slot_mapping] = k, v  # as `attend` does first
    plan = attention.plan_prefill(context.segments, context.slot_mapping, torch.float32, one_call=True)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = attention.prefill_attention(q, k, v, k_cache, v_cache, plan, None)
    assert len(calls) == 1
    row = 0
    for n, expected in zip(lengths, references, strict=True):
        torch.testing.assert_close(out[row : row + n], expected, rtol=0, atol=1e-5)
        row += n


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_on_the_cpu_calls_sdpa_once_per_sequence(kv_cache, rng, monkeypatch, shape):
    tables, starts, lengths = PREFILL_SHAPES[shape]
    context, new, references = prefill_shape(kv_cache, rng, tables, starts, lengths)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    out = run_step(context, *new)
    assert len(calls) == len(lengths)
    torch.testing.assert_close(out, torch.cat(references), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "padded", "masked"),
    [("padded", True, False), ("masked, new only", False, True), ("masked, from the cache", False, True)],
)
def test_prefill_plan_pads_new_sequences_of_similar_length_and_masks_the_rest(shape, padded, masked):
    tables, starts, lengths = PREFILL_SHAPES[shape]
    context = prefill_context(None, tables, starts, lengths)
    plan = attention.plan_prefill(context.segments, context.slot_mapping, torch.float32, one_call=True)
    assert (plan.padded_rows is not None, plan.mask is not None) == (padded, masked)
    assert (plan.context_slots is not None) == (shape == "masked, from the cache")


def test_prefill_mask_lets_a_query_see_its_own_sequences_earlier_keys_only():
    context = prefill_context(None, [[0], [1]], starts=[2, 0], lengths=[2, 2])
    plan = attention.plan_prefill(context.segments, context.slot_mapping, torch.float32, one_call=True)
    seen = (plan.mask == 0).int().tolist()  # rows: a's tokens at positions 2, 3; b's at 0, 1
    assert seen == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]

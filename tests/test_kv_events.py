"""The prefix cache's events (engine/core/kv_events.py): what the allocator reports, how batches are read."""

from __future__ import annotations

import time
from array import array

from engine.core.kv_cache import BlockAllocator, block_hashes
from engine.core.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEventLog
from engine.request import StoppingParams


def watched_allocator(num_blocks: int = 4, block_size: int = 2) -> tuple[BlockAllocator, KvEventLog]:
    allocator = BlockAllocator(num_blocks, block_size)
    allocator.events = KvEventLog(block_size)
    return allocator, allocator.events


def cache_prompt(allocator: BlockAllocator, tokens: list[int]) -> list[int]:
    """Allocate and index every full block of `tokens`, as a finished prefill does."""
    table: list[int] = []
    assert allocator.allocate(table, len(tokens))
    bs = allocator.block_size
    hashes = block_hashes(tokens, bs, [])
    for index, block_hash in enumerate(hashes):
        parent = hashes[index - 1] if index else None
        allocator.cache(table[index], block_hash, parent, tokens[index * bs : (index + 1) * bs])
    return table


def test_a_prompts_blocks_are_one_stored_event_chained_from_no_parent():
    allocator, log = watched_allocator()
    cache_prompt(allocator, [1, 2, 3, 4, 5])
    log.publish()
    (batch,) = log.since(0)
    (stored,) = batch.events
    assert isinstance(stored, BlocksStored)
    assert (stored.block_hashes, stored.parent_hash) == (block_hashes([1, 2, 3, 4], 2, []), None)
    assert list(stored.token_ids) == [1, 2, 3, 4]
    assert batch.sequence_number == log.base + 1


def test_an_evicted_block_is_removed_and_a_block_indexed_twice_is_stored_once():
    allocator, log = watched_allocator(num_blocks=4)
    allocator.free(cache_prompt(allocator, [1, 2, 3, 4]))
    cache_prompt(allocator, [1, 2, 3, 4])  # other blocks (no lookup here), the same hashes: indexed already
    log.publish()
    assert [type(e) for e in log.since(0)[0].events] == [BlocksStored]
    table: list[int] = []
    assert allocator.allocate(table, 4)  # no empty block left: evicts both cached ones
    log.publish()
    (removed,) = log.since(log.base + 1)[0].events
    assert isinstance(removed, BlocksRemoved)
    assert sorted(removed.block_hashes) == sorted(block_hashes([1, 2, 3, 4], 2, []))


def test_clearing_the_cache_frees_unheld_blocks_and_voids_the_batch_so_far():
    allocator, log = watched_allocator()
    allocator.free(cache_prompt(allocator, [1, 2, 3, 4]))
    held = cache_prompt(allocator, [5, 6])
    assert allocator.clear_cache() == 3
    assert allocator.num_cached == 0 and allocator.num_free == 3
    allocator.free(held)
    assert allocator.num_free == 4
    log.publish()
    assert log.since(0)[0].events == (AllBlocksCleared(),)


def test_since_resumes_after_a_number_and_refuses_what_the_history_lost():
    log = KvEventLog(block_size=2, max_batches=2, base=100)
    for token in range(3):
        log.stored(bytes([token]), None, [token, token])
        log.publish()
    assert [b.sequence_number for b in log.since(101)] == [102, 103]
    assert log.since(103) == []
    assert log.since(0) is None  # batch 101 is gone
    assert log.since(100) is None
    assert log.since(104) is None  # never published


def test_since_zero_is_every_batch_while_the_history_reaches_back_to_the_first():
    log = KvEventLog(block_size=2, base=100)
    assert log.since(0) == [] and log.last_sequence_number == 100
    log.removed(b"x")
    log.publish()
    assert [b.sequence_number for b in log.since(0)] == [101]


def test_a_log_counts_on_from_its_creation_time_in_microseconds(monkeypatch):
    monkeypatch.setattr(time, "time_ns", lambda: 1_765_000_000_123_456_789)
    log = KvEventLog(block_size=2)
    log.removed(b"x")
    log.publish()
    assert [b.sequence_number for b in log.since(0)] == [1_765_000_000_123_457]


def test_a_cursor_from_an_earlier_log_is_not_one_of_a_later_logs_numbers():
    earlier = KvEventLog(block_size=2)
    for _ in range(3):
        earlier.removed(b"x")
        earlier.publish()
    while time.time_ns() // 1000 <= earlier.last_sequence_number:  # a restart takes seconds, not 3 us
        pass
    later = KvEventLog(block_size=2)  # the restarted server process
    later.removed(b"y")
    later.publish()
    assert later.since(0)[0].sequence_number > earlier.last_sequence_number
    assert later.since(earlier.last_sequence_number) is None


def test_a_snapshot_is_a_clear_then_the_index_as_the_published_batches_left_it():
    log = KvEventLog(block_size=2, max_batches=1, base=100)
    log.stored(b"a", None, [1, 2])
    log.stored(b"b", b"a", [3, 4])
    log.stored(b"x", None, [9, 9])
    log.publish()
    log.removed(b"x")
    log.stored(b"c", b"b", [5, 6])
    log.publish()
    log.stored(b"unpublished", None, [7, 7])
    assert log.since(0) is None  # the history lost batch 101

    snapshot = log.snapshot()

    assert (snapshot.sequence_number, snapshot.snapshot) == (102, True)
    assert snapshot.events == (
        AllBlocksCleared(),
        BlocksStored([b"a", b"b", b"c"], None, array("i", range(1, 7))),
    )


def test_a_snapshot_leaves_out_a_chain_whose_parent_was_evicted():
    log = KvEventLog(block_size=1)
    log.stored(b"a", None, [1])
    log.stored(b"b", b"a", [2])
    log.removed(b"a")
    log.stored(b"z", None, [3])
    log.publish()
    assert log.snapshot().events == (AllBlocksCleared(), BlocksStored([b"z"], None, array("i", [3])))


def test_a_snapshot_after_a_clear_holds_only_what_came_after_it():
    log = KvEventLog(block_size=1)
    log.stored(b"a", None, [1])
    log.publish()
    log.cleared()
    log.stored(b"b", None, [2])
    log.publish()
    assert log.snapshot().events == (AllBlocksCleared(), BlocksStored([b"b"], None, array("i", [2])))


def test_nothing_reported_publishes_nothing_and_subscribers_hear_of_each_batch():
    log = KvEventLog(block_size=2)
    heard = []
    log.subscribe(lambda: heard.append(log.last_sequence_number))
    log.publish()
    log.removed(b"x")
    log.publish()
    assert heard == [log.base + 1]


def test_the_engine_publishes_the_blocks_a_prompt_filled_by_the_time_it_ends(tiny_engine):
    log = tiny_engine.kv_events
    start = log.last_sequence_number
    bs = log.block_size
    prompt = list(range(100, 100 + 2 * bs + 1))
    tiny_engine.generate([prompt], stopping=StoppingParams(max_new_tokens=1, ignore_eos=True))
    stored = [e for batch in log.since(start) for e in batch.events if isinstance(e, BlocksStored)]
    assert [t for e in stored for t in e.token_ids] == prompt[: 2 * bs]
    assert stored[0].parent_hash is None
    assert stored[0].block_hashes == block_hashes(prompt, bs, [])

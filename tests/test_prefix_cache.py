"""Prefix caching: shared blocks are reference-counted, evicted least recently used, never change outputs;
a request that scores its prompt takes no cached blocks (their positions' logits are never computed)."""

from __future__ import annotations

import pytest
import torch

from engine.batching import BatchConfig
from engine.core.kv_cache import BlockAllocator, block_hashes
from engine.core.sequence import Sequence
from engine.errors import RequestCancelledError
from engine.request import GenerationRequest, SamplingParams, StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb
from tests.test_core import make_core, run_until_idle
from tests.test_engine import make_engine
from tests.test_scheduler import new_scheduler, run


def cached_table(allocator: BlockAllocator, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` and index every full one, as a finished prefill does."""
    table: list[int] = []
    assert allocator.allocate(table, len(tokens))
    bs = allocator.block_size
    parent = None
    for index, (block, block_hash) in enumerate(zip(table, block_hashes(tokens, bs, []), strict=False)):
        allocator.cache(block, block_hash, parent, tokens[index * bs : (index + 1) * bs])
        parent = block_hash
    return table


def test_block_hash_names_the_whole_prefix_not_only_the_block():
    same_block_after_other_prefixes = block_hashes([1, 2, 9, 9], 2, []), block_hashes([3, 4, 9, 9], 2, [])
    assert same_block_after_other_prefixes[0][1] != same_block_after_other_prefixes[1][1]
    assert block_hashes([1, 2, 9, 9, 5], 2, []) == block_hashes([1, 2, 9, 9], 2, [])


def test_a_freed_cached_block_counts_as_free_and_is_found_again():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    table = cached_table(allocator, [1, 2, 3, 4, 5])
    blocks = list(table)
    allocator.free(table)
    assert allocator.num_free == 4 and allocator.num_cached == 2
    assert allocator.cached_prefix(block_hashes([1, 2, 3, 4, 7, 7], 2, [])) == blocks[:2]


def test_a_shared_block_is_held_until_its_last_holder_frees_it():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    first = cached_table(allocator, [1, 2, 3, 4])
    second: list[int] = []
    allocator.share(second, allocator.cached_prefix(block_hashes([1, 2, 3, 4], 2, [])))
    assert second == first and allocator.num_free == 2
    allocator.free(first)
    assert allocator.num_free == 2  # the second table still holds both
    allocator.free(second)
    assert allocator.num_free == 4


def test_when_blocks_run_out_the_least_recently_freed_cached_block_is_evicted():
    allocator = BlockAllocator(num_blocks=3, block_size=2)
    old, new = cached_table(allocator, [1, 2]), cached_table(allocator, [5, 6])
    old_block = old[0]
    allocator.free(old)
    allocator.free(new)
    taken: list[int] = []
    assert allocator.allocate(taken, 4)  # the empty block, then the oldest cached one
    assert old_block in taken
    assert allocator.cached_prefix(block_hashes([1, 2], 2, [])) == []
    assert allocator.cached_prefix(block_hashes([5, 6], 2, [])) != []


def test_a_second_prompt_prefills_only_what_is_not_cached():
    scheduler = new_scheduler(block_size=4)
    first = GenerationRequest(list(range(1, 11)))
    scheduler.add(make_seq(first))
    run(scheduler, scheduler.schedule())
    second = make_seq(GenerationRequest(list(range(1, 10)) + [99, 98]))
    scheduler.add(second)
    step = scheduler.schedule()
    assert [(row.start_pos, row.token_ids) for row in step.rows] == [(8, [9, 99, 98])]
    assert second.num_cached_tokens == 8


def test_the_last_prompt_token_is_computed_even_when_the_whole_prompt_is_cached():
    scheduler = new_scheduler(block_size=4)
    scheduler.add(make_seq(GenerationRequest(list(range(1, 9)))))
    run(scheduler, scheduler.schedule())
    again = make_seq(GenerationRequest(list(range(1, 9))))
    scheduler.add(again)
    step = scheduler.schedule()
    assert [(row.start_pos, row.token_ids) for row in step.rows] == [(4, [5, 6, 7, 8])]
    assert again.num_cached_tokens == 4


def test_with_prefix_caching_off_nothing_is_shared():
    scheduler = new_scheduler(block_size=4, prefix_caching=False)
    scheduler.add(make_seq(GenerationRequest(list(range(1, 11)))))
    run(scheduler, scheduler.schedule())
    second = make_seq(GenerationRequest(list(range(1, 11))))
    scheduler.add(second)
    assert [row.start_pos for row in scheduler.schedule().rows] == [0]
    assert scheduler.allocator.num_cached == 0


def test_a_sequence_scoring_its_prompt_takes_no_cached_blocks():
    scheduler = new_scheduler(block_size=4)
    scheduler.add(make_seq(GenerationRequest(list(range(1, 11)))))
    run(scheduler, scheduler.schedule())
    scoring = make_seq(GenerationRequest(list(range(1, 11)), SamplingParams(prompt_logprobs=True)))
    scheduler.add(scoring)
    step = scheduler.schedule()
    assert [(row.start_pos, len(row.token_ids)) for row in step.rows] == [(0, 10)]
    assert scoring.num_cached_tokens == 0


def test_the_blocks_a_scoring_sequence_fills_are_cached_for_later_prompts():
    scheduler = new_scheduler(block_size=4)
    scheduler.add(make_seq(GenerationRequest(list(range(1, 11)), SamplingParams(prompt_logprobs=True))))
    run(scheduler, scheduler.schedule())
    later = make_seq(GenerationRequest(list(range(1, 11))))
    scheduler.add(later)
    assert [row.start_pos for row in scheduler.schedule().rows] == [8]
    assert later.num_cached_tokens == 8


def make_seq(request: GenerationRequest) -> Sequence:
    return Sequence(request, max_new_tokens=8)


# ---- on a tiny random-weight model: a cache hit never changes greedy output -------------------------------

SHARED = list(range(300, 340))  # 40 tokens: two and a half 16-token blocks


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path = tiny_model_dir("llama")
    made = {
        "uncached": make_engine(path, prefix_caching=False),
        "cached": make_engine(path),
        "cached_chunked": make_engine(path, batch=BatchConfig(max_batch_tokens=16)),
    }
    yield made
    for engine in made.values():
        engine.shutdown()


def greedy(engine, prompt: list[int]):
    return engine.generate([prompt], stopping=StoppingParams(max_new_tokens=12, ignore_eos=True))[0]


@pytest.mark.parametrize("name", ["cached", "cached_chunked"])
def test_greedy_output_with_a_hit_ending_mid_block_equals_the_uncached_output(engines, name):
    engine = engines[name]
    greedy(engine, SHARED + [7, 8, 9])
    prompt = SHARED + [500, 501, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511]
    hit = greedy(engine, prompt)
    assert hit.cached_prompt_tokens == 32  # two whole blocks; the shared half block is recomputed
    assert hit.token_ids == greedy(engines["uncached"], prompt).token_ids
    assert engine.load.num_free_kv_blocks == engine.load.num_kv_blocks


def test_a_prompt_that_continues_a_previous_output_reuses_the_output_blocks_too(engines):
    engine = engines["cached"]
    first = greedy(engine, list(range(600, 630)))
    follow_up = list(range(600, 630)) + first.token_ids + [42]
    hit = greedy(engine, follow_up)
    assert hit.cached_prompt_tokens == 32
    assert hit.token_ids == greedy(engines["uncached"], follow_up).token_ids


def test_prompt_logprobs_after_a_warm_up_with_the_same_prompt_equal_the_uncached_ones(engines):
    prompt = list(range(700, 740))  # 40 tokens: two whole blocks a hit would serve
    scoring = SamplingParams(prompt_logprobs=True, top_logprobs=2)
    greedy(engines["cached"], prompt)  # the warm-up fills the cache

    hit = engines["cached"].generate([prompt], scoring, StoppingParams(max_new_tokens=2))[0]
    cold = engines["uncached"].generate([prompt], scoring, StoppingParams(max_new_tokens=2))[0]

    assert hit.cached_prompt_tokens == 0
    assert [t.id for t in hit.prompt_logprobs] == prompt[1:]
    torch.testing.assert_close(
        torch.tensor([t.logprob for t in hit.prompt_logprobs]),
        torch.tensor([t.logprob for t in cold.prompt_logprobs]),
        rtol=0,
        atol=1e-5,
    )
    assert [[a.id for a in t.top_logprobs] for t in hit.prompt_logprobs] == [
        [a.id for a in t.top_logprobs] for t in cold.prompt_logprobs
    ]


def test_usage_reports_the_prompt_tokens_served_from_the_cache_over_grpc(stub):
    request = pb.GenerateRequest(
        prompt="A long system prompt that every caller shares. " * 8,
        stopping=pb.StoppingCriteria(max_new_tokens=3, ignore_eos=True),
    )
    first = stub.Generate(request, timeout=30)
    again = list(stub.GenerateStream(request, timeout=30))[-1]
    whole_blocks = (first.usage.prompt_tokens - 1) // 16 * 16
    assert first.usage.cached_prompt_tokens in (0, whole_blocks)  # another test may have sent it first
    assert again.usage.cached_prompt_tokens == whole_blocks > 0


def test_on_smollm2_a_prompt_served_from_the_cache_gives_the_same_greedy_output(smollm2_engine):
    prompt = smollm2_engine.tokenize("A prefix-cache check that no other test sends. " * 4)  # > 2 blocks
    stopping = StoppingParams(max_new_tokens=8, ignore_eos=True)
    cold, hit = (smollm2_engine.generate([prompt], stopping=stopping)[0] for _ in range(2))
    assert (cold.cached_prompt_tokens, hit.cached_prompt_tokens) == (0, (len(prompt) - 1) // 16 * 16)
    assert hit.token_ids == cold.token_ids


def test_preemption_and_cancellation_of_sequences_sharing_cached_blocks_leave_every_block_free():
    core, runner = make_core(num_blocks=8)  # 4-token blocks: three 21-token sequences need 14 even sharing
    stopping = StoppingParams(max_new_tokens=12, ignore_eos=True)
    seqs = [Sequence(GenerationRequest(list(range(20, 29)), stopping=stopping), 12) for _ in range(4)]
    for seq in seqs:
        runner.script[seq.seq_id] = [5] * 12
        core.add(seq)
    outbox: list = []
    for _ in range(3):
        core.step(outbox)
    core.abort(seqs[3].seq_id, RequestCancelledError("cancelled"), outbox)
    outbox += run_until_idle(core)
    assert sum(seq.num_preemptions for seq in seqs) > 0 and seqs[2].num_cached_tokens > 0
    assert all(seq.num_completion_tokens == 12 for seq in seqs[:3])
    assert core.scheduler.allocator.num_free == 8 and core.scheduler.allocator.num_cached > 0

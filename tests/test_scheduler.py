"""The scheduling policy step by step, on a fake clock: prefill or decode, chunks, preemption, static mode."""

from __future__ import annotations

import pytest

from engine.batching import BatchConfig
from engine.core.kv_cache import BlockAllocator
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.scheduling_modes import make_scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.step import Step, StepOutput
from engine.request import GenerationRequest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_sequence(
    num_tokens: int, priority: int = 0, arrival: float = 0.0, name: str | None = None
) -> Sequence:
    request = GenerationRequest(list(range(1, num_tokens + 1)), priority=priority, arrival_time=arrival)
    if name:
        request.request_id = name
    return Sequence(request=request, max_new_tokens=64)


def new_scheduler(num_blocks=64, block_size=4, clock=None, scheduling="continuous", **config) -> Scheduler:
    batch = BatchConfig(**{k: config.pop(k) for k in list(config) if k in BatchConfig.__dataclass_fields__})
    return make_scheduler(
        scheduling,
        SchedulerConfig(batch=batch, **config),
        BlockAllocator(num_blocks, block_size),
        max_context_len=1024,
        clock=clock or Clock(),
    )


def run(scheduler: Scheduler, step: Step) -> None:
    """Pretend the step ran: every row that samples gets token 7."""
    sampled = len(step.sampled_rows)
    scheduler.update(step, StepOutput([7] * sampled, [0.0] * sampled))


def ids(*seqs: Sequence) -> list[int]:
    return [seq.seq_id for seq in seqs]


def row_ids(step: Step) -> list[int]:
    return [row.seq_id for row in step.rows]


def test_nothing_to_do_gives_no_step():
    assert new_scheduler().schedule() is None


def test_a_ready_request_is_prefilled_before_running_sequences_decode():
    scheduler = new_scheduler()
    first = make_sequence(5)
    scheduler.add(first)
    run(scheduler, scheduler.schedule())
    second = make_sequence(3)
    scheduler.add(second)
    step = scheduler.schedule()
    assert step.is_prefill and row_ids(step) == ids(second)


def test_decode_comes_first_once_prefill_has_stalled_decoding_for_max_decode_stall_ms():
    clock = Clock()
    scheduler = new_scheduler(clock=clock, max_batch_tokens=4, max_decode_stall_ms=100)
    running = make_sequence(3)
    scheduler.add(running)
    run(scheduler, scheduler.schedule())
    scheduler.add(make_sequence(40))  # ten chunks of 4 tokens
    assert scheduler.schedule().is_prefill
    clock.now += 0.05
    assert scheduler.schedule().is_prefill
    clock.now += 0.06
    step = scheduler.schedule()
    assert not step.is_prefill and row_ids(step) == ids(running)
    assert scheduler.schedule().is_prefill  # the stall budget starts again after a decode


def test_a_long_prompt_is_prefilled_in_chunks_of_max_batch_tokens():
    scheduler = new_scheduler(max_batch_tokens=8)
    seq = make_sequence(20)
    scheduler.add(seq)
    sizes = []
    while seq.status is not SequenceStatus.RUNNING:
        step = scheduler.schedule()
        sizes.append(step.num_tokens)
        run(scheduler, step)
    assert sizes == [8, 8, 4]


def test_prefill_admits_no_more_than_the_free_sequence_slots():
    scheduler = new_scheduler(max_batch_size=2)
    for _ in range(3):
        scheduler.add(make_sequence(2))
    step = scheduler.schedule()
    assert len(step.rows) == 2 and scheduler.num_waiting == 1


def test_admission_waits_for_free_kv_blocks():
    scheduler = new_scheduler(num_blocks=3, block_size=4)
    big, small = make_sequence(10), make_sequence(4)
    scheduler.add(big)
    scheduler.add(small)
    step = scheduler.schedule()
    assert row_ids(step) == ids(big) and scheduler.num_waiting == 1


def test_blocks_running_out_preempts_the_lowest_priority_newest_sequence():
    scheduler = new_scheduler(num_blocks=3, block_size=4)
    old = make_sequence(4, priority=1, arrival=1.0, name="old")
    new = make_sequence(4, priority=0, arrival=2.0, name="new")
    vip = make_sequence(3, priority=5, arrival=3.0, name="vip")
    for seq in (old, new, vip):
        scheduler.add(seq)
    run(scheduler, scheduler.schedule())  # all three prefilled: 3 blocks in use, each has 1 token to append
    step = scheduler.schedule()
    assert not step.is_prefill
    assert step.preempted_seq_ids == ids(new)
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert set(row_ids(step)) == set(ids(old, vip))
    assert scheduler.num_waiting == 1


def test_finishing_returns_every_block():
    scheduler = new_scheduler(num_blocks=8)
    seqs = [make_sequence(5) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    run(scheduler, scheduler.schedule())
    for seq in seqs:
        scheduler.finish(seq)
    assert scheduler.allocator.num_free == 8 and not scheduler.running


def test_finishing_a_queued_sequence_removes_it_from_the_queue():
    scheduler = new_scheduler()
    seq = make_sequence(5)
    scheduler.add(seq)
    scheduler.finish(seq)
    assert scheduler.num_waiting == 0 and scheduler.schedule() is None


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_new_arrival_joins_a_running_batch_only_in_continuous_mode(mode):
    clock = Clock()
    scheduler = new_scheduler(clock=clock, scheduling=mode, max_batch_size=4, max_wait_ms=10)
    first = make_sequence(3)
    scheduler.add(first)
    clock.now += 1  # past max_wait_ms: static mode stops waiting for a full batch
    run(scheduler, scheduler.schedule())
    scheduler.add(make_sequence(3))
    clock.now += 1
    assert scheduler.schedule().is_prefill is (mode == "continuous")


def test_static_mode_keeps_finished_rows_until_the_batch_is_done():
    clock = Clock()
    scheduler = new_scheduler(clock=clock, scheduling="static", max_batch_size=2)
    short, long = make_sequence(3), make_sequence(3)
    scheduler.add(short)
    scheduler.add(long)
    run(scheduler, scheduler.schedule())
    scheduler.finish(short)
    assert short.seq_id in scheduler.padding and len(scheduler.schedule().rows) == 2
    scheduler.finish(long)
    assert not scheduler.running and scheduler.allocator.num_free == scheduler.allocator.num_blocks


def test_static_mode_waits_for_a_full_batch_or_max_wait_ms():
    clock = Clock()
    scheduler = new_scheduler(clock=clock, scheduling="static", max_batch_size=3, max_wait_ms=50)
    scheduler.add(make_sequence(3))
    assert scheduler.schedule() is None
    clock.now += 0.051
    assert scheduler.schedule().is_prefill


def test_unknown_scheduling_mode_is_refused():
    with pytest.raises(ValueError, match="scheduling"):
        new_scheduler(scheduling="fifo")


def test_a_prompt_being_scored_is_prefilled_at_most_512_tokens_per_step():
    scheduler = new_scheduler(num_blocks=512, max_batch_tokens=2048)
    scored, plain = make_sequence(700), make_sequence(300)
    scored.request.sampling.prompt_logprobs = True
    scheduler.add(scored)
    scheduler.add(plain)

    first = scheduler.schedule()
    run(scheduler, first)
    second = scheduler.schedule()

    assert [row.num_tokens for row in first.rows] == [512, 300]
    assert [row.num_tokens for row in second.rows] == [188] and second.rows[0].sample


# ---- n > 1: completions forked from completion 0 --------------------------------------------------------


def test_only_completion_0_waits_and_the_others_are_forked_into_the_queue_once_its_prompt_is_prefilled():
    scheduler = new_scheduler(prefix_caching=False)
    first = Sequence(GenerationRequest(list(range(1, 11)), n=3), max_new_tokens=8)
    scheduler.add(first)
    assert scheduler.num_waiting == 1 and list(scheduler.sequences) == ids(first)
    step = scheduler.schedule()
    assert row_ids(step) == ids(first)
    sampled = len(step.sampled_rows)
    result = scheduler.update(step, StepOutput([7] * sampled, [0.0] * sampled))

    forks = result.forked
    assert [seq.index for seq in forks] == [1, 2] and scheduler.num_waiting == 2
    assert all(seq.group_id == first.seq_id and seq.group is first.group for seq in forks)
    assert first.group.num_live == 3 and [seq.token_ids for seq in forks] == [list(range(1, 11))] * 2
    step = scheduler.schedule()
    assert step.is_prefill and row_ids(step) == ids(*forks)
    # Two whole prompt blocks of 4 come from completion 0: each fork computes only the last two tokens.
    assert [row.start_pos for row in step.rows] == [8, 8]
    assert all(seq.block_table[:2] == first.block_table[:2] for seq in forks)


def test_a_recomputed_completion_0_forks_nothing_again():
    scheduler = new_scheduler(num_blocks=4, prefix_caching=False)
    first = Sequence(GenerationRequest(list(range(1, 5)), n=2), max_new_tokens=64)
    scheduler.add(first)
    step = scheduler.schedule()
    sampled = len(step.sampled_rows)
    assert len(scheduler.update(step, StepOutput([7] * sampled, [0.0] * sampled)).forked) == 1
    fork = scheduler.sequences[max(scheduler.sequences)]
    scheduler.finish(fork)
    scheduler._preempt(first)  # as a decode step short of blocks would
    step = scheduler.schedule()
    assert step.is_prefill and row_ids(step) == ids(first)
    sampled = len(step.sampled_rows)
    assert scheduler.update(step, StepOutput([7] * sampled, [0.0] * sampled)).forked == []
    assert list(scheduler.sequences) == ids(first)

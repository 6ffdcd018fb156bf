"""The scheduling policy step by step, on a fake clock: prefill or decode, chunks, preemption, static mode."""

from __future__ import annotations

import pytest

from engine.batching import BatchConfig
from engine.kv_cache import BlockAllocator
from engine.request import GenerationRequest
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus


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
    return Sequence(request=request, max_new_tokens=64, detokenizer=None, sink=None)


def make_scheduler(num_blocks=64, block_size=4, clock=None, **config) -> Scheduler:
    batch = BatchConfig(**{k: config.pop(k) for k in list(config) if k in BatchConfig.__dataclass_fields__})
    return Scheduler(
        SchedulerConfig(batch=batch, **config), BlockAllocator(num_blocks, block_size), clock or Clock()
    )


def run(scheduler: Scheduler, step, sample: bool = True) -> None:
    """Pretend the step ran: record its chunks and append a token to every sequence that sampled."""
    for seq, n in step.chunks:
        if scheduler.finish_chunk(seq, n) and sample:
            seq.token_ids.append(7)


def test_nothing_to_do_gives_no_step():
    assert make_scheduler().schedule() is None


def test_a_ready_request_is_prefilled_before_running_sequences_decode():
    scheduler = make_scheduler()
    first = make_sequence(5)
    scheduler.add(first)
    run(scheduler, scheduler.schedule())
    second = make_sequence(3)
    scheduler.add(second)
    step = scheduler.schedule()
    assert step.is_prefill and [s for s, _ in step.chunks] == [second]


def test_decode_comes_first_once_prefill_has_stalled_decoding_for_max_decode_stall_ms():
    clock = Clock()
    scheduler = make_scheduler(clock=clock, max_batch_tokens=4, max_decode_stall_ms=100)
    running = make_sequence(3)
    scheduler.add(running)
    run(scheduler, scheduler.schedule())
    scheduler.add(make_sequence(40))  # ten chunks of 4 tokens
    assert scheduler.schedule().is_prefill
    clock.now += 0.05
    assert scheduler.schedule().is_prefill
    clock.now += 0.06
    step = scheduler.schedule()
    assert not step.is_prefill and [s for s, _ in step.chunks] == [running]
    assert scheduler.schedule().is_prefill  # the stall budget starts again after a decode


def test_a_long_prompt_is_prefilled_in_chunks_of_max_batch_tokens():
    scheduler = make_scheduler(max_batch_tokens=8)
    seq = make_sequence(20)
    scheduler.add(seq)
    sizes = []
    while seq.status is not SequenceStatus.RUNNING:
        step = scheduler.schedule()
        sizes.append(step.num_tokens)
        run(scheduler, step)
    assert sizes == [8, 8, 4]


def test_prefill_admits_no_more_than_the_free_sequence_slots():
    scheduler = make_scheduler(max_batch_size=2)
    for _ in range(3):
        scheduler.add(make_sequence(2))
    step = scheduler.schedule()
    assert len(step.chunks) == 2 and scheduler.num_waiting == 1


def test_admission_waits_for_free_kv_blocks():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    big, small = make_sequence(10), make_sequence(4)
    scheduler.add(big)
    scheduler.add(small)
    step = scheduler.schedule()
    assert [s for s, _ in step.chunks] == [big] and scheduler.num_waiting == 1


def test_blocks_running_out_preempts_the_lowest_priority_newest_sequence():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    old = make_sequence(4, priority=1, arrival=1.0, name="old")
    new = make_sequence(4, priority=0, arrival=2.0, name="new")
    vip = make_sequence(3, priority=5, arrival=3.0, name="vip")
    for seq in (old, new, vip):
        scheduler.add(seq)
    run(scheduler, scheduler.schedule())  # all three prefilled: 3 blocks in use, each has 1 token to append
    step = scheduler.schedule()
    assert not step.is_prefill
    assert step.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert {s.id for s, _ in step.chunks} == {"old", "vip"}
    assert scheduler.num_waiting == 1


def test_finishing_returns_every_block():
    scheduler = make_scheduler(num_blocks=8)
    seqs = [make_sequence(5) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    run(scheduler, scheduler.schedule())
    for seq in seqs:
        scheduler.finish(seq)
    assert scheduler.allocator.num_free == 8 and not scheduler.running


def test_finishing_a_queued_sequence_removes_it_from_the_queue():
    scheduler = make_scheduler()
    seq = make_sequence(5)
    scheduler.add(seq)
    scheduler.finish(seq)
    assert scheduler.num_waiting == 0 and scheduler.schedule() is None


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_new_arrival_joins_a_running_batch_only_in_continuous_mode(mode):
    clock = Clock()
    scheduler = make_scheduler(clock=clock, scheduling=mode, max_batch_size=4, max_wait_ms=10)
    first = make_sequence(3)
    scheduler.add(first)
    clock.now += 1  # past max_wait_ms: static mode stops waiting for a full batch
    run(scheduler, scheduler.schedule())
    scheduler.add(make_sequence(3))
    clock.now += 1
    assert scheduler.schedule().is_prefill is (mode == "continuous")


def test_static_mode_keeps_finished_rows_until_the_batch_is_done():
    clock = Clock()
    scheduler = make_scheduler(clock=clock, scheduling="static", max_batch_size=2)
    short, long = make_sequence(3), make_sequence(3)
    scheduler.add(short)
    scheduler.add(long)
    run(scheduler, scheduler.schedule())
    scheduler.finish(short)
    assert short.padding_only and len(scheduler.schedule().chunks) == 2
    scheduler.finish(long)
    assert not scheduler.running and scheduler.allocator.num_free == scheduler.allocator.num_blocks


def test_static_mode_waits_for_a_full_batch_or_max_wait_ms():
    clock = Clock()
    scheduler = make_scheduler(clock=clock, scheduling="static", max_batch_size=3, max_wait_ms=50)
    scheduler.add(make_sequence(3))
    assert scheduler.schedule() is None
    clock.now += 0.051
    assert scheduler.schedule().is_prefill


def test_unknown_scheduling_mode_is_refused():
    with pytest.raises(ValueError, match="scheduling"):
        SchedulerConfig(scheduling="fifo")

"""Tests for engine.batching: when a batch forms, what it takes, and the queue operations around it."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import astuple

import pytest

from engine.batching import Batch, BatchConfig, BatchRequest, ContinuousBatcher


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_batcher(clock: FakeClock | None = None, **config: float) -> ContinuousBatcher:
    return ContinuousBatcher(BatchConfig(**config), clock=clock or FakeClock())


def req(rid: str, input_tokens: int = 10, priority: int = 0) -> BatchRequest:
    return BatchRequest(id=rid, input_tokens=input_tokens, max_new_tokens=16, priority=priority)


def ids(batch: Batch | None) -> list[str]:
    assert batch is not None
    return [r.id for r in batch.requests]


def test_config_defaults() -> None:
    assert astuple(BatchConfig()) == (32, 4096, 1, 50)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_tokens": 0},
        {"min_batch_size": 0},
        {"max_batch_size": 4, "min_batch_size": 5},
        {"max_wait_ms": -1},
    ],
)
def test_invalid_config_raises(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        BatchConfig(**kwargs)


def test_config_edges_are_valid() -> None:
    BatchConfig(max_batch_size=1, max_batch_tokens=1, min_batch_size=1, max_wait_ms=0)
    BatchConfig(max_batch_size=8, min_batch_size=8)


def test_empty_queue_returns_none() -> None:
    assert make_batcher().try_form_batch() is None


def test_waits_for_min_batch_size() -> None:
    batcher = make_batcher(min_batch_size=3)
    batcher.add(req("a"))
    batcher.add(req("b"))
    assert batcher.try_form_batch() is None
    batcher.add(req("c"))
    assert ids(batcher.try_form_batch()) == ["a", "b", "c"]


def test_forms_after_max_wait_ms() -> None:
    clock = FakeClock()
    batcher = make_batcher(clock, min_batch_size=4, max_wait_ms=50)
    batcher.add(req("a"))
    clock.now += 0.049
    assert batcher.try_form_batch() is None
    clock.now += 0.001
    assert ids(batcher.try_form_batch()) == ["a"]


def test_ready_tells_whether_a_batch_would_form() -> None:
    clock = FakeClock()
    batcher = make_batcher(clock, min_batch_size=2, max_wait_ms=10)
    assert not batcher.ready()
    batcher.add(req("a"))
    assert not batcher.ready()
    clock.now += 0.010
    assert batcher.ready()


def test_priority_then_fifo() -> None:
    batcher = make_batcher()
    for rid, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("mid", 1), ("high2", 5)]:
        batcher.add(req(rid, priority=priority))
    assert ids(batcher.try_form_batch()) == ["high1", "high2", "mid", "low1", "low2"]


def test_never_exceeds_max_batch_size() -> None:
    batcher = make_batcher(max_batch_size=3)
    for i in range(7):
        batcher.add(req(f"r{i}"))
    assert [len(ids(batcher.try_form_batch())) for _ in range(3)] == [3, 3, 1]


def test_never_exceeds_max_batch_tokens() -> None:
    batcher = make_batcher(max_batch_tokens=100)
    for i in range(10):
        batcher.add(req(f"r{i}", input_tokens=30))
    batch = batcher.try_form_batch()
    assert batch is not None
    assert batch.size == 3
    assert batch.total_input_tokens == 90


def test_batch_may_fill_max_batch_tokens_exactly() -> None:
    batcher = make_batcher(max_batch_tokens=100)
    for i in range(3):
        batcher.add(req(f"r{i}", input_tokens=50))
    assert batcher.try_form_batch().total_input_tokens == 100


def test_stops_at_first_request_that_does_not_fit() -> None:
    batcher = make_batcher(max_batch_tokens=100)
    batcher.add(req("small", input_tokens=40))
    batcher.add(req("big", input_tokens=80))
    batcher.add(req("tiny", input_tokens=10))
    assert ids(batcher.try_form_batch()) == ["small"]
    assert ids(batcher.try_form_batch()) == ["big", "tiny"]


def test_tighter_step_limits() -> None:
    batcher = make_batcher(max_batch_size=8, max_batch_tokens=1000)
    for i in range(6):
        batcher.add(req(f"r{i}", input_tokens=10))
    assert ids(batcher.try_form_batch(max_batch_size=2)) == ["r0", "r1"]
    assert ids(batcher.try_form_batch(max_batch_tokens=25)) == ["r2", "r3"]


def test_looser_step_limits_are_ignored() -> None:
    batcher = make_batcher(max_batch_size=2, max_batch_tokens=15)
    for i in range(4):
        batcher.add(req(f"r{i}", input_tokens=5))
    batch = batcher.try_form_batch(max_batch_size=100, max_batch_tokens=10_000)
    assert batch is not None
    assert batch.size == 2


@pytest.mark.parametrize("limits", [{"max_batch_size": 0}, {"max_batch_tokens": 0}, {"max_batch_tokens": 5}])
def test_step_limit_that_fits_nothing_leaves_queue_untouched(limits: dict[str, int]) -> None:
    batcher = make_batcher()
    batcher.add(req("a", input_tokens=10))
    batcher.add(req("b", input_tokens=10))
    assert batcher.try_form_batch(**limits) is None
    assert len(batcher) == 2
    assert ids(batcher.try_form_batch()) == ["a", "b"]


def test_oversized_first_request_goes_alone() -> None:
    batcher = make_batcher(max_batch_tokens=100)
    batcher.add(req("huge", input_tokens=500))
    batcher.add(req("small", input_tokens=10))
    assert ids(batcher.try_form_batch()) == ["huge"]
    assert ids(batcher.try_form_batch()) == ["small"]


def test_oversized_request_waits_while_step_token_limit_is_tighter() -> None:
    batcher = make_batcher(max_batch_tokens=100)
    batcher.add(req("huge", input_tokens=500))
    assert batcher.try_form_batch(max_batch_tokens=99) is None
    assert ids(batcher.try_form_batch(max_batch_tokens=100)) == ["huge"]


def test_oversized_request_behind_others_goes_alone_on_its_turn() -> None:
    batcher = make_batcher(max_batch_tokens=100)
    batcher.add(req("small", input_tokens=10))
    batcher.add(req("huge", input_tokens=500))
    batcher.add(req("tiny", input_tokens=5))
    assert ids(batcher.try_form_batch()) == ["small"]
    assert ids(batcher.try_form_batch()) == ["huge"]
    assert ids(batcher.try_form_batch()) == ["tiny"]


def test_wait_times() -> None:
    clock = FakeClock()
    batcher = make_batcher(clock)
    batcher.add(req("a"))
    clock.now += 1.0
    batcher.add(req("b"))
    clock.now += 2.0
    batch = batcher.try_form_batch()
    assert batch is not None
    assert batch.max_wait_time == pytest.approx(3.0)
    assert batch.avg_wait_time == pytest.approx(2.5)


def test_add_stamps_arrival_time() -> None:
    clock = FakeClock()
    batcher = make_batcher(clock)
    request = req("a")
    batcher.add(request)
    assert request.arrival_time == clock.now


def test_peek_oldest_wait() -> None:
    clock = FakeClock()
    batcher = make_batcher(clock)
    assert batcher.peek_oldest_wait() is None
    batcher.add(req("old", priority=0))
    clock.now += 2.0
    batcher.add(req("new", priority=9))
    clock.now += 1.0
    assert batcher.peek_oldest_wait() == pytest.approx(3.0)


def test_with_priority_returns_copy() -> None:
    request = req("a", priority=1)
    request.payload = object()
    bumped = request.with_priority(7)
    assert bumped is not request
    assert (bumped.priority, request.priority) == (7, 1)
    assert (bumped.id, bumped.input_tokens, bumped.max_new_tokens) == ("a", 10, 16)
    assert bumped.payload is request.payload


def test_payload_is_not_in_repr_or_eq() -> None:
    one = BatchRequest(id="a", input_tokens=1, max_new_tokens=1, payload="sequence-1")
    two = BatchRequest(id="a", input_tokens=1, max_new_tokens=1, payload="sequence-2")
    assert one == two
    assert "sequence-1" not in repr(one)


def test_len_counts_queued_requests() -> None:
    batcher = make_batcher(max_batch_size=2)
    for i in range(3):
        batcher.add(req(f"r{i}"))
    assert len(batcher) == 3
    batcher.try_form_batch()
    assert len(batcher) == 1


def test_add_duplicate_id_raises() -> None:
    batcher = make_batcher()
    batcher.add(req("a"))
    with pytest.raises(ValueError):
        batcher.add(req("a"))


def test_remove_queued_request() -> None:
    batcher = make_batcher()
    for rid in ["a", "b", "c"]:
        batcher.add(req(rid))
    removed = batcher.remove("b")
    assert removed is not None and removed.id == "b"
    assert len(batcher) == 2
    assert ids(batcher.try_form_batch()) == ["a", "c"]


def test_remove_unknown_request_returns_none() -> None:
    batcher = make_batcher()
    batcher.add(req("a"))
    assert batcher.remove("missing") is None
    assert len(batcher) == 1


def test_requeue_keeps_original_order() -> None:
    batcher = make_batcher()
    for rid in ["a", "b", "c", "d"]:
        batcher.add(req(rid))
    preempted = batcher.try_form_batch(max_batch_size=2).requests
    batcher.add(req("e"))
    batcher.requeue(reversed(preempted))
    assert ids(batcher.try_form_batch()) == ["a", "b", "c", "d", "e"]


def test_requeue_keeps_original_arrival_time() -> None:
    clock = FakeClock()
    batcher = make_batcher(clock)
    batcher.add(req("a"))
    clock.now += 1.0
    batcher.requeue(batcher.try_form_batch().requests)
    clock.now += 1.0
    assert batcher.try_form_batch().max_wait_time == pytest.approx(2.0)


def test_concurrent_add_from_four_threads() -> None:
    config = {"max_batch_size": 7, "max_batch_tokens": 300}
    batcher = make_batcher(**config)
    per_thread, threads = 500, 4
    start = threading.Barrier(threads + 1)
    batches: list[tuple[Batch, int, int]] = []

    def produce(t: int) -> None:
        rng = random.Random(t)
        start.wait()
        for i in range(per_thread):
            batcher.add(req(f"t{t}-{i}", input_tokens=rng.randint(1, 100), priority=rng.randint(0, 3)))

    def consume() -> None:
        rng = random.Random(99)
        start.wait()
        taken, deadline = 0, time.monotonic() + 30
        while taken < per_thread * threads and time.monotonic() < deadline:
            size, tokens = rng.randint(1, 10), rng.randint(100, 400)
            batch = batcher.try_form_batch(max_batch_size=size, max_batch_tokens=tokens)
            if batch is not None:
                batches.append((batch, min(size, 7), min(tokens, 300)))
                taken += batch.size

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    workers.append(threading.Thread(target=consume))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    taken_ids = [r.id for batch, _, _ in batches for r in batch.requests]
    assert sorted(taken_ids) == sorted(f"t{t}-{i}" for t in range(threads) for i in range(per_thread))
    assert len(batcher) == 0
    for batch, size_limit, token_limit in batches:
        assert 1 <= batch.size <= size_limit
        assert batch.total_input_tokens <= token_limit


def test_the_lock_free_batcher_forms_exactly_the_batches_of_the_thread_safe_one() -> None:
    """The scheduler's batcher (`thread_safe=False`, one owner thread) runs the same policy, op for op."""
    rng = random.Random(7)
    clocks = FakeClock(), FakeClock()
    config = BatchConfig(max_batch_size=4, max_batch_tokens=64, min_batch_size=2, max_wait_ms=5)
    batchers = ContinuousBatcher(config, clocks[0]), ContinuousBatcher(config, clocks[1], thread_safe=False)
    outcomes: list[list] = [[], []]
    for step in range(300):
        op, tokens, priority, slots = (
            rng.randrange(4),
            rng.randrange(1, 80),
            rng.randrange(3),
            rng.randrange(1, 5),
        )
        for clock, batcher, seen in zip(clocks, batchers, outcomes, strict=True):
            clock.now += 0.001
            if op < 2:
                batcher.add(req(f"r{step}", tokens, priority))
            elif op == 2:
                batch = batcher.try_form_batch(max_batch_size=slots)
                seen.append(None if batch is None else (ids(batch), batch.max_wait_time))
            else:
                seen.append((len(batcher), batcher.ready(), batcher.peek_oldest_wait()))
    assert outcomes[0] == outcomes[1]
    assert any(isinstance(o, tuple) and isinstance(o[0], list) for o in outcomes[1])  # batches did form

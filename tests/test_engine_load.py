"""The load snapshot the loop thread publishes: whole, current after every pass, the only view callers get."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from engine.core.inbox import Inbox
from engine.core.kv_cache import BlockAllocator
from engine.core.load import EngineLoad
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.errors import QueueFullError
from engine.request import GenerationRequest, StoppingParams


def submitted(n: int = 1) -> Sequence:
    """A request's completion 0, as submitted: it counts as its `n` completions in the queue."""
    return Sequence(GenerationRequest([1, 2, 3], n=n), 4)


def test_a_published_load_is_replaced_whole_never_changed():
    inbox = Inbox(max_queue_size=8)
    first = EngineLoad(num_waiting=1, num_running=2, num_free_kv_blocks=3, num_kv_blocks=8)
    inbox.publish(first)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.num_running = 0  # type: ignore[misc]
    inbox.publish(EngineLoad(num_kv_blocks=8, num_free_kv_blocks=8))
    assert inbox.load == EngineLoad(num_kv_blocks=8, num_free_kv_blocks=8) and first.num_running == 2
    assert (first.num_used_kv_blocks, first.kv_usage) == (5, 5 / 8)


def test_the_loads_waiting_count_and_the_queue_full_check_count_the_sequences_on_their_way():
    inbox = Inbox(max_queue_size=3)
    inbox.publish(EngineLoad(num_waiting=1))
    inbox.add(submitted(), announce=lambda seq: None)
    assert inbox.load.num_waiting == 2
    taken = inbox.take(lambda: False, lambda: None)
    assert len(taken) == 1 and inbox.load.num_waiting == 2  # taken, not in a published load yet: counted
    inbox.add(submitted(), announce=lambda seq: None)
    with pytest.raises(QueueFullError, match=r"the queue is full \(3 requests waiting\)"):
        inbox.add(submitted(), announce=lambda seq: None)
    inbox.take(lambda: False, lambda: None)
    inbox.publish(EngineLoad(num_waiting=0))  # the loop admitted all it took
    assert inbox.load.num_waiting == 0
    inbox.add(submitted(n=3), announce=lambda seq: None)
    assert inbox.load.num_waiting == 3


async def test_a_cancelled_requests_blocks_show_up_free_in_the_load_without_more_traffic(tiny_engine):
    engine = tiny_engine
    request = GenerationRequest([5, 6, 7] * 20, stopping=StoppingParams(max_new_tokens=1900, ignore_eos=True))
    events = engine.submit(request)
    await anext(events)  # it runs: its blocks are taken
    load = engine.load
    assert load.num_running == 1 and load.num_free_kv_blocks < load.num_kv_blocks
    engine.cancel(request.request_id)
    await _until(lambda: engine.load.num_running == 0)
    await _until(lambda: engine.load.num_free_kv_blocks == engine.load.num_kv_blocks)
    assert engine.load.num_waiting == 0 and engine.load.num_used_kv_blocks == 0
    await events.aclose()


async def test_readers_on_other_threads_never_touch_the_schedulers_or_the_caches_state(
    tiny_engine, monkeypatch
):
    touched_by: set[str] = set()

    def recorded(prop: property) -> property:
        def get(self):
            touched_by.add(threading.current_thread().name)
            return prop.fget(self)

        return property(get)

    for cls, name in [
        (Scheduler, "num_waiting"),
        (Scheduler, "num_running"),
        (BlockAllocator, "num_free"),
        (BlockAllocator, "num_cached"),
    ]:
        monkeypatch.setattr(cls, name, recorded(getattr(cls, name)))
    engine = tiny_engine
    request = GenerationRequest([9, 8, 7], stopping=StoppingParams(max_new_tokens=40, ignore_eos=True))
    readings = []
    async for _ in engine.submit(request):
        readings.append((engine.load.num_waiting, engine.load.num_running, engine.load.num_free_kv_blocks,
                         engine.load.num_cached_kv_blocks, engine.load.num_kv_blocks))  # fmt: skip
    assert any(running == 1 for _, running, *_ in readings)
    assert touched_by == {"textgen-engine"}


async def _until(condition, timeout: float = 10.0) -> None:
    """Wait until `condition()` holds, polling the event loop (the loop thread changes it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)

"""The scheduling modes a server may run (`--scheduling`), and the scheduler of each."""

from __future__ import annotations

from engine.core.kv_cache import BlockAllocator
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.static_scheduler import StaticScheduler

SCHEDULING_MODES = ("continuous", "static")


def make_scheduler(
    scheduling: str, config: SchedulerConfig, allocator: BlockAllocator, **kwargs
) -> Scheduler:
    """The scheduler for a `--scheduling` mode; `max_context_len` is needed by (and only by) static mode."""
    if scheduling not in SCHEDULING_MODES:
        raise ValueError(f"scheduling must be 'continuous' or 'static', not {scheduling!r}")
    max_context_len = kwargs.pop("max_context_len")
    if scheduling == "static":
        return StaticScheduler(config, allocator, max_context_len=max_context_len, **kwargs)
    return Scheduler(config, allocator, **kwargs)

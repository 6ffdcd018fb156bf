"""The engine's load as the loop thread last saw it: the one view of loop state other threads get."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A snapshot the loop thread publishes after each pass (commands applied, a step run or not).

    It is replaced as a whole, never changed, so a reader on another thread sees the numbers of one moment.
    `num_waiting` counts sequences waiting: the loop publishes those in the scheduler's queue, and
    `Inbox.load` adds those on their way to it.
    """

    num_waiting: int = 0
    num_running: int = 0
    num_free_kv_blocks: int = 0
    num_cached_kv_blocks: int = 0
    num_kv_blocks: int = 0

    @property
    def num_used_kv_blocks(self) -> int:
        return self.num_kv_blocks - self.num_free_kv_blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV-cache blocks in use, 0 to 1."""
        return self.num_used_kv_blocks / self.num_kv_blocks

"""The prefix cache's events for gateways that route by what each replica has cached (SMG's KV index).

The loop thread reports every block the prefix index gains (`stored`, with its parent's hash and its
token ids), loses (`removed`, on eviction) or drops all at once (`cleared`); at the end of each loop
iteration `publish` turns what it reported into one numbered batch. Any thread may read the batches
after a sequence number (`since`) and ask to be told when there are new ones (`subscribe`). A bounded
history lets a subscriber that reconnects resume where it left off; one that fell further behind is told
so (`since` returns None) and starts over: from the start while the history holds the first batch, else
from a snapshot of the index as the published batches left it (`snapshot`).

Sequence numbers never go back across restarts: a log counts on from its creation time in microseconds,
so every number a later server process publishes is above every number an earlier one did, and a
gateway's cursor from before a restart is told apart from a cursor into this process's history.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_BATCHES = 4096  # the history a reconnecting subscriber can resume from


def sequence_base() -> int:
    """The number before a new log's first batch: now, in microseconds since the epoch. An earlier log
    would have had to publish more than a batch a microsecond to reach it (a batch is a loop iteration);
    microseconds, not nanoseconds, keep every number exact in a double (below 2**53) for JSON readers."""
    return time.time_ns() // 1000


@dataclass(slots=True)
class BlocksStored:
    """Full blocks newly indexed, each chained on the one before; the first on `parent_hash` (None: the
    first block of a prompt). `token_ids` holds every block's tokens, `block_size` per block."""

    block_hashes: list[bytes]
    parent_hash: bytes | None
    token_ids: array  # of int32: a history of batches holds many


@dataclass(slots=True)
class BlocksRemoved:
    """Blocks evicted from the prefix index."""

    block_hashes: list[bytes]


@dataclass(slots=True)
class AllBlocksCleared:
    """The whole prefix index was dropped."""


KvEvent = BlocksStored | BlocksRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """One loop iteration's events; sequence numbers have no gaps within a process."""

    sequence_number: int
    timestamp: float  # time.time() when published
    events: tuple[KvEvent, ...]
    snapshot: bool = False  # the whole index as of `sequence_number` (`KvEventLog.snapshot`), not a batch


@dataclass(slots=True)
class KvEventLog:
    """Events reported by the loop thread, published as numbered batches to readers on any thread."""

    block_size: int
    max_batches: int = MAX_BATCHES
    base: int = field(default_factory=sequence_base)  # the first batch is numbered base + 1
    _pending: list[KvEvent] = field(default_factory=list)  # the loop thread's only
    _history: deque[KvEventBatch] = field(default_factory=deque)
    _last: int = 0  # base until the first batch
    _subscribers: list[Callable[[], None]] = field(default_factory=list)
    _live: dict[bytes, tuple[bytes | None, array]] = field(default_factory=dict)  # hash -> (parent, tokens)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._last = self.base

    # ---- the loop thread --------------------------------------------------------------------------------

    def stored(self, block_hash: bytes, parent_hash: bytes | None, token_ids: list[int]) -> None:
        """A block was indexed; one that continues the previous stored block joins its event."""
        _append_stored(self._pending, block_hash, parent_hash, token_ids)

    def removed(self, block_hash: bytes) -> None:
        last = self._pending[-1] if self._pending else None
        if isinstance(last, BlocksRemoved):
            last.block_hashes.append(block_hash)
        else:
            self._pending.append(BlocksRemoved([block_hash]))

    def cleared(self) -> None:
        self._pending = [AllBlocksCleared()]  # what came before in this batch is void

    def publish(self) -> None:
        """Number what was reported since the last call as one batch and tell the subscribers."""
        if not self._pending:
            return
        events, self._pending = tuple(self._pending), []
        with self._lock:
            self._last += 1
            self._history.append(KvEventBatch(self._last, time.time(), events))
            self._follow(events)
            while len(self._history) > self.max_batches:
                self._history.popleft()
            subscribers = list(self._subscribers)
        for notify in subscribers:
            notify()

    # ---- any thread -------------------------------------------------------------------------------------

    @property
    def last_sequence_number(self) -> int:
        with self._lock:
            return self._last

    def since(self, sequence_number: int) -> list[KvEventBatch] | None:
        """The batches after `sequence_number` (0: from the first batch); None when the history no longer
        reaches back that far or this log never published the number (a cursor from another process)."""
        with self._lock:
            if sequence_number == 0:
                sequence_number = self.base
            if not self.base <= sequence_number <= self._last:
                return None
            count = self._last - sequence_number
            if count > len(self._history):
                return None
            return [self._history[-k] for k in range(count, 0, -1)]  # from the newest end: no whole copy

    def snapshot(self) -> KvEventBatch:
        """The index as the batches published so far left it, numbered as the last of them: a clear, then
        every indexed block, parents first. A block indexed before its parent (the parent was evicted and
        indexed again) is left out with its descendants: a gateway would misplace a chain without its head."""
        with self._lock:
            live, last = dict(self._live), self._last
        events: list[KvEvent] = [AllBlocksCleared()]
        sent: set[bytes] = set()
        for block_hash, (parent_hash, token_ids) in live.items():
            if parent_hash is None or parent_hash in sent:
                _append_stored(events, block_hash, parent_hash, token_ids)
                sent.add(block_hash)
        return KvEventBatch(last, time.time(), tuple(events), snapshot=True)

    def subscribe(self, notify: Callable[[], None]) -> None:
        """Call `notify()` (on the loop thread: it must only hand over) after each published batch."""
        with self._lock:
            self._subscribers.append(notify)

    def unsubscribe(self, notify: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.remove(notify)

    def _follow(self, events: tuple[KvEvent, ...]) -> None:
        """Keep the index as `events` leave it (under the lock), for `snapshot`."""
        for event in events:
            if isinstance(event, BlocksStored):
                parent_hash, size = event.parent_hash, self.block_size
                for index, block_hash in enumerate(event.block_hashes):
                    self._live[block_hash] = (parent_hash, event.token_ids[index * size : (index + 1) * size])
                    parent_hash = block_hash
            elif isinstance(event, BlocksRemoved):
                for block_hash in event.block_hashes:
                    self._live.pop(block_hash, None)
            else:
                self._live.clear()


def _append_stored(
    events: list[KvEvent], block_hash: bytes, parent_hash: bytes | None, token_ids: list[int] | array
) -> None:
    """Add a stored block to `events`: to the last event when it continues that event's chain."""
    last = events[-1] if events else None
    if isinstance(last, BlocksStored) and parent_hash is not None and parent_hash == last.block_hashes[-1]:
        last.block_hashes.append(block_hash)
        last.token_ids.extend(token_ids)
    else:
        events.append(BlocksStored([block_hash], parent_hash, array("i", token_ids)))

"""Continuous batching: the queue of waiting requests and the rule that turns it into batches."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """Limits on one batch, and how long a short queue may wait for company before it goes anyway."""

    max_batch_size: int = 32
    max_batch_tokens: int = 4096
    min_batch_size: int = 1
    max_wait_ms: float = 50

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError(
                f"min_batch_size must be in 1..max_batch_size ({self.max_batch_size}), "
                f"got {self.min_batch_size}"
            )
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")


@dataclass(slots=True)
class BatchRequest:
    """One waiting request as the batcher sees it: a prompt of `input_tokens` tokens and a priority.

    `arrival_time` and `enqueue_seq` are stamped by `ContinuousBatcher.add()` (the batcher's clock at
    enqueue time, and its place in line); `requeue()` keeps them. `payload` is opaque to the batcher.
    """

    id: str
    input_tokens: int
    max_new_tokens: int
    priority: int = 0
    payload: object = field(default=None, repr=False, compare=False)
    arrival_time: float | None = field(default=None, compare=False)
    enqueue_seq: int = field(default=-1, repr=False, compare=False)

    def with_priority(self, priority: int) -> BatchRequest:
        """A copy of this request with `priority`; this one is left as it is."""
        return replace(self, priority=priority)


@dataclass(slots=True)
class Batch:
    """Requests taken together, in the order taken; `formed_at` is the batcher's clock at formation."""

    requests: list[BatchRequest]
    formed_at: float

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def total_input_tokens(self) -> int:
        return sum(r.input_tokens for r in self.requests)

    @property
    def avg_wait_time(self) -> float:
        """Mean seconds the requests waited in the queue, up to formation."""
        return sum(self.formed_at - r.arrival_time for r in self.requests) / self.size

    @property
    def max_wait_time(self) -> float:
        """Seconds the longest-waiting request spent in the queue, up to formation."""
        return self.formed_at - min(r.arrival_time for r in self.requests)


class ContinuousBatcher:
    """A thread-safe queue that hands out batches: highest priority first, first-come within one.

    A batch forms once `min_batch_size` requests wait or the oldest has waited `max_wait_ms`. It
    takes requests in order and stops at the first that would break `max_batch_size` or
    `max_batch_tokens`; nothing is skipped, so a long prompt is not starved by short ones behind it.
    A first request longer than `config.max_batch_tokens` could never fit, so it goes alone (a
    batch of one; the engine, which validates prompt lengths, chunks its prefill), but only in a
    step whose token limit is not tighter than the config's: a tighter one means no room now.

    `thread_safe=False` is for an owner that is the only thread to call it (the engine's scheduler, on
    the loop thread): the same policy without a lock.
    """

    def __init__(
        self, config: BatchConfig, clock: Callable[[], float] = time.monotonic, *, thread_safe: bool = True
    ) -> None:
        self.config = config
        self.clock = clock
        self._lock: contextlib.AbstractContextManager = threading.Lock() if thread_safe else _NO_LOCK
        self._heap: list[tuple[int, int, BatchRequest]] = []
        self._queued: dict[str, BatchRequest] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        with self._lock:
            return len(self._queued)

    def add(self, request: BatchRequest) -> None:
        """Queue `request`, stamping its `arrival_time` and place in line."""
        with self._lock:
            request.arrival_time = self.clock()
            request.enqueue_seq = next(self._seq)
            self._push(request)

    def requeue(self, requests: Iterable[BatchRequest]) -> None:
        """Put taken requests (say, preempted ones) back with their original arrival time and place."""
        with self._lock:
            for request in requests:
                assert request.arrival_time is not None, f"request {request.id} was never added"
                self._push(request)

    def remove(self, request_id: str) -> BatchRequest | None:
        """Take a queued request out (say, it was cancelled); None if it is not queued."""
        with self._lock:
            request = self._queued.pop(request_id, None)
            if request is not None:
                # O(n), but cancelling a queued request is rare next to adding and taking.
                self._heap = [entry for entry in self._heap if entry[2] is not request]
                heapq.heapify(self._heap)
            return request

    def peek_oldest_wait(self) -> float | None:
        """Seconds the longest-waiting queued request has waited; None when the queue is empty."""
        with self._lock:
            return self._oldest_wait()

    def ready(self) -> bool:
        """Whether a batch would form now, limits aside."""
        with self._lock:
            return self._ready()

    def try_form_batch(
        self, max_batch_size: int | None = None, max_batch_tokens: int | None = None
    ) -> Batch | None:
        """Take the next batch, or None if none is ready or nothing fits.

        `max_batch_size` and `max_batch_tokens` tighten the config's limits for this step (free
        sequence slots, free KV cache); looser values are ignored.
        """
        with self._lock:
            if not self._ready():
                return None
            size_limit = _tighter(self.config.max_batch_size, max_batch_size)
            token_limit = _tighter(self.config.max_batch_tokens, max_batch_tokens)
            requests = self._take(size_limit, token_limit)
            return Batch(requests, self.clock()) if requests else None

    def _push(self, request: BatchRequest) -> None:
        if request.id in self._queued:
            raise ValueError(f"request {request.id} is already queued")
        self._queued[request.id] = request
        heapq.heappush(self._heap, (-request.priority, request.enqueue_seq, request))

    def _take(self, size_limit: int, token_limit: int) -> list[BatchRequest]:
        if size_limit >= 1 and self._oversized(self._heap[0][2], token_limit):
            return [self._pop()]
        taken: list[BatchRequest] = []
        tokens = 0
        while self._heap and len(taken) < size_limit:
            tokens += self._heap[0][2].input_tokens
            if tokens > token_limit:
                break
            taken.append(self._pop())
        return taken

    def _oversized(self, request: BatchRequest, token_limit: int) -> bool:
        limit = self.config.max_batch_tokens
        return request.input_tokens > limit and token_limit >= limit

    def _pop(self) -> BatchRequest:
        request = heapq.heappop(self._heap)[2]
        del self._queued[request.id]
        return request

    def _ready(self) -> bool:
        if not self._queued:
            return False
        # Short-circuit: the O(n) scan for the oldest runs only while the queue is short.
        if len(self._queued) >= self.config.min_batch_size:
            return True
        return self._oldest_wait() * 1000 >= self.config.max_wait_ms

    def _oldest_wait(self) -> float | None:
        if not self._queued:
            return None
        return self.clock() - min(r.arrival_time for r in self._queued.values())


_NO_LOCK = contextlib.nullcontext()


def _tighter(limit: int, step_limit: int | None) -> int:
    return limit if step_limit is None else min(limit, step_limit)

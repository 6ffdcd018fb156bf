"""Decides what each engine step runs: a prefill of admitted prompts or a decode of every running sequence.

Policy (continuous mode), checked at every step:
1. Prefill when a prompt is part-way through a chunked prefill, or when the batcher is ready (the seed's
   `min_batch_size` / `max_wait_ms`) and there is a free sequence slot. Prefill first because a new
   request's time to first token is what a queue hurts most, while a decode step only adds one token.
2. ...unless prefill steps have held decoding off for `max_decode_stall_ms` already: then decode
   first, so a stream of arrivals or a long chunked prompt cannot starve the sequences generating.
3. Otherwise decode every running sequence. When a decode step finds no free KV block, preempt the
   lowest-priority, newest sequence (free its blocks, requeue it, recompute its tokens later).

Static mode replaces continuous batching with the traditional scheme, as a baseline: admit a batch only
when nothing runs, wait for `max_batch_size` requests or `max_wait_ms`, and keep finished rows in the
batch (computing padding tokens) until its longest sequence finishes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.batching import BatchConfig, BatchRequest, ContinuousBatcher
from engine.kv_cache import BlockAllocator
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    """Scheduling knobs; `batch` is the seed's batching configuration."""

    batch: BatchConfig = field(default_factory=BatchConfig)
    max_decode_stall_ms: float = 200.0
    scheduling: str = "continuous"

    def __post_init__(self) -> None:
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', not {self.scheduling!r}")
        if self.max_decode_stall_ms < 0:
            raise ValueError("max_decode_stall_ms must be >= 0")


@dataclass(slots=True)
class ScheduledStep:
    """One step's work: (sequence, number of its tokens to run) pairs, all prefill or all decode."""

    is_prefill: bool
    chunks: list[tuple[Sequence, int]]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    """Owns the waiting queue (the batcher), the sequences being prefilled and the running ones."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, clock=time.monotonic) -> None:
        self.config = config
        self.allocator = allocator
        self.clock = clock
        batch = config.batch
        if config.scheduling == "static":
            # The batcher forms a batch when it is full or the oldest request has waited max_wait_ms.
            batch = BatchConfig(
                max_batch_size=batch.max_batch_size,
                max_batch_tokens=batch.max_batch_tokens,
                min_batch_size=batch.max_batch_size,
                max_wait_ms=batch.max_wait_ms,
            )
        self.batcher = ContinuousBatcher(batch, clock=clock)
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._prefill_since: float | None = None  # when prefill steps began holding decoding off

    @property
    def static(self) -> bool:
        return self.config.scheduling == "static"

    @property
    def num_waiting(self) -> int:
        return len(self.batcher)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.running if not s.padding_only) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.prefilling or self.running or self.batcher.ready())

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (thread-safe: only touches the batcher)."""
        seq.batch_request = BatchRequest(
            seq.id, seq.num_tokens, seq.max_new_tokens, seq.priority, payload=seq
        )
        self.batcher.add(seq.batch_request)

    def schedule(self) -> ScheduledStep | None:
        """Pick the next step, or None when there is nothing to run."""
        now = self.clock()
        if self.static:
            want_prefill = bool(self.prefilling) or (not self.running and self.batcher.ready())
        else:
            has_slot = len(self.running) + len(self.prefilling) < self.config.batch.max_batch_size
            want_prefill = bool(self.prefilling) or (has_slot and self.batcher.ready())
            stalled_ms = 0.0 if self._prefill_since is None else (now - self._prefill_since) * 1000
            if self.running and stalled_ms >= self.config.max_decode_stall_ms:
                want_prefill = False
        if want_prefill:
            step = self._schedule_prefill()
            if step is not None:
                if self._prefill_since is None and self.running:
                    self._prefill_since = now
                return step
        if self.running:
            self._prefill_since = None
            return self._schedule_decode()
        return None

    def _schedule_prefill(self) -> ScheduledStep | None:
        budget = self.config.batch.max_batch_tokens
        chunks = []
        for seq in self.prefilling:
            n = min(seq.num_uncomputed_tokens, budget)
            if n:
                chunks.append((seq, n))
                budget -= n
        slots = self.config.batch.max_batch_size - len(self.running) - len(self.prefilling)
        if budget > 0 and slots > 0 and self.batcher.ready():
            kv_tokens = self.allocator.num_free * self.allocator.block_size
            formed = self.batcher.try_form_batch(
                max_batch_size=slots, max_batch_tokens=min(budget, kv_tokens)
            )
            for i, breq in enumerate(formed.requests if formed else []):
                seq: Sequence = breq.payload
                if not self.allocator.allocate(seq.block_table, seq.num_tokens):
                    self.batcher.requeue(formed.requests[i:])  # keeps their places in line
                    break
                seq.status = SequenceStatus.PREFILLING
                seq.admitted_time = seq.admitted_time or self.clock()
                self.prefilling.append(seq)
                n = min(seq.num_uncomputed_tokens, budget)
                chunks.append((seq, n))
                budget -= n
        return ScheduledStep(True, chunks) if chunks else None

    def _schedule_decode(self) -> ScheduledStep:
        preempted = []
        for seq in sorted(self.running, key=_priority_order):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.allocator.allocate(seq.block_table, seq.num_tokens):
                victim = max(self.running, key=_priority_order)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        return ScheduledStep(False, [(seq, 1) for seq in self.running], preempted)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it again; its tokens are recomputed when readmitted."""
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        seq.batch_request.input_tokens = seq.num_tokens
        self.batcher.requeue([seq.batch_request])

    def finish_chunk(self, seq: Sequence, num_tokens: int) -> bool:
        """Record that a chunk ran; True when the sequence's prompt is complete (it samples a token)."""
        seq.num_computed_tokens += num_tokens
        if seq.status is SequenceStatus.PREFILLING and seq.num_uncomputed_tokens == 0:
            self.prefilling.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            return True
        return seq.status is SequenceStatus.RUNNING

    def finish(self, seq: Sequence) -> None:
        """A sequence is done; in static mode its row stays (padding) until the whole batch is done."""
        if self.static and seq.status is SequenceStatus.RUNNING and not self._batch_done(seq):
            seq.padding_only = True
            return
        self._release(seq)
        if self.static and self.running and all(s.padding_only for s in self.running):
            for s in list(self.running):
                self._release(s)

    def _batch_done(self, finishing: Sequence) -> bool:
        return not self.prefilling and all(s.padding_only or s is finishing for s in self.running)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.batcher.remove(seq.id)
        self.allocator.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED


def _priority_order(seq: Sequence) -> tuple[int, float]:
    """Sort key: highest priority first, then oldest first; the max is the preemption victim."""
    return (-seq.priority, seq.request.arrival_time)

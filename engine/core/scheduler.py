"""Decides what each engine step runs, and applies what it produced.

Policy (`Scheduler`, continuous batching), checked at every step:
1. Prefill when a prompt is part-way through a chunked prefill, or when the batcher is ready (the seed's
   `min_batch_size` / `max_wait_ms`) and there is a free sequence slot. Prefill first because a new
   request's time to first token is what a queue hurts most, while a decode step only adds one token.
2. ...unless prefill steps have held decoding off for `max_decode_stall_ms` already: then decode
   first, so a stream of arrivals or a long chunked prompt cannot starve the sequences generating.
3. Otherwise decode every running sequence. When a decode step finds no free KV block, preempt the
   lowest-priority, newest sequence (free its blocks, requeue it, recompute its tokens later).

With prefix caching, an admitted sequence first takes the cached blocks of its longest prefix of whole
blocks (never its last token: that one's logits give the first new token) and prefills only the rest;
every block a step fills is indexed for the sequences after it (`engine.core.kv_cache`). A sequence that
scores its prompt (`prompt_logprobs`) takes none: scoring needs the logits of every prompt position.

The completions of a request with n > 1 prefill its prompt once: only completion 0 is queued, and once its
prefill is done the scheduler forks completions 1 to n - 1 from it into the queue; they share its whole
prompt blocks (whether or not prefix caching is on) and compute only the rest of the prompt's last block.
Only completion 0 scores the prompt.

The static baseline is `engine.core.static_scheduler`; `engine.core.scheduling_modes` picks one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.batching import BatchConfig, BatchRequest, ContinuousBatcher
from engine.core.kv_cache import BlockAllocator, block_hashes
from engine.core.observer import EngineObserver
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.step import Step, StepOutput, StepRow
from engine.errors import EngineError

# Prompt tokens scored per prefill step (`prompt_logprobs`): each brings a row of logits back, so this
# bounds that memory (512 x a 49k vocabulary in float32: 100 MB); a longer prompt is scored over steps.
MAX_SCORED_TOKENS_PER_STEP = 512


@dataclass(slots=True)
class SchedulerConfig:
    """Scheduling knobs; `batch` is the seed's batching configuration."""

    batch: BatchConfig = field(default_factory=BatchConfig)
    max_decode_stall_ms: float = 200.0
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_decode_stall_ms < 0:
            raise ValueError("max_decode_stall_ms must be >= 0")


@dataclass(slots=True)
class StepResult:
    """What a step did to its sequences: tokens appended, sequences whose row could not be sampled, and the
    completions forked from a request's completion 0 (queued already)."""

    sampled: list[tuple[Sequence, int, float]] = field(default_factory=list)
    failed: list[tuple[Sequence, str | EngineError]] = field(default_factory=list)
    forked: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue (the batcher), the sequences being prefilled and the running ones.

    Single-threaded: only the engine's step loop calls it, so its batcher has no lock. `sequences` holds
    every live sequence by id; a queued sequence holds its own place in the batcher's line
    (`Sequence.ticket`), so a preempted one goes back where it was.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.observer = observer or EngineObserver()
        self.clock = clock
        self.batcher = ContinuousBatcher(self._batch_config(config.batch), clock=clock, thread_safe=False)
        self.sequences: dict[int, Sequence] = {}
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []
        self._preempted_ids: list[int] = []
        self._prefill_since: float | None = None  # when prefill steps began holding decoding off

    def _batch_config(self, batch: BatchConfig) -> BatchConfig:
        return batch

    @property
    def num_waiting(self) -> int:
        return len(self.batcher)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.prefilling or self.running or self.batcher.ready())

    def idle_timeout(self) -> float | None:
        """How long an idle loop may sleep: until the oldest queued request reaches max_wait_ms."""
        waited = self.batcher.peek_oldest_wait()
        if waited is None:
            return None
        return max(self.config.batch.max_wait_ms / 1000 - waited, 0.001)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (a request's completion 0: the others are forked from it)."""
        self.sequences[seq.seq_id] = seq
        seq.ticket = BatchRequest(
            str(seq.seq_id), seq.num_tokens, seq.max_new_tokens, seq.priority, payload=seq
        )
        self.batcher.add(seq.ticket)

    def schedule(self) -> Step | None:
        """The next step, or None when there is nothing to run."""
        now = self.clock()
        if self._wants_prefill(now):
            chunks = self._prefill_chunks()
            if chunks:
                if self._prefill_since is None and self.running:
                    self._prefill_since = now
                return self._step(True, chunks)
        if self.running:
            self._prefill_since = None
            return self._step(False, self._decode_chunks())
        return None

    def update(self, step: Step, output: StepOutput) -> StepResult:
        """Record what `step` computed and take its sampled tokens (a row deferred for its grammar's mask
        gets its token from a later step's `resolved`); whether one ends its sequence is the outputs' say."""
        result = StepResult()
        sampled = iter(zip(output.token_ids, output.logprobs, strict=True))
        failed = output.failed
        for row in step.rows:
            token = next(sampled) if row.sample else None
            seq = self._row_sequence(row.seq_id)
            if seq is None:
                continue
            self._advance(seq, row.num_tokens, result)
            if token is None or row.seq_id in failed:
                continue
            if row.seq_id in output.deferred:
                seq.awaiting_mask = True
            else:
                self._take(seq, *token, result)
        for seq_id, token in output.resolved.items():
            seq = self._row_sequence(seq_id)
            if seq is not None and seq.awaiting_mask:
                seq.awaiting_mask = False
                self._take(seq, *token, result)
        for seq_id, reason in failed.items():
            if (seq := self._row_sequence(seq_id)) is not None:
                result.failed.append((seq, reason))
        return result

    def step_failed(self, step: Step) -> None:
        """`step` did not run: its news of finished sequences goes to the runner with the next step."""
        self._finished_ids.extend(step.finished_seq_ids)

    def finish(self, seq: Sequence) -> None:
        """End a sequence wherever it is: free its blocks and forget it. Idempotent."""
        if self.sequences.pop(seq.seq_id, None) is not None:
            self._release(seq)

    # ---- building a step --------------------------------------------------------------------------------

    def _wants_prefill(self, now: float) -> bool:
        has_slot = len(self.running) + len(self.prefilling) < self.config.batch.max_batch_size
        stalled_ms = 0.0 if self._prefill_since is None else (now - self._prefill_since) * 1000
        if self.running and stalled_ms >= self.config.max_decode_stall_ms:
            return False
        return bool(self.prefilling) or (has_slot and self.batcher.ready())

    def _prefill_chunks(self) -> list[tuple[Sequence, int]]:
        budget = self.config.batch.max_batch_tokens
        scoring_budget = MAX_SCORED_TOKENS_PER_STEP
        chunks = []
        for seq in [*self.prefilling, *self._admit(budget)]:
            n = min(seq.num_uncomputed_tokens, budget)
            if seq.scores_prompt:
                n = min(n, scoring_budget)
                scoring_budget -= n
            if n:
                chunks.append((seq, n))
                budget -= n
        return chunks

    def _admit(self, budget: int) -> list[Sequence]:
        """Take a batch from the queue within the token budget, free slots and free KV blocks."""
        budget -= sum(seq.num_uncomputed_tokens for seq in self.prefilling)
        slots = self.config.batch.max_batch_size - len(self.running) - len(self.prefilling)
        if budget <= 0 or slots <= 0 or not self.batcher.ready():
            return []
        kv_tokens = self.allocator.num_free * self.allocator.block_size
        formed = self.batcher.try_form_batch(max_batch_size=slots, max_batch_tokens=min(budget, kv_tokens))
        admitted = []
        for i, ticket in enumerate(formed.requests if formed else []):
            seq: Sequence = ticket.payload
            self._share_cached_prefix(seq)
            if not self.allocator.allocate(seq.block_table, seq.num_tokens):
                self.allocator.free(seq.block_table)
                seq.num_computed_tokens = 0
                self.batcher.requeue(formed.requests[i:])  # keeps their places in line
                break
            seq.status = SequenceStatus.PREFILLING
            seq.admitted_time = seq.admitted_time or self.clock()
            self.prefilling.append(seq)
            admitted.append(seq)
            self.observer.request_admitted(seq)
        return admitted

    def _share_cached_prefix(self, seq: Sequence) -> None:
        """Start `seq` on the longest run of whole blocks computed before: cached, or completion 0's.

        A sequence that scores its prompt takes no cached blocks: their positions' logits, which scoring
        needs, are never computed (the blocks it fills are still cached for later prompts)."""
        bs = self.allocator.block_size
        limit = (seq.num_tokens - 1) // bs
        blocks = []
        if self.config.prefix_caching and not seq.scores_prompt:
            hashes = block_hashes(seq.token_ids, bs, seq.block_hashes, seq.cache_seed)
            blocks = self.allocator.cached_prefix(hashes[:limit])
        first = self.sequences.get(seq.group_id)
        if first is not seq and first is not None:
            blocks = max(blocks, _prompt_blocks(first, seq, limit, bs), key=len)
        self.allocator.share(seq.block_table, blocks)
        seq.num_computed_tokens = len(blocks) * bs
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)

    def _decode_chunks(self) -> list[tuple[Sequence, int]]:
        for seq in sorted(self.running, key=_priority_order):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.allocator.allocate(seq.block_table, seq.num_tokens):
                victim = max(self.running, key=_priority_order)
                self._preempt(victim)
                if victim is seq:
                    break
        return [(seq, 1) for seq in self.running if not seq.awaiting_mask]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it again; its tokens are recomputed when readmitted."""
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.awaiting_mask = False  # its row runs again (its grammar keeps the mask in flight)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self._preempted_ids.append(seq.seq_id)
        seq.ticket.input_tokens = seq.num_tokens  # taken from the batcher at admission: this one is ours
        self.batcher.requeue([seq.ticket])
        self.observer.request_preempted(seq)

    def _step(self, is_prefill: bool, chunks: list[tuple[Sequence, int]]) -> Step:
        rows = [_row(seq, n) for seq, n in chunks]
        finished, self._finished_ids = self._finished_ids, []
        preempted, self._preempted_ids = self._preempted_ids, []
        return Step(is_prefill, rows, finished, preempted)

    # ---- applying a step's output -----------------------------------------------------------------------

    def _row_sequence(self, seq_id: int) -> Sequence | None:
        return self.sequences.get(seq_id)

    def _advance(self, seq: Sequence, num_tokens: int, result: StepResult) -> None:
        first_full = seq.num_computed_tokens // self.allocator.block_size
        seq.num_computed_tokens += num_tokens
        if self.config.prefix_caching:  # the blocks this step filled, for later prompts to share
            _cache_filled_blocks(self.allocator, seq, first_full)
        if seq.status is SequenceStatus.PREFILLING and seq.num_uncomputed_tokens == 0:
            self.prefilling.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.index == 0 and not seq.num_completion_tokens:  # its first prefill, not a recompute
                self._fork(seq, result)

    def _fork(self, first: Sequence, result: StepResult) -> None:
        """`first`'s prompt is prefilled: queue the request's other completions, which start on its blocks."""
        for index in range(1, first.request.n):
            seq = first.fork(index)
            self.add(seq)
            self.observer.request_queued(seq)
            result.forked.append(seq)

    def _take(self, seq: Sequence, token_id: int, logprob: float, result: StepResult) -> None:
        if seq.grammar is not None:
            seq.grammar.accept(token_id)
        self._append(seq, token_id, logprob, result)

    def _append(self, seq: Sequence, token_id: int, logprob: float, result: StepResult) -> None:
        seq.token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = self.clock()
            self.observer.first_token(seq)
        result.sampled.append((seq, token_id, logprob))

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            self.batcher.remove(seq.ticket.id)
        self.allocator.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        self._finished_ids.append(seq.seq_id)


def _priority_order(seq: Sequence) -> tuple[int, float]:
    """Sort key: highest priority first, then oldest first; the max is the preemption victim."""
    return (-seq.priority, seq.request.arrival_time)


def _row(seq: Sequence, num_tokens: int) -> StepRow:
    """`seq`'s part of a step: its next `num_tokens` tokens to compute."""
    start = seq.num_computed_tokens
    return StepRow(
        seq_id=seq.seq_id,
        token_ids=seq.token_ids[start : start + num_tokens],
        start_pos=start,
        block_table=seq.block_table,
        sample=start + num_tokens == seq.num_tokens,
        sampling=seq.request.sampling,
        history=seq.token_ids,
        num_prompt_tokens=seq.num_prompt_tokens,
        grammar=seq.grammar,
    )


def _prompt_blocks(first: Sequence, seq: Sequence, limit: int, block_size: int) -> list[int]:
    """The whole blocks of completion 0's prompt that `seq`, another completion, may start on (never a block
    holding completion 0's output)."""
    num_blocks = min(limit, seq.num_prompt_tokens // block_size, first.num_computed_tokens // block_size)
    return first.block_table[:num_blocks]


def _cache_filled_blocks(allocator: BlockAllocator, seq: Sequence, first_full: int) -> None:
    """Index the blocks of `seq` filled since block `first_full`, for later prompts to share."""
    bs = allocator.block_size
    hashes = block_hashes(seq.token_ids, bs, seq.block_hashes, seq.cache_seed)
    for index in range(first_full, seq.num_computed_tokens // bs):
        parent = hashes[index - 1] if index else None
        tokens = seq.token_ids[index * bs : (index + 1) * bs]
        allocator.cache(seq.block_table[index], hashes[index], parent, tokens)

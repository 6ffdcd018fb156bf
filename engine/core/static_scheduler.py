"""Static batching, the traditional scheme kept as a baseline (`--scheduling static`).

Admit a batch only when nothing runs, wait for `max_batch_size` requests or `max_wait_ms`, and keep finished
rows in the batch (computing padding tokens) until its longest sequence finishes.
"""

from __future__ import annotations

from dataclasses import replace

from engine.batching import BatchConfig
from engine.core.scheduler import Scheduler, StepResult
from engine.core.sequence import Sequence, SequenceStatus


class StaticScheduler(Scheduler):
    """Static batching, the baseline: a batch is admitted only when nothing runs, and a finished
    sequence keeps its row (computing padding tokens, reported to nobody) until the whole batch is done."""

    def __init__(self, *args, max_context_len: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_context_len = max_context_len
        self.padding: dict[int, Sequence] = {}  # finished sequences whose rows stay in the batch

    def _batch_config(self, batch: BatchConfig) -> BatchConfig:
        # A batch forms when it is full or the oldest request has waited max_wait_ms.
        return replace(batch, min_batch_size=batch.max_batch_size)

    @property
    def num_running(self) -> int:
        return super().num_running - len(self.padding)

    def _wants_prefill(self, now: float) -> bool:
        return bool(self.prefilling) or (not self.running and self.batcher.ready())

    def finish(self, seq: Sequence) -> None:
        if seq.seq_id not in self.sequences:
            return
        others_running = any(s is not seq and s.seq_id in self.sequences for s in self.running)
        if seq.status is SequenceStatus.RUNNING and (others_running or self.prefilling):
            del self.sequences[seq.seq_id]
            self.padding[seq.seq_id] = seq
            return
        super().finish(seq)
        if not others_running:
            self._release_padding()

    def _release_padding(self) -> None:
        for seq in self.padding.values():
            self._release(seq)
        self.padding.clear()

    def _row_sequence(self, seq_id: int) -> Sequence | None:
        return self.sequences.get(seq_id) or self.padding.get(seq_id)

    def _append(self, seq: Sequence, token_id: int, logprob: float, result: StepResult) -> None:
        if seq.seq_id not in self.padding:
            super()._append(seq, token_id, logprob, result)
        elif seq.num_tokens + 1 < self.max_context_len:
            seq.token_ids.append(token_id)
        else:  # a padding row may not grow past the context: it leaves the batch early
            del self.padding[seq.seq_id]
            self._release(seq)

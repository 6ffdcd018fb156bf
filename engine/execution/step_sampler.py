"""Picks a step's tokens from its logits: each row's own random generator, its grammar's mask, and the rows
whose masks come late.

A row whose grammar mask is not ready a little after the forward pass (`GRAMMAR_WAIT_SHARE` of the pass's
time) is deferred: its logits are kept and it is sampled by the first later step that finds its mask ready,
with the same generator and the same history, so it gets the token it would have got, and a slow grammar
holds only its own request (README, "Structured output").
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import numpy as np
import torch

from engine.core.step import StepOutput, StepRow
from engine.core.structured import (
    GRAMMAR_MIN_WAIT_MS,
    GRAMMAR_WAIT_SHARE,
    GrammarWorkers,
    StepMasks,
    ready,
    settle,
)
from engine.execution.sampler import FAILED, SamplingBatch, sample, top_logprobs

# A step that runs no row (every running sequence waits for its grammar's mask) waits this long at most
# for one of those masks before the loop looks at its queue again.
IDLE_MASK_WAIT_S = 0.005


@dataclass(slots=True)
class _Deferred:
    """A row that ran but whose grammar mask was not ready: its logits, kept until the mask is."""

    row: StepRow
    logits: torch.Tensor  # [vocab]


class StepSampler:
    """The runner's per-sequence sampling state: random generators, grammar workers, deferred rows."""

    def __init__(self, vocab_size: int, device: torch.device, grammar_step_budget_ms: float) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.grammar_workers = GrammarWorkers(grammar_step_budget_ms)
        self._generators: dict[int, torch.Generator] = {}  # by sequence id, for sampled (not greedy) rows
        self._deferred: dict[int, _Deferred] = {}  # by sequence id: rows waiting for their grammar's mask

    def close(self) -> None:
        self.grammar_workers.close()

    def forget(self, finished_seq_ids: list[int], preempted_seq_ids: list[int]) -> None:
        """Drop the state of sequences that ended, and the kept logits of those preempted (their rows run
        again; their grammars keep the masks in flight)."""
        for seq_id in finished_seq_ids:
            self._generators.pop(seq_id, None)
        for seq_id in [*finished_seq_ids, *preempted_seq_ids]:
            self._deferred.pop(seq_id, None)

    def start_masks(self, rows: list[StepRow]) -> StepMasks | None:
        """Start the grammar masks of a step's sampling rows, to run beside its forward pass."""
        if not any(row.grammar is not None for row in rows):
            return None
        return self.grammar_workers.start([row.grammar for row in rows], self.vocab_size)

    def pick(
        self,
        rows: list[StepRow],
        logits: torch.Tensor,
        masks: StepMasks | None,
        forward_s: float,
        output: StepOutput,
    ) -> StepOutput:
        """Sample `rows` (the step's sampling rows) from `logits` into `output`, deferring those whose masks
        are not ready; then settle the deferred rows whose masks are."""
        output.token_ids, output.logprobs = [0] * len(rows), [0.0] * len(rows)
        allowed, grammar_failed, deferred = None, {}, set()
        if masks is not None:
            wait_s = max(GRAMMAR_MIN_WAIT_MS / 1000, GRAMMAR_WAIT_SHARE * forward_s)
            allowed, grammar_failed, deferred = masks.result(logits.device, wait_s)
        for i in deferred:
            self._deferred[rows[i].seq_id] = _Deferred(rows[i], logits[i].clone())
            output.deferred.add(rows[i].seq_id)
        for i, error in grammar_failed.items():
            output.failed[rows[i].seq_id] = error
        kept = [i for i in range(len(rows)) if i not in deferred and i not in grammar_failed]
        if len(kept) < len(rows) and kept:  # the common case, every row sampled, copies nothing
            index = torch.tensor(kept, device=logits.device)
            logits, allowed = logits[index], None if allowed is None else allowed[index]
        if kept:
            picked = self._sample([rows[i] for i in kept], logits, allowed, output)
            for i, (token_id, logprob) in zip(kept, picked, strict=True):
                output.token_ids[i], output.logprobs[i] = token_id, logprob
        return self.settle(output, wait_s=0.0)

    def settle(self, output: StepOutput, wait_s: float) -> StepOutput:
        """Sample the deferred rows whose masks are ready (waiting up to `wait_s` for one of them) into
        `output.resolved`, or fail those whose grammar failed or ran out of time."""
        if not self._deferred:
            return output
        budget_ms = self.grammar_workers.budget_ms
        if wait_s > 0:
            tasks = [d.row.grammar.task for d in self._deferred.values() if d.row.grammar.task is not None]
            futures.wait(tasks, timeout=wait_s, return_when=futures.FIRST_COMPLETED)
        rows, logits, allowed = [], [], []
        for seq_id in [i for i, d in self._deferred.items() if ready(d.row.grammar, self.grammar_workers)]:
            deferred = self._deferred.pop(seq_id)
            mask, error = settle(deferred.row.grammar, self.vocab_size, budget_ms)
            if error is not None:
                output.failed[seq_id] = error
                continue
            rows.append(deferred.row)
            logits.append(deferred.logits)
            allowed.append(mask)
        if rows:
            masks = torch.from_numpy(np.stack(allowed)).to(logits[0].device)
            picked = self._sample(rows, torch.stack(logits), masks, output)
            for row, token in zip(rows, picked, strict=True):
                if row.seq_id not in output.failed:
                    output.resolved[row.seq_id] = token
        return output

    def _sample(
        self, rows: list[StepRow], logits: torch.Tensor, allowed: torch.Tensor | None, output: StepOutput
    ) -> list[tuple[int, float]]:
        """One token per row of `logits`: (id, log-probability) per row; a row that cannot be sampled goes
        to `output.failed`, and the rows asking for top log-probabilities get them in `output`."""
        batch = SamplingBatch(
            params=[row.sampling for row in rows],
            generators=[self._generator(row) for row in rows],
            history=[row.history for row in rows],
            outputs=[row.history[row.num_prompt_tokens :] for row in rows],
            allowed=allowed,
        )
        token_ids, logprobs = (values.tolist() for values in sample(logits, batch))
        for row, token_id in zip(rows, token_ids, strict=True):
            if token_id == FAILED:
                output.failed[row.seq_id] = "non-finite logits or probabilities"
        if wanted := [i for i, row in enumerate(rows) if row.sampling.top_logprobs]:
            ks = [rows[i].sampling.top_logprobs for i in wanted]
            index = torch.tensor(wanted, device=logits.device)
            tops = top_logprobs(logits[index], ks)
            output.top_logprobs.update(zip((rows[i].seq_id for i in wanted), tops, strict=True))
        return list(zip(token_ids, logprobs, strict=True))

    def _generator(self, row: StepRow) -> torch.Generator | None:
        """The random generator of the row's sequence, made (and seeded) at its first sampled token."""
        if row.sampling.greedy:
            return None
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = self._generators[row.seq_id] = torch.Generator(device=self.device)
            if row.sampling.seed is not None:
                generator.manual_seed(row.sampling.seed)
            else:
                generator.seed()
        return generator

"""One step of the engine loop: schedule, execute, update. Single-threaded; tested without threads.

    step   = scheduler.schedule()         # what to run, as plain values
    output = runner.execute(step)         # forward pass and sampling: token ids, log-probabilities
    result = scheduler.update(step, output)  # sequences advance; EOS and length set finish reasons

The output processor then turns the new tokens into events (text, stop sequences) and every sequence
that is done ends through `finish`, the one way a sequence ends, with or without an error.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from engine.core.load import EngineLoad
from engine.core.observer import EngineObserver
from engine.core.output import OutputProcessor
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.step import Step, StepOutput
from engine.errors import DeadlineExceededError, EngineError, RequestFailedError
from engine.request import GenerationEvent

log = logging.getLogger(__name__)

Outbox = list[tuple[Sequence, GenerationEvent | Exception]]


class StepRunner(Protocol):
    """What the core needs of the model runner."""

    def execute(self, step: Step) -> StepOutput: ...

    def close(self) -> None:
        """Release what the runner holds beside the model (its grammar workers); the loop's last call."""
        ...


class EngineCore:
    """Owns the scheduler, the runner and the output processor; events for callers go to an outbox."""

    def __init__(
        self, scheduler: Scheduler, runner: StepRunner, outputs: OutputProcessor, observer: EngineObserver
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.outputs = outputs
        self.observer = observer

    def load(self) -> EngineLoad:
        """The scheduler's and the KV cache's numbers now, for the loop thread to publish."""
        allocator = self.scheduler.allocator
        return EngineLoad(
            self.scheduler.num_waiting,
            self.scheduler.num_running,
            allocator.num_free,
            allocator.num_cached,
            allocator.num_blocks,
        )

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self.outputs.add(seq)

    def abort(self, seq_id: int, error: Exception, outbox: Outbox) -> None:
        """End a live sequence with `error` (cancelled, say); nothing happens if it already ended."""
        seq = self.scheduler.sequences.get(seq_id)
        if seq is not None:
            self.finish(seq, outbox, error)

    def abort_group(self, group_id: int, error: Exception, outbox: Outbox) -> None:
        """End every live completion of one request with `error`."""
        first = self.scheduler.sequences.get(group_id)
        if first is not None and first.request.n == 1:
            self.finish(first, outbox, error)
            return
        for seq in [s for s in self.scheduler.sequences.values() if s.group_id == group_id]:  # n > 1: rare
            self.finish(seq, outbox, error)

    def fail_all(self, error: Exception, outbox: Outbox) -> None:
        for seq in list(self.scheduler.sequences.values()):
            self.finish(seq, outbox, error)

    def finish(self, seq: Sequence, outbox: Outbox, error: Exception | None = None) -> None:
        """End a sequence: free its blocks, drop its output state, and tell its caller of `error` if any."""
        if seq.seq_id not in self.scheduler.sequences:
            return
        self.scheduler.finish(seq)
        self.outputs.finish(seq)
        self.observer.request_finished(seq, error)
        if error is not None:
            outbox.append((seq, error))

    def step(self, outbox: Outbox) -> None:
        """Run one engine step, if there is work; its events go to `outbox`."""
        self._finish_expired(outbox)
        step = self.scheduler.schedule()
        if step is None:
            return
        start = time.monotonic()
        try:
            output = self.runner.execute(step)
        except Exception as exc:  # an engine fault fails only the requests of this step
            log.exception("engine step failed")
            self.scheduler.step_failed(step)
            for row in step.rows:
                self.abort(row.seq_id, RequestFailedError(f"engine fault: {exc}"), outbox)
            return
        result = self.scheduler.update(step, output)
        for seq in result.forked:
            self.outputs.add(seq)
        for seq, reason in result.failed:
            if not isinstance(reason, EngineError):  # a row that could not be sampled: an engine fault
                reason = RequestFailedError(f"sampling failed: {reason}")
            self.finish(seq, outbox, reason)
        self.outputs.add_prompt_logprobs(output.prompt_logprobs)
        for seq, token_id, logprob in result.sampled:
            event = self.outputs.process(seq, token_id, logprob, output.top_logprobs.get(seq.seq_id))
            outbox.append((seq, event))
            if event.finished:
                self.finish(seq, outbox)
        if step.rows:  # a step of no rows only settled rows waiting for their grammar's masks
            allocator = self.scheduler.allocator
            kv_used = allocator.num_blocks - allocator.num_free
            self.observer.step_finished(step, start, time.monotonic(), kv_used, allocator.num_blocks)

    def _finish_expired(self, outbox: Outbox) -> None:
        now = time.monotonic()
        for seq in [s for s in self.scheduler.sequences.values() if s.expired(now)]:
            self.finish(seq, outbox, DeadlineExceededError(f"request {seq.id} passed its deadline"))

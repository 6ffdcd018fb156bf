"""Hooks the engine calls as requests and steps progress; telemetry implements them."""

from __future__ import annotations

from engine.core.sequence import Sequence
from engine.core.step import Step


class EngineObserver:
    """No-op base class. All hooks run on the step-loop thread but a request's `request_queued` (on the
    caller's thread): keep them cheap.

    Hooks must not raise: an exception would stop the step loop. `request_admitted` fires again when a
    preempted sequence is readmitted for recomputation.
    """

    def request_queued(self, seq: Sequence) -> None:
        """Called by `submit()` on the caller's thread for a request's completion 0; for completions 1 to
        n - 1, by the loop thread when it forks them from completion 0 (its prompt prefilled)."""

    def request_admitted(self, seq: Sequence) -> None:
        """The sequence leaves the queue for its first prefill chunk."""

    def first_token(self, seq: Sequence) -> None:
        """The sequence's first output token was sampled."""

    def request_preempted(self, seq: Sequence) -> None:
        """The sequence lost its KV blocks and went back to the queue."""

    def request_finished(self, seq: Sequence, error: Exception | None) -> None:
        """The sequence ended: `seq.finish_reason` is set, or `error` says why it failed."""

    def step_finished(self, step: Step, start: float, end: float, kv_used: int, kv_total: int) -> None:
        """One engine step ran; `start`/`end` are `time.monotonic()` instants."""

"""Sampled tokens to the events callers receive: text deltas, stop sequences, finish reasons, timing."""

from __future__ import annotations

import time

from engine.detokenizer import IncrementalDetokenizer
from engine.request import FinishReason, GenerationEvent, Timing, TokenInfo
from engine.sequence import Sequence


class OutputProcessor:
    """Per-request output state (the incremental detokenizer), keyed by sequence id.

    `process` may end a sequence by a stop sequence: it sets `finish_reason`, and the caller ends the
    sequence in the scheduler like one that reached EOS or its length.
    """

    def __init__(self, tokenizer, special_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        request = seq.request
        self._detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_ids, request.stopping.stop_sequences
        )

    def finish(self, seq: Sequence) -> None:
        self._detokenizers.pop(seq.seq_id, None)

    def process(self, seq: Sequence, token_id: int, logprob: float) -> GenerationEvent:
        """The event for one new token of `seq`; the last event of a request carries usage and timing."""
        detokenizer = self._detokenizers[seq.seq_id]
        token_text = detokenizer.add_token(token_id)
        if detokenizer.stopped:  # a stop sequence wins over EOS or length reached by the same token
            seq.finish_reason = FinishReason.STOP_SEQUENCE
        final = seq.finish_reason is not None
        token = TokenInfo(token_id, token_text, logprob, token_id in self.special_ids)
        event = GenerationEvent(seq.id, detokenizer.take_text(final=final), [token], index=seq.index)
        if final:
            _complete(event, seq)
        return event


def _complete(event: GenerationEvent, seq: Sequence) -> None:
    now = time.monotonic()
    arrival = seq.request.arrival_time
    event.finish_reason = seq.finish_reason
    event.prompt_tokens = seq.num_prompt_tokens
    event.completion_tokens = seq.num_completion_tokens
    event.cached_prompt_tokens = seq.num_cached_tokens
    event.timing = Timing(
        queue_s=(seq.admitted_time or now) - arrival,
        time_to_first_token_s=(seq.first_token_time or now) - arrival,
        total_s=now - arrival,
    )

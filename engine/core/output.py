"""Sampled tokens to the events callers receive: text deltas, stop sequences, finish reasons, timing."""

from __future__ import annotations

import time

from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.sequence import Sequence
from engine.core.step import PositionLogprobs
from engine.request import FinishReason, GenerationEvent, Timing, TokenInfo, TopLogprob


class OutputProcessor:
    """Per-request output state (the incremental detokenizer, scored prompt tokens not yet sent), keyed by
    sequence id.

    `process` is the one place that decides whether a token ends its sequence, and why (`finish_reason`:
    a stop sequence, EOS or the length); the caller then ends a finished sequence with `EngineCore.finish`.
    """

    def __init__(self, tokenizer, special_ids: set[int], eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.eos_token_ids = eos_token_ids
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._prompt_logprobs: dict[int, list[TokenInfo]] = {}  # sent with the sequence's first event

    def add(self, seq: Sequence) -> None:
        request = seq.request
        self._detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_ids, request.stopping.stop_sequences
        )

    def finish(self, seq: Sequence) -> None:
        self._detokenizers.pop(seq.seq_id, None)
        self._prompt_logprobs.pop(seq.seq_id, None)

    def process(
        self, seq: Sequence, token_id: int, logprob: float, top: list[tuple[int, float]] | None = None
    ) -> GenerationEvent:
        """The event for one new token of `seq` (with `top`, its most likely alternatives); the first event
        carries the scored prompt, the last usage and timing."""
        detokenizer = self._detokenizers[seq.seq_id]
        token_text = detokenizer.add_token(token_id)
        seq.finish_reason = self._finish_reason(seq, token_id, detokenizer.stopped)
        final = seq.finish_reason is not None
        token = TokenInfo(token_id, token_text, logprob, token_id in self.special_ids)
        if top:
            token.top_logprobs = self._alternatives(top)
        event = GenerationEvent(seq.id, detokenizer.take_text(final=final), [token], index=seq.index)
        if seq.seq_id in self._prompt_logprobs:
            event.prompt_logprobs = tuple(self._prompt_logprobs.pop(seq.seq_id))
        if final:
            _complete(event, seq)
        return event

    def _finish_reason(self, seq: Sequence, token_id: int, stopped: bool) -> FinishReason | None:
        """Why `seq` ends with `token_id`, its newest token, or None: a stop sequence wins over EOS or the
        length reached by the same token."""
        if stopped:
            return FinishReason.STOP_SEQUENCE
        if token_id in self.eos_token_ids and not seq.request.stopping.ignore_eos:
            return FinishReason.EOS
        if seq.num_completion_tokens >= seq.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def add_prompt_logprobs(self, scored: dict[int, list[PositionLogprobs]]) -> None:
        """Keep the prompt positions a step scored (by sequence id) for the sequences' first events."""
        for seq_id, positions in scored.items():
            if seq_id in self._detokenizers:
                self._prompt_logprobs.setdefault(seq_id, []).extend(self._prompt_token(p) for p in positions)

    def _prompt_token(self, p: PositionLogprobs) -> TokenInfo:
        special = p.token_id in self.special_ids
        return TokenInfo(p.token_id, self._text(p.token_id), p.logprob, special, self._alternatives(p.top))

    def _alternatives(self, top: list[tuple[int, float]]) -> tuple[TopLogprob, ...]:
        return tuple(TopLogprob(token_id, self._text(token_id), logprob) for token_id, logprob in top)

    def _text(self, token_id: int) -> str:
        """A token decoded on its own, special tokens included (what a list of alternatives should show)."""
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


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

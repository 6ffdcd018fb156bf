"""Incremental detokenization: text deltas that never split a UTF-8 character, and stop sequences."""

from __future__ import annotations

# Tokens of prompt context decoded with the first output tokens, so that leading-space rules
# (sentencepiece, byte-level BPE) produce the same text as decoding the whole sequence.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    `add_token` returns the text that token completes ("" while a multi-byte character is still
    incomplete). `take_text` returns the text that is safe to show: it holds back any tail that
    might be the start of a stop sequence, and cuts the output before a stop sequence once seen.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop_sequences: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pending = ""
        self.stopped = False

    def add_token(self, token_id: int) -> str:
        """Append one token; return the new text it completes and check stop sequences."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the bytes that complete it
        delta = full_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if not self.stopped:
            self._pending += delta
            self._check_stop()
        return delta

    def take_text(self, final: bool = False) -> str:
        """Return the text that may be emitted now; with `final`, everything that is left."""
        keep = 0 if (final or self.stopped) else self._held_back_length()
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _check_stop(self) -> None:
        hits = [i for i in (self._pending.find(s) for s in self.stop_sequences) if i >= 0]
        if hits:
            self._pending = self._pending[: min(hits)]
            self.stopped = True

    def _held_back_length(self) -> int:
        """Length of the longest tail of the pending text that begins some stop sequence."""
        longest = 0
        for stop in self.stop_sequences:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

"""Reasoning models' thinking, split from their answer: `<think>...</think>` at the start of an output.

With `--reasoning-parser think` (off by default, as vLLM's `--reasoning-parser`), an output that begins with
`<think>` (after whitespace) has everything up to `</think>` as its reasoning and the rest as its content;
an output cut off inside the block is all reasoning. Any other output is all content. The split works on
streamed text too: tag text is held back only while it may still be a tag.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_BEGIN, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("none", "think")

_START, _THINKING, _AFTER_THINKING, _ANSWER = "start", "thinking", "after thinking", "answer"


@dataclass(slots=True)
class Split:
    """New reasoning and new content."""

    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    """Splits one completion's text, fed as it arrives, into reasoning and content."""

    def __init__(self) -> None:
        self._state = _START
        self._buffer = ""

    def feed(self, text: str) -> Split:
        self._buffer += text
        split = Split()
        if self._state == _START:
            stripped = self._buffer.lstrip()
            if THINK_BEGIN.startswith(stripped):
                return split  # whitespace, or what may still become the tag
            if stripped.startswith(THINK_BEGIN):
                self._state, self._buffer = _THINKING, stripped[len(THINK_BEGIN) :]
            else:
                self._state = _ANSWER
        if self._state == _THINKING:
            end = self._buffer.find(THINK_END)
            if end < 0:
                cut = len(self._buffer) - partial_suffix(self._buffer, THINK_END)
                split.reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return split
            split.reasoning = self._buffer[:end]
            self._state, self._buffer = _AFTER_THINKING, self._buffer[end + len(THINK_END) :]
        if self._state == _AFTER_THINKING:  # the answer starts at its first non-whitespace character
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return split
            self._state = _ANSWER
        split.content, self._buffer = self._buffer, ""
        return split

    def finish(self) -> Split:
        """What is held at the end: the unfinished tag, as what it was part of."""
        held, self._buffer = self._buffer, ""
        return Split(reasoning=held) if self._state == _THINKING else Split(content=held)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`: text to hold back, as it may become it."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0

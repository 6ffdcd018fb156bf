"""A chat completion's text as OpenAI's assistant message: reasoning, content and tool calls apart.

The text goes through the reasoning split first (service/chat/reasoning.py, when the server has one) and its
content through the tool-call parser (service/chat/tool_calls.py, when the request has tools that may be
called); streamed, each event's text becomes the delta fields it completes.
"""

from __future__ import annotations

from service.chat.reasoning import ReasoningSplitter, Split
from service.chat.tool_calls import ParsedOutput, ToolCallDelta, ToolCallParser, arguments_deltas
from service.chat.tools import ToolCall, ToolRequest


class ChatOutput:
    """One completion's output read as it arrives: `delta` per event (the last one marked), or `message`
    for the whole text at once."""

    def __init__(self, tools: ToolRequest | None, reasoning: bool) -> None:
        self._splitter = ReasoningSplitter() if reasoning else None
        self._parser = ToolCallParser(tools) if tools is not None and tools.calls_allowed else None

    @property
    def called(self) -> bool:
        """Whether the model made a complete tool call (the finish reason is then `tool_calls`)."""
        return self._parser is not None and bool(self._parser.calls)

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls so far."""
        return self._parser.calls if self._parser is not None else []

    def delta(self, text: str, last: bool = False) -> dict:
        """The delta fields (`reasoning_content`, `content`, `tool_calls`) that `text` completes; with `last`,
        the text held until the end too."""
        split = self._splitter.feed(text) if self._splitter is not None else Split(content=text)
        if last and self._splitter is not None:
            rest = self._splitter.finish()
            split = Split(split.reasoning + rest.reasoning, split.content + rest.content)
        if self._parser is None:
            return _delta_fields(split.reasoning, ParsedOutput(split.content))
        parsed = self._parser.feed(split.content)
        if last:
            rest = self._parser.finish()
            parsed.content += rest.content
            parsed.calls += rest.calls
        return _delta_fields(split.reasoning, parsed)

    def message(self, text: str) -> dict:
        """The whole assistant message of `text`: `content` is null when the model only called tools."""
        fields = self.delta(text, last=True)
        content = fields.get("content", "")
        message: dict = {"role": "assistant", "content": content}
        if self._splitter is not None:
            message["reasoning_content"] = fields.get("reasoning_content")
        if self.called:
            assert self._parser is not None
            message["content"] = content or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self._parser.calls
            ]
        return message


def _delta_fields(reasoning: str, parsed: ParsedOutput) -> dict:
    fields: dict = {}
    if reasoning:
        fields["reasoning_content"] = reasoning
    if parsed.content:
        fields["content"] = parsed.content
    if parsed.calls:
        fields["tool_calls"] = [_delta_call(d) for d in arguments_deltas(parsed.calls)]
    return fields


def _delta_call(delta: ToolCallDelta) -> dict:
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}

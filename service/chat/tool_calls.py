"""Tool calls in the model's output: the grammar that makes them valid, and the parser that reads them back.

The calls are written as Hermes and Qwen write them, and as the generic format (service/chat/tools.py) asks:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call. The grammar (llguidance's Lark, run
by engine/core/structured.py) writes each call's head for one of the callable functions and its arguments as a
JSON value of that function's `parameters` schema, so every call is valid by construction:
- `required` and a named function: calls from the first token, one or (parallel) several, then the end;
- `auto`: any text, and a call from the moment the model writes `<tool_call>` (a lazy trigger), then text
  again (or, without parallel calls, the end).
The parser reads the same text as it streams: content until a call's tag, then the call's id and name, then
its arguments in fragments as they come (a prefix of valid JSON, which a grammar-constrained call can only
complete). Llama 3.x's own format, one bare `{"name": ..., "parameters": ...}` object (or several split by
`;`, or after `<|python_tag|>`), is recognised in `auto` at the start of an answer: that answer is held until
its end and becomes calls only if every one parses, names a tool and validates against its schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import jsonschema

from engine.core.structured import JSON_OPTIONS
from service.chat.reasoning import partial_suffix
from service.chat.tools import AUTO, CALL_BEGIN, CALL_END, Tool, ToolCall, ToolRequest, new_call_id

_PYTHON_TAG = "<|python_tag|>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
_MAX_HEAD_CHARS = 4096  # a call whose head is not done by then is no call of ours: its text is content


def grammar(tools: ToolRequest) -> str:
    """The Lark grammar of the output that `tools.choice` allows (`auto`, `required` or a named function)."""
    bodies = " | ".join(_call_body(tool) for tool in tools.callable_tools())
    calls = 'call ("\\n" call)*' if tools.parallel else "call"
    if tools.choice == AUTO:
        rules = [
            f"start: {'call_in_text* TEXT' if tools.parallel else 'TEXT | call_in_text'}",
            "TEXT: /(.|\\n)*/",
            f"trigger[lazy]: TEXT {json.dumps(CALL_BEGIN)}",
            f"call_in_text: trigger body {json.dumps(CALL_END)}",
        ]
    else:
        rules = [f"start: {calls}", f"call: {json.dumps(CALL_BEGIN)} body {json.dumps(CALL_END)}"]
    return "\n".join(["%llguidance {}", *rules, f"body: {bodies}"]) + "\n"


def _call_body(tool: Tool) -> str:
    head = json.dumps('{"name":' + json.dumps(tool.name) + ',"arguments":')
    schema = {**tool.parameters, "x-guidance": JSON_OPTIONS}  # compact, as a response format's JSON
    return f'({head} %json {json.dumps(schema)} "}}")'


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of call `index`: its first has the id and name (and no arguments yet), the next ones add
    arguments text; the arguments of one call, joined, are its JSON."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedOutput:
    """What a stretch of output adds: plain content, and pieces of tool calls."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


_TEXT, _HEAD_STATE, _ARGUMENTS, _TAIL, _HELD = "text", "head", "arguments", "tail", "held"


class ToolCallParser:
    """Reads tool calls out of one completion's text as it arrives (`feed`, then `finish` at its end).

    `calls` holds the complete calls so far. Whitespace between calls is not content.
    """

    def __init__(self, tools: ToolRequest) -> None:
        self._tools = {tool.name: tool for tool in tools.tools}
        self._bare_json = tools.choice == AUTO  # Llama 3.x's format is recognised in auto only
        self._state = _TEXT
        self._buffer = ""
        self._started = False  # any non-whitespace text seen (the bare format counts only at the start)
        self._current: ToolCall | None = None
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> ParsedOutput:
        """The content and call pieces that `text` completes; text that may still turn out a call is held."""
        out = ParsedOutput()
        self._buffer += text
        while self._buffer and self._step(out):
            pass
        return out

    def finish(self) -> ParsedOutput:
        """The rest at the end of the output: held text becomes content (or, bare JSON, calls); a call cut off
        by the end stays incomplete and out of `calls`."""
        out = ParsedOutput()
        if self._state == _HELD:
            self._finish_bare(out)
        elif self._state == _TEXT and not (self.calls and not self._buffer.strip()):
            out.content = self._buffer
        self._buffer = ""
        return out

    # ---- states: each step consumes some of the buffer, or returns False to wait for more text ----

    def _step(self, out: ParsedOutput) -> bool:
        if self._state == _TEXT:
            return self._text(out)
        if self._state == _HEAD_STATE:
            return self._head(out)
        if self._state == _ARGUMENTS:
            return self._arguments(out)
        if self._state == _TAIL:
            return self._tail()
        return False  # _HELD: the whole answer is read at its end

    def _text(self, out: ParsedOutput) -> bool:
        buffer = self._buffer
        stripped = buffer.lstrip()
        if self._bare_json and not self._started and stripped:
            if stripped.startswith(("{", _PYTHON_TAG)):
                self._state = _HELD
                return False
            if _PYTHON_TAG.startswith(stripped) and not CALL_BEGIN.startswith(stripped):
                return False  # may still be the tag
            self._started = not _PYTHON_TAG.startswith(stripped)
        start = buffer.find(CALL_BEGIN)
        if start >= 0:
            self._emit_content(out, buffer[:start])
            self._buffer = buffer[start + len(CALL_BEGIN) :]
            self._state = _HEAD_STATE
            return True
        keep = partial_suffix(buffer, CALL_BEGIN)
        if buffer[: len(buffer) - keep].strip():
            self._emit_content(out, buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep :]
        return False

    def _emit_content(self, out: ParsedOutput, text: str) -> None:
        if text.strip() or not self.calls:  # whitespace between calls is no content
            out.content += text

    def _head(self, out: ParsedOutput) -> bool:
        match = _HEAD.match(self._buffer)
        if match is None:
            if len(self._buffer) > _MAX_HEAD_CHARS:  # not a call after all
                out.content += CALL_BEGIN + self._buffer
                self._buffer, self._state = "", _TEXT
            return False
        self._current = ToolCall(new_call_id(), json.loads(match.group(1)), "")
        out.calls.append(ToolCallDelta(len(self.calls), self._current.id, self._current.name))
        self._buffer = self._buffer[match.end() :]
        self._state, self._depth, self._in_string, self._escaped = _ARGUMENTS, 0, False, False
        return True

    def _arguments(self, out: ParsedOutput) -> bool:
        """Passes the arguments' JSON on until the value closes, following strings and nesting."""
        assert self._current is not None
        end = None
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
            if self._depth == 0 and not self._in_string and not char.isspace():
                end = i + 1  # a value closed (arguments are objects; a scalar ends here too)
                break
        fragment = self._buffer if end is None else self._buffer[:end]
        self._current.arguments += fragment
        if fragment:
            out.calls.append(ToolCallDelta(len(self.calls), arguments=fragment))
        self._buffer = "" if end is None else self._buffer[end:]
        if end is not None:
            self._state = _TAIL
        return end is not None

    def _tail(self) -> bool:
        end = self._buffer.find(CALL_END)
        if end < 0:
            return False
        assert self._current is not None
        self.calls.append(self._current)
        self._current, self._buffer, self._state = None, self._buffer[end + len(CALL_END) :], _TEXT
        return True

    def _finish_bare(self, out: ParsedOutput) -> None:
        calls = _bare_calls(self._buffer, self._tools)
        if calls is None:
            out.content = self._buffer
            return
        for call in calls:
            out.calls.append(ToolCallDelta(len(self.calls), call.id, call.name))
            out.calls.append(ToolCallDelta(len(self.calls), arguments=call.arguments))
            self.calls.append(call)


def _bare_calls(text: str, tools: dict[str, Tool]) -> list[ToolCall] | None:
    """Llama 3.x's calls in a whole answer, or None unless every one is a valid call of a tool."""
    text = text.strip().removeprefix(_PYTHON_TAG).strip()
    decoder, calls, position = json.JSONDecoder(), [], 0
    while position < len(text):
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        call = _bare_call(value, tools)
        if call is None:
            return None
        calls.append(call)
        position = len(text) - len(text[position:].lstrip().removeprefix(";").lstrip())
    return calls or None


def _bare_call(value: object, tools: dict[str, Tool]) -> ToolCall | None:
    if not isinstance(value, dict) or set(value) not in ({"name", "parameters"}, {"name", "arguments"}):
        return None
    tool = tools.get(value["name"]) if isinstance(value["name"], str) else None
    arguments = value.get("parameters", value.get("arguments"))
    if tool is None or not jsonschema.Draft202012Validator(tool.parameters).is_valid(arguments):
        return None
    return ToolCall(new_call_id(), tool.name, json.dumps(arguments))


def parse_all(tools: ToolRequest, text: str) -> tuple[str, list[ToolCall]]:
    """A whole completion's content and its complete calls."""
    parser = ToolCallParser(tools)
    first, last = parser.feed(text), parser.finish()
    return first.content + last.content, parser.calls


def arguments_deltas(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Deltas merged per call, in order: a call's head and the arguments that came with it are one piece."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        if merged and merged[-1].index == delta.index and delta.id is None:
            merged[-1].arguments += delta.arguments
        else:
            merged.append(ToolCallDelta(delta.index, delta.id, delta.name, delta.arguments))
    return merged

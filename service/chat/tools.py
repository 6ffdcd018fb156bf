"""Tools a chat may call: the request's tools and tool choice, and the chat rendered for the model's template.

Both fronts build the same values (`ToolRequest`, `ToolCall`) from their own wire format (OpenAI's JSON,
textgen.v1's protos); what the model is asked, how the calls are constrained (service/chat/tool_calls.py) and
read back is one path for both. A template that knows tools (its source names `tools`: Qwen, Hermes,
Llama 3.x, ...) gets them as `apply_chat_template(tools=...)`, with `tool` messages and assistant
`tool_calls` in the shape Hugging Face documents; a template that does not (SmolLM2) gets the generic
format: a system block listing the tools' schemas and asking for `<tool_call>{"name", "arguments"}
</tool_call>` lines, calls in the history written that way, and tool results as `<tool_response>` user
turns.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.frontend.limits import Violation

AUTO, NONE, REQUIRED, FUNCTION = "auto", "none", "required", "function"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule for function names
# A tool without parameters takes an empty object, as OpenAI's API says: that one alone.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: dict(NO_PARAMETERS))

    def openai(self) -> dict:
        """The tool as OpenAI's API (and Hugging Face chat templates) write it."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(slots=True)
class ToolRequest:
    """A request's tools and how the model may use them.

    `choice`: `auto` (the model decides; a call it starts is grammar-constrained from its first tag),
    `required` (at least one call, constrained from the first token), `function` (one call of `function`),
    or `none` (no call: the tools are not shown to the model). `parallel`: more than one call allowed.
    """

    tools: tuple[Tool, ...]
    choice: str = AUTO
    function: str | None = None
    parallel: bool = True

    @property
    def calls_allowed(self) -> bool:
        return self.choice != NONE and bool(self.tools)

    def callable_tools(self) -> tuple[Tool, ...]:
        """The tools a call may name: the named function alone, or all of them."""
        if self.choice == FUNCTION:
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools


@dataclass(slots=True)
class ToolCall:
    """One call the model made (or made earlier, in a chat's history): `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class ChatTurn:
    """One message as the template renders it: a role, its text, its tool calls or the call it answers."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


# ---- OpenAI's JSON ----------------------------------------------------------------------------------------


def parse_openai(body: dict, violations: list[Violation]) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat body; None without tools. Bad values are
    added to `violations`, each naming its parameter."""
    raw_tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        violations.append(("parallel_tool_calls", "must be true or false"))
    if raw_tools is None or raw_tools == []:
        if choice not in (None, NONE):
            violations.append(("tool_choice", "needs tools"))
        return None
    if not isinstance(raw_tools, list):
        violations.append(("tools", "must be a list of tools"))
        return None
    tools = [_openai_tool(t, f"tools[{i}]", violations) for i, t in enumerate(raw_tools)]
    names = [t.name for t in tools if t is not None]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        violations.append(("tools", f"function names must be unique, repeated: {', '.join(duplicates)}"))
    request = ToolRequest(tuple(t for t in tools if t is not None), parallel=parallel is not False)
    if choice is None or choice in (AUTO, NONE, REQUIRED):
        request.choice = choice or AUTO
    elif (
        isinstance(choice, dict)
        and choice.get("type") == FUNCTION
        and isinstance(choice.get("function"), dict)
    ):
        request.choice, request.function = FUNCTION, choice["function"].get("name")
        if request.function not in names:
            violations.append(
                ("tool_choice.function.name", f"must name one of the tools: {', '.join(names)}")
            )
    else:
        violations.append(
            (
                "tool_choice",
                'must be "none", "auto", "required" or {"type": "function", "function": {"name"}}',
            )
        )
    return request


def _openai_tool(tool: object, path: str, violations: list[Violation]) -> Tool | None:
    if (
        not isinstance(tool, dict)
        or tool.get("type") != FUNCTION
        or not isinstance(tool.get("function"), dict)
    ):
        violations.append((path, 'must be {"type": "function", "function": {...}}'))
        return None
    function = tool["function"]
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    violations += [(f"{path}.function.{name}", "is not supported") for name in unknown]
    name, description = function.get("name"), function.get("description") or ""
    parameters = function.get("parameters")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        violations.append((f"{path}.function.name", "must be 1 to 64 letters, digits, '_', '.' or '-'"))
        return None
    if not isinstance(description, str):
        violations.append((f"{path}.function.description", "must be a string"))
    if parameters is not None and not isinstance(parameters, dict):
        violations.append((f"{path}.function.parameters", "must be a JSON schema (an object)"))
        return None
    return Tool(name, description if isinstance(description, str) else "", parameters or dict(NO_PARAMETERS))


def parse_openai_message(message: dict, path: str, violations: list[Violation]) -> dict:
    """The tool fields of one chat message (`tool_calls` of an assistant, `tool_call_id` and `name` of a
    tool result) as `ChatTurn` keyword arguments."""
    fields: dict = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            violations.append((f"{path}.tool_calls", "must be a list of tool calls"))
            calls = []
        fields["tool_calls"] = tuple(
            call
            for i, c in enumerate(calls)
            if (call := _openai_call(c, f"{path}.tool_calls[{i}]", violations))
        )
    for name in ("tool_call_id", "name"):
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            violations.append((f"{path}.{name}", "must be a string"))
        elif value is not None:
            fields[name] = value
    return fields


def _openai_call(call: object, path: str, violations: list[Violation]) -> ToolCall | None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        violations.append((path, 'must be {"id", "type": "function", "function": {"name", "arguments"}}'))
        return None
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        violations.append((f"{path}.function.arguments", "must be a string of JSON"))
        return None
    return ToolCall(str(call.get("id") or ""), function["name"], arguments)


# ---- the chat template's input ----------------------------------------------------------------------------

CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
_GENERIC_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. The functions are described by "
    "these JSON schemas:\n<tools>\n{tools}\n</tools>\nTo call a function, answer with one line per call:\n"
    f'{CALL_BEGIN}{{{{"name": <function name>, "arguments": <its arguments as a JSON object>}}}}{CALL_END}'
)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A chat as admission renders it (engine/frontend/admission.py `Chat`): its turns and its tools."""

    turns: Sequence[ChatTurn]
    tools: ToolRequest | None = None

    @property
    def messages(self) -> Sequence[ChatTurn]:
        return self.turns

    def template_inputs(self, chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
        return template_inputs(chat_template, self.turns, self.tools)


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (Hugging Face's convention for tool use)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def template_inputs(
    chat_template: str | None, turns: Sequence[ChatTurn], tools: ToolRequest | None
) -> tuple[list[dict], list[dict] | None]:
    """The `messages` and `tools` to give `apply_chat_template`: the template's own tool format where it has
    one, the generic format where it has none. Tools are shown unless the choice is `none`."""
    shown = [t.openai() for t in tools.tools] if tools is not None and tools.calls_allowed else None
    if template_knows_tools(chat_template):
        return [_hf_message(turn) for turn in turns], shown
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        message = _generic_message(turn)
        if (
            turn.role == "tool" and i and turns[i - 1].role == "tool"
        ):  # one user turn: templates may alternate
            messages[-1]["content"] += "\n" + message["content"]
        else:
            messages.append(message)
    if shown:
        block = _GENERIC_INSTRUCTIONS.format(tools="\n".join(json.dumps(t) for t in shown))
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + block}
        else:
            messages.insert(0, {"role": "system", "content": block})
    return messages, None


def _hf_message(turn: ChatTurn) -> dict:
    message: dict = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c)}}
            for c in turn.tool_calls
        ]
    if turn.tool_call_id is not None:
        message["tool_call_id"] = turn.tool_call_id
    if turn.name is not None:
        message["name"] = turn.name
    return message


def _arguments(call: ToolCall) -> object:
    """Templates write arguments with `tojson`: a dict, as Hugging Face documents, unless it is no JSON."""
    try:
        return json.loads(call.arguments)
    except json.JSONDecodeError:
        return call.arguments


def call_text(name: str, arguments: object) -> str:
    """One call in the generic format."""
    return f"{CALL_BEGIN}{json.dumps({'name': name, 'arguments': arguments})}{CALL_END}"


def _generic_message(turn: ChatTurn) -> dict:
    if turn.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{turn.content}\n</tool_response>"}
    if turn.tool_calls:
        calls = "\n".join(call_text(c.name, _arguments(c)) for c in turn.tool_calls)
        return {"role": turn.role, "content": (turn.content + "\n" if turn.content else "") + calls}
    return {"role": turn.role, "content": turn.content}

"""textgen.v1's tools and reasoning: `ChatInput` tools in, tool calls and reasoning out, on the same path as
the HTTP front's (service/chat/tools.py, service/chat/tool_calls.py, service/chat/output.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from engine.frontend.limits import Violation
from engine.request import GenerationEvent, ResponseFormat
from protos.textgen.v1 import textgen_pb2 as pb
from service.chat import tool_calls
from service.chat.output import ChatOutput
from service.chat.tools import (
    AUTO,
    FUNCTION,
    NAME,
    NO_PARAMETERS,
    NONE,
    REQUIRED,
    ChatTurn,
    Tool,
    ToolCall,
    ToolRequest,
    template_inputs,
)

_MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: AUTO,
    pb.TOOL_CHOICE_MODE_AUTO: AUTO,
    pb.TOOL_CHOICE_MODE_NONE: NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: REQUIRED,
}


def tool_request(chat: pb.ChatInput, violations: list[Violation] | None = None) -> ToolRequest | None:
    """The chat's tools (None without any); what is wrong with them goes to `violations` when given."""
    violations = [] if violations is None else violations
    if not chat.tools:
        choice = chat.tool_choice
        if choice.WhichOneof("choice") == "function" or choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED:
            violations.append(("chat.tool_choice", "needs chat.tools"))
        return None
    tools = [_tool(t, f"chat.tools[{i}]", violations) for i, t in enumerate(chat.tools)]
    names = [t.name for t in tools]
    if len(set(names)) < len(names):
        violations.append(("chat.tools", "function names must be unique"))
    parallel = not chat.HasField("parallel_tool_calls") or chat.parallel_tool_calls
    request = ToolRequest(tuple(tools), parallel=parallel)
    if chat.tool_choice.WhichOneof("choice") == "function":
        request.choice, request.function = FUNCTION, chat.tool_choice.function
        if request.function not in names:
            violations.append(
                ("chat.tool_choice.function", f"must name one of the tools: {', '.join(names)}")
            )
    elif chat.tool_choice.mode in _MODES:
        request.choice = _MODES[chat.tool_choice.mode]
    else:
        violations.append(("chat.tool_choice.mode", f"unknown mode {chat.tool_choice.mode}"))
    return request


def _tool(tool: pb.Tool, path: str, violations: list[Violation]) -> Tool:
    if not NAME.fullmatch(tool.name):
        violations.append((f"{path}.name", "must be 1 to 64 letters, digits, '_', '.' or '-'"))
    parameters: object = dict(NO_PARAMETERS)
    if tool.parameters:
        try:
            parameters = json.loads(tool.parameters)
        except json.JSONDecodeError as e:
            violations.append((f"{path}.parameters", f"is not valid JSON: {e}"))
        if not isinstance(parameters, dict):
            violations.append((f"{path}.parameters", "must be a JSON schema (an object)"))
            parameters = dict(NO_PARAMETERS)
    return Tool(tool.name, tool.description, parameters)


def violations(request: pb.GenerateRequest | pb.TokenizeRequest) -> list[Violation]:
    """What is wrong with a chat's tools, and tools beside a response format that both would constrain."""
    found: list[Violation] = []
    tools = tool_request(request.chat, found)
    structured = isinstance(request, pb.GenerateRequest) and request.HasField("response_format")
    if tools is not None and tools.calls_allowed and structured:
        found.append(("chat.tools", "cannot be combined with a response_format, unless tool_choice is none"))
    return found


def response_format(request: pb.GenerateRequest) -> ResponseFormat | None:
    """The grammar of the calls the chat's tools allow; None when no call may be made."""
    if request.WhichOneof("input") != "chat" or request.HasField("response_format"):
        return None
    tools = tool_request(request.chat)
    if tools is None or not tools.calls_allowed:
        return None
    return ResponseFormat(lark=tool_calls.grammar(tools))


@dataclass(frozen=True, slots=True)
class ProtoChat:
    """A `ChatInput` as admission renders it (engine/frontend/admission.py `Chat`): its messages are sized as
    sent, and read into turns and tools only when rendered."""

    chat: pb.ChatInput

    @property
    def messages(self) -> Sequence[pb.ChatMessage]:
        return self.chat.messages

    def template_inputs(self, chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
        return template_inputs(chat_template, turns(self.chat), tool_request(self.chat))


def turns(chat: pb.ChatInput) -> list[ChatTurn]:
    return [
        ChatTurn(
            m.role,
            m.content,
            tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
            m.tool_call_id or None,
            m.name or None,
        )
        for m in chat.messages
    ]


class ProtoChatOutput:
    """Each completion's text, read for reasoning and calls when the server or the chat asks for it."""

    def __init__(self, request: pb.GenerateRequest, reasoning: bool) -> None:
        tools = tool_request(request.chat) if request.WhichOneof("input") == "chat" else None
        self._reading = request.WhichOneof("input") == "chat" and (
            reasoning or (tools is not None and tools.calls_allowed)
        )
        self._tools, self._reasoning = tools, reasoning
        self._outputs: dict[int, ChatOutput] = {}
        self._num_sent: dict[int, int] = {}

    def response(self, response: pb.GenerateResponse) -> pb.GenerateResponse:
        """`response` (from translate.response) with each completion's text split into its parts."""
        if not self._reading:
            return response
        for completion in response.completions:
            output = ChatOutput(self._tools, self._reasoning)
            message = output.message(completion.text)
            completion.text = message["content"] or ""
            completion.reasoning = message.get("reasoning_content") or ""
            completion.tool_calls.extend(_proto_calls(output.calls))
        first = response.completions[0]
        response.text, response.reasoning = first.text, first.reasoning
        response.tool_calls.extend(first.tool_calls)
        return response

    def stream_response(self, event: GenerationEvent, message: pb.GenerateStreamResponse) -> None:
        """Splits the text of `message` (from translate.stream_response) in place."""
        if not self._reading:
            return
        output = self._outputs.setdefault(event.index, ChatOutput(self._tools, self._reasoning))
        delta = output.delta(event.text, event.finished)
        message.text = delta.get("content", "")
        message.reasoning = delta.get("reasoning_content", "")
        sent = self._num_sent.get(event.index, 0)
        message.tool_calls.extend(_proto_calls(output.calls[sent:]))
        self._num_sent[event.index] = len(output.calls)


def _proto_calls(calls: Sequence[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]

"""Checks of a textgen.v1 request's proto shape; the engine's rules are admission's (engine/frontend)."""

from __future__ import annotations

from engine.frontend.admission import Prompt, check_input_size
from engine.frontend.limits import RequestLimits, Violation
from protos.textgen.v1 import textgen_pb2 as pb
from service.grpc import tool_protos, translate
from service.status import InvalidArgument

MAX_REQUEST_ID_LENGTH = 128


def generate_request_violations(request: pb.GenerateRequest) -> list[Violation]:
    """What is wrong with `request`'s shape: an input, a short request_id, roles in a chat, its tools.

    Admission (engine/frontend/admission.py) reports these with the engine's rules on its parameters, all
    before its prompt is tokenized, and an input over a size limit first, for that alone.
    """
    violations = []
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"))
    violations += _input_violations(request)
    if request.WhichOneof("input") == "chat":
        violations += tool_protos.violations(request)
    return violations


def check_tokenize_request(request: pb.TokenizeRequest, limits: RequestLimits) -> Prompt:
    """The input of `request`; raises `InvalidArgument` when it has none or an empty chat, `PromptTooLong`
    when it is over a size limit (nothing tokenized)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument([("input", "one of text or chat is required")])
    prompt = translate.prompt(request)
    check_input_size(prompt, limits)  # its field paths are the engine's: the servicer renames them
    if kind == "chat":
        violations = _chat_violations(request.chat) + tool_protos.violations(request)
        if violations:
            raise InvalidArgument(violations)
    return prompt


def _input_violations(request: pb.GenerateRequest) -> list[tuple[str, str]]:
    kind = request.WhichOneof("input")
    if kind is None:
        return [("input", "one of prompt, chat or input_ids is required")]
    if kind == "chat":
        return _chat_violations(request.chat)
    if kind == "input_ids" and not request.input_ids.ids:
        return [("input_ids.ids", "must not be empty")]
    return []


def _chat_violations(chat: pb.ChatInput) -> list[tuple[str, str]]:
    if not chat.messages:
        return [("chat.messages", "must not be empty")]
    return [
        (f"chat.messages[{i}].role", "must not be empty")
        for i, message in enumerate(chat.messages)
        if not message.role
    ]

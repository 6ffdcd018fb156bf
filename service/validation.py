"""Checks of a request's proto shape, and the engine's rules (engine/frontend/limits.py) needing no tokens."""

from __future__ import annotations

from engine.frontend.limits import RequestLimits, input_size_violations, n_violations, parameter_violations
from protos.textgen.v1 import textgen_pb2 as pb
from service.grpc import tool_protos, translate
from service.status import InvalidArgument, PromptTooLong

MAX_REQUEST_ID_LENGTH = 128


def check_generate_request(request: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Raise `InvalidArgument` naming every field of `request` that is wrong before tokenization.

    That is its shape (an input, a short request_id, roles in a chat) and the engine's rules on its
    parameters, checked here so that a bad request is refused before its prompt is tokenized. An input over
    a size limit is refused first, for that alone (`PromptTooLong`), before anything else in it is read.
    """
    check_input_size(request, limits)
    violations = []
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"))
    violations += _input_violations(request)
    if request.WhichOneof("input") == "chat":
        violations += tool_protos.violations(request)
    sampling = translate.request_sampling(request)
    stopping = translate.stopping_params(request.stopping)
    kind = request.WhichOneof("input")
    violations += translate.proto_violations(parameter_violations(sampling, stopping, limits), kind)
    violations += n_violations(translate.num_completions(request), limits)
    if violations:
        raise InvalidArgument(violations)


def check_tokenize_request(request: pb.TokenizeRequest, limits: RequestLimits) -> None:
    """Raise `InvalidArgument` when `request` has no input or an empty chat, `PromptTooLong` when too long."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument([("input", "one of text or chat is required")])
    check_input_size(request, limits)
    if kind == "chat":
        violations = _chat_violations(request.chat) + tool_protos.violations(request)
        if violations:
            raise InvalidArgument(violations)


def check_input_size(request: pb.GenerateRequest | pb.TokenizeRequest, limits: RequestLimits) -> None:
    """Raise `PromptTooLong` when the request's input is over the engine's size limits (nothing tokenized)."""
    kind = request.WhichOneof("input")
    if kind in ("prompt", "text"):
        violations = input_size_violations(limits, prompt=getattr(request, kind))
    elif kind == "chat":
        violations = input_size_violations(limits, messages=request.chat.messages)
    elif kind == "input_ids":
        violations = input_size_violations(limits, num_prompt_ids=len(request.input_ids.ids))
    else:
        return
    if violations:
        raise PromptTooLong(translate.proto_violations(violations, kind))


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

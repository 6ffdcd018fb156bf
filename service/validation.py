"""Checks on a request's proto fields, so that errors name the field a client sent."""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos.textgen.v1 import textgen_pb2 as pb
from service.status import InvalidArgument

MAX_REQUEST_ID_LENGTH = 128
MAX_REPETITION_PENALTY = 10.0
MAX_ABS_FREQUENCY_PRESENCE_PENALTY = 2.0


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a request may ask for on this server."""

    max_context_len: int
    vocab_size: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_stop_sequences: int
    max_stop_sequence_length: int


def check_generate_request(request: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Raise `InvalidArgument` naming every field of `request` that can never be served."""
    violations = []
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"))
    violations += _input_violations(request, limits)
    violations += _sampling_violations(request.sampling)
    violations += _stopping_violations(request.stopping, limits)
    if violations:
        raise InvalidArgument(violations)


def check_tokenize_request(request: pb.TokenizeRequest) -> None:
    """Raise `InvalidArgument` when `request` has no input or an empty chat."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument([("input", "one of text or chat is required")])
    if kind == "chat":
        violations = _chat_violations(request.chat)
        if violations:
            raise InvalidArgument(violations)


def check_prompt_length(request: pb.GenerateRequest, num_prompt_tokens: int, limits: RequestLimits) -> int:
    """The request's max_new_tokens, resolving 0 to the default; raises if the prompt cannot fit.

    A default max_new_tokens shrinks to fit the context; an explicit one must fit as given.
    """
    kind = request.WhichOneof("input")
    context = limits.max_context_len
    if num_prompt_tokens == 0:
        raise InvalidArgument([(kind, "is empty after tokenization")])
    if num_prompt_tokens >= context:
        raise InvalidArgument(
            [
                (
                    kind,
                    f"is {num_prompt_tokens} tokens; the model's context is {context} tokens, "
                    "which must also hold at least one new token",
                ),
            ]
        )
    max_new_tokens = request.stopping.max_new_tokens
    if max_new_tokens == 0:
        return min(limits.default_max_new_tokens, context - num_prompt_tokens)
    if num_prompt_tokens + max_new_tokens > context:
        raise InvalidArgument(
            [
                (
                    "stopping.max_new_tokens",
                    f"the prompt ({num_prompt_tokens} tokens) plus max_new_tokens "
                    f"({max_new_tokens}) exceeds the model's context of {context} tokens",
                ),
            ]
        )
    return max_new_tokens


def _input_violations(request: pb.GenerateRequest, limits: RequestLimits) -> list[tuple[str, str]]:
    kind = request.WhichOneof("input")
    if kind is None:
        return [("input", "one of prompt, chat or input_ids is required")]
    if kind == "prompt" and not request.prompt:
        return [("prompt", "must not be empty")]
    if kind == "chat":
        return _chat_violations(request.chat)
    if kind == "input_ids":
        ids = request.input_ids.ids
        if not ids:
            return [("input_ids.ids", "must not be empty")]
        return [
            (f"input_ids.ids[{i}]", f"{token_id} is not below the vocabulary size {limits.vocab_size}")
            for i, token_id in enumerate(ids)
            if token_id >= limits.vocab_size
        ][:1]
    return []


def _chat_violations(chat: pb.ChatInput) -> list[tuple[str, str]]:
    if not chat.messages:
        return [("chat.messages", "must not be empty")]
    return [
        (f"chat.messages[{i}].role", "must not be empty")
        for i, message in enumerate(chat.messages)
        if not message.role
    ]


def _sampling_violations(sampling: pb.SamplingParameters) -> list[tuple[str, str]]:
    violations = []

    def check(name: str, ok: bool, rule: str) -> None:
        value = getattr(sampling, name)
        if not (math.isfinite(value) and ok):
            violations.append((f"sampling.{name}", f"must be {rule}, got {value:g}"))

    if sampling.HasField("temperature"):
        check("temperature", sampling.temperature >= 0, ">= 0")
    if sampling.top_k < 0:
        violations.append(("sampling.top_k", f"must be >= 0 (0 is off), got {sampling.top_k}"))
    if sampling.HasField("top_p"):
        check("top_p", 0 < sampling.top_p <= 1, "in (0, 1]")
    if sampling.HasField("min_p"):
        check("min_p", 0 <= sampling.min_p <= 1, "in [0, 1]")
    if sampling.HasField("repetition_penalty"):
        check(
            "repetition_penalty",
            0 < sampling.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"in (0, {MAX_REPETITION_PENALTY:g}]",
        )
    bound = MAX_ABS_FREQUENCY_PRESENCE_PENALTY
    check("frequency_penalty", abs(sampling.frequency_penalty) <= bound, f"in [-{bound:g}, {bound:g}]")
    check("presence_penalty", abs(sampling.presence_penalty) <= bound, f"in [-{bound:g}, {bound:g}]")
    return violations


def _stopping_violations(stopping: pb.StoppingCriteria, limits: RequestLimits) -> list[tuple[str, str]]:
    violations = []
    if stopping.max_new_tokens > limits.max_new_tokens_limit:
        violations.append(
            (
                "stopping.max_new_tokens",
                f"must be at most {limits.max_new_tokens_limit}, got {stopping.max_new_tokens}",
            )
        )
    if len(stopping.stop_sequences) > limits.max_stop_sequences:
        violations.append(
            (
                "stopping.stop_sequences",
                f"at most {limits.max_stop_sequences} allowed, got {len(stopping.stop_sequences)}",
            )
        )
    for i, stop in enumerate(stopping.stop_sequences):
        if not stop:
            violations.append((f"stopping.stop_sequences[{i}]", "must not be empty"))
        elif len(stop) > limits.max_stop_sequence_length:
            violations.append(
                (
                    f"stopping.stop_sequences[{i}]",
                    f"must be at most {limits.max_stop_sequence_length} characters, got {len(stop)}",
                )
            )
    return violations

"""Engine events as OpenAI's HTTP API answers them: whole responses (from the fold of a request's events,
engine/frontend/results.py), stream chunks, and errors with OpenAI's body."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.rpc import code_pb2

from engine.errors import InvalidRequestError
from engine.frontend.engine import Engine, ModelInfo
from engine.frontend.results import GenerationResult, fold
from engine.request import FinishReason, GenerationEvent, TokenInfo
from service.chat.output import ChatOutput
from service.openai.request import CHAT, COMPLETION, OpenAIRequest
from service.status import InvalidArgument, ModelNotFound, classify, retry_pushback_ms, to_status

MIN_LOGPROB = -9999.0  # JSON has no -Infinity: an impossible token's log-probability is this (as vLLM)
_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}
# vLLM's structured-output parameters: `guided_*` at the top level, or the keys of `structured_outputs`.


@dataclass(slots=True)
class ResponseHeader:
    """What every response and chunk of one request repeats."""

    id: str
    model: str
    endpoint: str
    created: int = field(default_factory=lambda: int(time.time()))

    def fields(self, chunk: bool) -> dict:
        if self.endpoint == COMPLETION:
            kind = "text_completion"
        else:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def models_response(info: ModelInfo) -> dict:
    """`/v1/models`: the one model served."""
    model = {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "textgen",
        "root": info.name,  # vLLM's field for the model's path, which gateways read
        "max_model_len": info.max_context_len,
    }
    return {"object": "list", "data": [model]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; `cached_tokens`: prompt tokens the prefix cache held (the caller's partition's)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(slots=True)
class EchoedPrompt:
    """What `echo` puts before a completion: the prompt's text, and its first token's text (the one token
    that is not scored: nothing comes before it)."""

    text: str
    first_token: str

    @classmethod
    def of(cls, engine: Engine, prompt: str | None, prompt_ids: list[int]) -> EchoedPrompt:
        """The prompt as sent, or its token ids decoded (blocking: call it off the event loop)."""
        text = engine.decode(prompt_ids, skip_special_tokens=False) if prompt is None else prompt
        return cls(text, engine.decode(prompt_ids[:1], skip_special_tokens=False))

    def logprobs(self, scored: Sequence[TokenInfo]) -> dict:
        """The prompt's part of a choice's `logprobs`: the first token's log-probability is null."""
        rest = _logprobs_of(COMPLETION, scored, len(self.first_token))
        first = {"tokens": self.first_token, "token_logprobs": None, "top_logprobs": None, "text_offset": 0}
        return {name: [first[name], *values] for name, values in rest.items()}


def response(
    header: ResponseHeader,
    request: OpenAIRequest,
    results: Sequence[GenerationResult],
    echo: EchoedPrompt | None = None,
) -> dict:
    """The whole answer of a request that was not streamed (engine/frontend/results.py): a choice per
    completion, in index order, and the usage of them all (the prompt counted once). With `echo` each
    choice starts with the prompt."""
    scored = results[0].prompt_logprobs  # completion 0's, once
    choices, completion_tokens = [], 0
    for result in results:
        text = "" if request.echo_only else result.text
        tokens = [] if request.echo_only else result.tokens
        prefix = echo.text if echo else ""
        choice = _choice(header, result.index, prefix + text, chunk=False, first=True)
        choice["logprobs"] = _choice_logprobs(header, request, tokens, len(prefix), echo, scored)
        choice["finish_reason"] = "length" if request.echo_only else _FINISH_REASONS[result.finish_reason]
        if (output := request.chat_output()) is not None:
            choice["message"] = output.message(text)
            choice["finish_reason"] = _finish_reason(result.finish_reason, output)
        choices.append(choice)
        completion_tokens += request.answered_tokens(result.completion_tokens)
    first = results[0]
    total = usage(first.prompt_tokens, completion_tokens, first.cached_prompt_tokens)
    return {**header.fields(chunk=False), "choices": choices, "usage": total}


def json_answer(
    header: ResponseHeader,
    request: OpenAIRequest,
    events: Sequence[GenerationEvent],
    echo: EchoedPrompt | None,
) -> bytes:
    """The body of an answer that is not streamed, from all of the request's events (blocking: it may be
    large, so the front calls it off the event loop)."""
    return json.dumps(response(header, request, fold(events), echo)).encode()


@dataclass(slots=True)
class StreamState:
    """What a streamed answer keeps between events: which choices have begun, how far into its tokens' text
    each is (completions' `text_offset`), the scored prompt (`echo`) and the usage so far."""

    request: OpenAIRequest
    prompt_tokens: int = 0
    echo: EchoedPrompt | None = None
    text_offsets: dict[int, int] = field(default_factory=dict)
    outputs: dict[int, ChatOutput | None] = field(default_factory=dict)  # each choice's reader
    num_tokens: dict[int, int] = field(default_factory=dict)  # each choice's tokens so far
    completion_tokens: int = 0
    scored: tuple[TokenInfo, ...] = ()  # the prompt's tokens, scored: completion 0's first event brings them
    cached_tokens: int = 0

    def chunks(self, header: ResponseHeader, event: GenerationEvent) -> list[dict]:
        """The stream chunks of one engine event: none for an event without text that ends nothing.

        Each choice's first chunk (in a chat) carries the assistant's role, or (`echo`) starts with the
        prompt; with `include_usage` every chunk has `usage: null`, and `usage_chunk` follows the last; with
        `continuous_usage` every chunk has the usage so far of its choice.
        """
        request, echo = self.request, self.echo
        first = event.index not in self.text_offsets
        tokens, text = ([], "") if request.echo_only else (event.tokens, event.text)
        offset = self.text_offsets.get(event.index, len(echo.text) if echo else 0)
        self.text_offsets[event.index] = offset + sum(len(t.text) for t in tokens)
        self.num_tokens[event.index] = self.num_tokens.get(event.index, 0) + len(tokens)
        self.scored = event.prompt_logprobs or self.scored
        finish_reason = _FINISH_REASONS[event.finish_reason] if event.finished else None
        if event.finished:
            self.prompt_tokens = event.prompt_tokens
            self.completion_tokens += request.answered_tokens(event.completion_tokens)
            finish_reason = "length" if request.echo_only else finish_reason
            if event.index == 0:
                self.cached_tokens = event.cached_prompt_tokens
        logprobs = request.logprobs and bool(tokens)  # tokens whose text is held back have some
        if first:
            self.outputs[event.index] = request.chat_output()
        output, delta = self.outputs[event.index], None
        if output is not None:
            delta = output.delta(text, event.finished)
            finish_reason = _finish_reason(event.finish_reason, output) if event.finished else None
        said = text if delta is None else delta
        if not (said or logprobs or finish_reason or (first and (header.endpoint == CHAT or echo))):
            return []
        echoed = echo if first else None
        choice = _choice(header, event.index, (echoed.text if echoed else "") + text, chunk=True, first=first)
        if delta is not None:
            choice["delta"] = ({"role": "assistant"} if first else {}) | delta
        choice["logprobs"] = _choice_logprobs(header, request, tokens, offset, echoed, self.scored)
        choice["finish_reason"] = finish_reason
        chunk = {**header.fields(chunk=True), "choices": [choice]}
        if request.continuous_usage:
            chunk["usage"] = usage(self.prompt_tokens, self.num_tokens[event.index], self.cached_tokens)
        elif request.include_usage:
            chunk["usage"] = None
        return [chunk]

    def usage_chunk(self, header: ResponseHeader) -> dict:
        """The last chunk with `include_usage`: no choices, the usage of every completion."""
        return {
            **header.fields(chunk=True),
            "choices": [],
            "usage": usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens),
        }


def _finish_reason(finish_reason: FinishReason, output: ChatOutput) -> str:
    """`tool_calls` when the model ended after calling tools, else the engine's reason."""
    if output.called and finish_reason == FinishReason.EOS:
        return "tool_calls"
    return _FINISH_REASONS[finish_reason]


def _choice(header: ResponseHeader, index: int, text: str, chunk: bool, first: bool) -> dict:
    if header.endpoint == COMPLETION:
        return {"index": index, "text": text}
    if not chunk:
        return {"index": index, "message": {"role": "assistant", "content": text}}
    return {"index": index, "delta": {"role": "assistant", "content": text} if first else {"content": text}}


def _choice_logprobs(
    header: ResponseHeader,
    request: OpenAIRequest,
    tokens: Sequence[TokenInfo],
    text_offset: int,
    echo: EchoedPrompt | None,
    scored: Sequence[TokenInfo],
) -> dict | None:
    """A choice's (or chunk's) `logprobs` when asked for, with `echo` the prompt's tokens first; null in a
    chat's chunk without tokens (the role's, the last)."""
    if not request.logprobs or (header.endpoint == CHAT and not tokens):
        return None
    generated = _logprobs_of(header.endpoint, tokens, text_offset)
    if echo is None:
        return generated
    prompt = echo.logprobs(scored)
    return {name: prompt[name] + generated[name] for name in prompt}


def _logprob(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # NaN too: it fails the comparison


def _logprobs_of(endpoint: str, tokens: Sequence[TokenInfo], text_offset: int) -> dict:
    """A choice's `logprobs`: the legacy completions shape (parallel lists, alternatives as {text: logprob},
    `text_offset` into the choice's text), or chat's `content` list of tokens with their bytes."""
    if endpoint == CHAT:
        return {
            "content": [
                {
                    **_chat_token(t.text, t.logprob),
                    "top_logprobs": [_chat_token(a.text, a.logprob) for a in t.top_logprobs],
                }
                for t in tokens
            ]
        }
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [_logprob(t.logprob) for t in tokens],
        "top_logprobs": [{a.text: _logprob(a.logprob) for a in t.top_logprobs} for t in tokens],
        "text_offset": offsets,
    }


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}


# ---- errors ------------------------------------------------------------------------------------------------

# The HTTP status for each google.rpc code the server's errors map to (service/status.py); 499 is the
# de-facto "client closed request" (nginx), which only logs and spans ever see.
HTTP_STATUS = {
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.CANCELLED: 499,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DEADLINE_EXCEEDED: 504,
}
# OpenAI's error `type` for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


@dataclass(slots=True)
class ErrorResponse:
    """An error as OpenAI sends it: an HTTP status, headers and `{"error": {message, type, param, code}}`."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


def error_response(error: BaseException) -> ErrorResponse:
    """The answer to `error`, classified once for both fronts (service/status.py).

    `code` is the gRPC ErrorInfo reason in lower case (`queue_full`, `model_loading`, ...); `param` names
    the first bad parameter; a full queue adds `Retry-After` in whole seconds.
    """
    code, reason = classify(error)
    status = to_status(error)  # a bounded message; an unexpected error is logged, with its traceback
    http_status = HTTP_STATUS[code]
    param = "model" if isinstance(error, ModelNotFound) else None
    if isinstance(error, InvalidArgument | InvalidRequestError):  # an engine's names the front's fields
        param = error.violations[0][0] or None
    body = _error_body(http_status, status.message, param, reason.lower())
    pushback_ms = retry_pushback_ms(status)
    headers = {"Retry-After": str(max(1, math.ceil(pushback_ms / 1000)))} if pushback_ms is not None else {}
    return ErrorResponse(http_status, body, headers)


def http_error_response(status: int, message: str) -> ErrorResponse:
    """The answer to an error of the HTTP layer itself: unknown path, method not allowed, body too large."""
    return ErrorResponse(status, _error_body(status, message, None, None))


def _error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}

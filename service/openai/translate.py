"""OpenAI's HTTP API to and from the engine: request bodies in, responses, stream chunks and errors out.

A body is checked for its JSON shape here (types, known parameters); the engine's own rules
(`engine/frontend/limits.py`: sampling ranges, stop sequences, sizes) are applied to it unchanged, with
their field paths renamed to OpenAI's parameters. Every parameter the engine cannot honour is
refused, never ignored.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.rpc import code_pb2

from engine.errors import InvalidRequestError
from engine.frontend.limits import (
    MAX_TOP_LOGPROBS,
    RequestLimits,
    Violation,
    input_size_violations,
    parameter_violations,
)
from engine.request import (
    FinishReason,
    GenerationEvent,
    ResponseFormat,
    SamplingParams,
    StoppingParams,
    TokenInfo,
)
from service.chat import tool_calls
from service.chat import tools as tool_requests
from service.chat.output import ChatOutput
from service.status import (
    InvalidArgument,
    ModelNotFound,
    PromptTooLong,
    classify,
    invalid_argument_class,
    retry_pushback_ms,
    to_status,
)

COMPLETION, CHAT = "completion", "chat"
MAX_SEED = 2**64  # the proto's uint64: both fronts take the same seeds
MAX_PRIORITY = 2**31  # the proto's int32
MIN_LOGPROB = -9999.0  # JSON has no -Infinity: an impossible token's log-probability is this (as vLLM)

# Parameters of both endpoints; `user` is accepted and ignored. The last line's are vendor extensions (as
# vLLM takes them), sent by the `openai` client as `extra_body`.
_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
    "n", "logprobs", "stream", "stream_options", "user", "response_format", "logit_bias",
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "priority",
    "guided_json", "guided_regex", "guided_choice", "structured_outputs", "cache_salt",
}  # fmt: skip
_PARAMETERS = {
    COMPLETION: _COMMON | {"prompt", "echo"},
    CHAT: _COMMON
    | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"},
}
_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}
# vLLM's structured-output parameters: `guided_*` at the top level, or the keys of `structured_outputs`.
_GUIDED = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice"}


ChatMessage = tool_requests.ChatTurn  # one message of a chat body, its content as text


@dataclass(slots=True)
class OpenAIRequest:
    """What one `/v1/completions` or `/v1/chat/completions` body asks of the engine.

    The input is one of `prompt` (text), `prompt_ids` (token ids) and `messages` (a chat).
    """

    endpoint: str  # COMPLETION or CHAT
    model: str | None
    sampling: SamplingParams
    stopping: StoppingParams
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    priority: int = 0
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's `continuous_usage_stats`: the usage so far in every chunk
    n: int = 1
    logprobs: bool = False  # report each token's log-probability (and `sampling.top_logprobs` alternatives)
    tools: tool_requests.ToolRequest | None = None  # a chat's tools (service/chat/tools.py)
    reasoning: bool = False  # split `<think>` blocks into `reasoning_content` (--reasoning-parser)
    echo: bool = False  # completions: the prompt (and its tokens' log-probabilities) before the completion
    echo_only: bool = False  # `max_tokens: 0` with echo: the prompt alone, scored; the token made is left out
    cache_salt: str = ""  # vLLM's: the cache partition within the caller's (service/security/tenancy.py)
    params: dict[str, str] = field(default_factory=dict)  # engine field -> the parameter the body named

    def chat_output(self) -> ChatOutput | None:
        """A reader of one choice's reasoning and tool calls; None when its text is all content."""
        if self.endpoint != CHAT or not (
            self.reasoning or (self.tools is not None and self.tools.calls_allowed)
        ):
            return None
        return ChatOutput(self.tools, self.reasoning)

    def param(self, engine_field: str) -> str:
        """The body's parameter for an engine field path (`sampling.top_p`, `prompt_ids[3]`, ...)."""
        name, bracket, index = engine_field.partition("[")
        if name in self.params:
            return self.params[name] + (f"[{index}" if bracket else "")
        return name.removeprefix("sampling.").removeprefix("stopping.")

    def violations(self, violations: Sequence[Violation]) -> list[Violation]:
        """Engine `violations` with their fields named as the body's parameters."""
        return [(self.param(path), description) for path, description in violations]

    def invalid_argument(self, error: InvalidRequestError) -> InvalidArgument:
        """The engine's refusal of this request, naming the body's parameters."""
        return invalid_argument_class(error)(self.violations(error.violations))

    def answered_tokens(self, num_tokens: int) -> int:
        """How many of `num_tokens` generated tokens the answer holds (and its usage counts)."""
        return 0 if self.echo_only else num_tokens


def parse_request(endpoint: str, body: object, limits: RequestLimits) -> OpenAIRequest:
    """The engine's view of a request `body`; raises `InvalidArgument` naming every bad parameter.

    An input over a size limit is refused first, for that alone (`PromptTooLong`), as on gRPC.
    """
    if not isinstance(body, dict):
        raise InvalidArgument([("body", "must be a JSON object")])
    fields = _Fields(body, endpoint)
    request = OpenAIRequest(endpoint, fields.string("model"), _sampling(fields), _stopping(fields))
    request.params.update(
        {"stopping.max_new_tokens": fields.max_tokens_name, "stopping.stop_sequences": "stop"}
    )
    request.priority = fields.integer("priority", 0, -MAX_PRIORITY, MAX_PRIORITY - 1)
    _stream_options(fields, request)
    request.n = fields.integer("n", 1, 1, limits.max_n)
    request.cache_salt = fields.string("cache_salt") or ""
    _logprobs(fields, request)
    _echo(fields, request)
    request.sampling.logit_bias = _logit_bias(fields, request)
    request.sampling.response_format = _response_format(fields, request)
    if endpoint == COMPLETION:
        _prompt(fields, request)
    else:
        _messages(fields, request)
        _tools(fields, request)
    size_violations = _input_size_violations(request, limits)
    if size_violations:
        raise PromptTooLong(size_violations)
    unknown = sorted(set(body) - _PARAMETERS[endpoint])
    violations = [(name, "is not a parameter this server supports") for name in unknown]
    violations += fields.violations
    violations += request.violations(parameter_violations(request.sampling, request.stopping, limits))
    if violations:
        raise InvalidArgument(violations)
    return request


class _Fields:
    """Typed reads of a body's parameters; a wrong type is recorded in `violations`, the default returned.

    JSON null is the same as leaving a parameter out.
    """

    def __init__(self, body: dict, endpoint: str) -> None:
        self.body = body
        self.violations: list[Violation] = []
        newer = endpoint == CHAT and body.get("max_completion_tokens") is not None  # it wins, as at OpenAI
        self.max_tokens_name = "max_completion_tokens" if newer else "max_tokens"

    def get(self, name: str, kinds: type | tuple[type, ...], rule: str) -> object | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            value = None  # JSON true is not a number
        if not isinstance(value, kinds):
            self.violations.append((name, f"must be {rule}"))
            return None
        return value

    def number(self, name: str, default: float) -> float:
        value = self.get(name, (int, float), "a number")
        if isinstance(value, int) and abs(value) > 2**53:  # JSON integers have no bound; floats do
            value = math.inf  # out of every range: the engine's rule names it
        return default if value is None else float(value)

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.get(name, int, "an integer")
        if value is not None and not minimum <= value <= maximum:
            self.violations.append((name, f"must be in [{minimum}, {maximum}], got {value}"))
            return default
        return default if value is None else value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, bool, "true or false")
        return default if value is None else value

    def string(self, name: str) -> str | None:
        return self.get(name, str, "a string")


def _sampling(fields: _Fields) -> SamplingParams:
    """OpenAI's defaults: temperature 1 and top_p 1 (textgen's gRPC default is greedy)."""
    top_k = fields.integer("top_k", 0, -1, 2**31 - 1)
    seed = fields.get("seed", int, "an integer")
    if seed is not None and not 0 <= seed < MAX_SEED:
        fields.violations.append(("seed", f"must be in [0, 2^64), got {seed}"))
        seed = None
    return SamplingParams(
        temperature=fields.number("temperature", 1.0),
        top_k=max(top_k, 0),  # vLLM's -1 is textgen's 0: off
        top_p=fields.number("top_p", 1.0),
        min_p=fields.number("min_p", 0.0),
        repetition_penalty=fields.number("repetition_penalty", 1.0),
        frequency_penalty=fields.number("frequency_penalty", 0.0),
        presence_penalty=fields.number("presence_penalty", 0.0),
        seed=seed,
    )


def _stopping(fields: _Fields) -> StoppingParams:
    """Null max tokens is the server's default (`--default-max-new-tokens`), shortened to fit the context."""
    name = fields.max_tokens_name
    max_tokens = fields.integer(name, 0, 0, 2**31 - 1)  # 0 only with echo (`_echo`)
    stop = fields.get("stop", (str, list), "a string or a list of strings")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        fields.violations.append(("stop", "must be a string or a list of strings"))
        stop = None
    stop_sequences = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return StoppingParams(max_tokens, stop_sequences, fields.boolean("ignore_eos", False))


def _logprobs(fields: _Fields, request: OpenAIRequest) -> None:
    """Completions: `logprobs`, the number of alternatives per token (0 is the chosen token's alone); chat:
    `logprobs: true`, with `top_logprobs` alternatives, which alone is refused (as OpenAI does)."""
    if request.endpoint == COMPLETION:
        count = fields.integer("logprobs", -1, 0, MAX_TOP_LOGPROBS)
        request.logprobs = count >= 0
        request.sampling.top_logprobs = max(count, 0)
        request.params["sampling.top_logprobs"] = "logprobs"
        return
    request.logprobs = fields.boolean("logprobs", False)
    request.sampling.top_logprobs = fields.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    request.params["sampling.top_logprobs"] = "top_logprobs"
    if fields.body.get("top_logprobs") is not None and not request.logprobs:
        fields.violations.append(("top_logprobs", "needs logprobs: true"))


def _echo(fields: _Fields, request: OpenAIRequest) -> None:
    """Completions' `echo` (as vLLM): the prompt's text before the completion's and, with `logprobs`, its
    tokens scored before the completion's. `max_tokens: 0` is allowed with echo alone: the prompt, scored."""
    request.echo = request.endpoint == COMPLETION and fields.boolean("echo", False)
    request.sampling.prompt_logprobs = request.echo and request.logprobs
    name, max_tokens = fields.max_tokens_name, fields.body.get(fields.max_tokens_name)
    if type(max_tokens) is not int or max_tokens != 0:
        return
    if request.echo:
        request.echo_only = True
        request.stopping.max_new_tokens = 1  # the engine always makes a token; the answer leaves it out
    else:
        only = " (0 only with echo: true)" if request.endpoint == COMPLETION else ""
        fields.violations.append((name, f"must be in [1, {2**31 - 1}], got 0{only}"))


def _logit_bias(fields: _Fields, request: OpenAIRequest) -> dict[int, float]:
    """OpenAI's `logit_bias`: token ids (JSON keys, so strings of digits) to biases. How many, which ids and
    which biases are allowed is the engine's rule (`engine/frontend/limits.py`)."""
    value = fields.get("logit_bias", dict, "an object of token ids to biases")
    request.params["sampling.logit_bias"] = "logit_bias"
    bias: dict[int, float] = {}
    for key, number in (value or {}).items():
        if not (key.isascii() and key.isdigit()):
            fields.violations.append(("logit_bias", f"keys must be token ids, got {key!r}"))
            return {}
        if isinstance(number, bool) or not isinstance(number, int | float):
            fields.violations.append((f"logit_bias[{key}]", "must be a number"))
            return {}
        bias[int(key)] = math.inf if isinstance(number, int) and abs(number) > 2**53 else float(number)
    return bias


def _response_format(fields: _Fields, request: OpenAIRequest) -> ResponseFormat | None:
    """OpenAI's `response_format` (`json_schema`, `json_object`, `text`) or vLLM's guided fields: at most one.

    Each engine field of the format is named as the parameter it came from, so that a schema or regex that
    does not compile is a 400 naming it.
    """
    given: list[tuple[str, str, object]] = []  # (parameter, kind: json | regex | choice, value)
    response_format = fields.get("response_format", dict, "an object")
    if response_format is not None:
        given += _openai_response_format(fields, response_format)
    for kind, name in _GUIDED.items():
        if fields.body.get(name) is not None:
            given.append((name, kind, fields.body[name]))
    structured = fields.get("structured_outputs", dict, "an object")
    for name in sorted(structured or ()):
        if name in _GUIDED:
            given.append((f"structured_outputs.{name}", name, structured[name]))
        else:
            fields.violations.append((f"structured_outputs.{name}", "is not supported"))
    if len(given) > 1:
        names = ", ".join(name for name, _, _ in given)
        fields.violations.append((given[1][0], f"only one structured output is allowed, got {names}"))
        return None
    if not given:
        return None
    name, kind, value = given[0]
    engine_field = {"json": "json_schema", "regex": "regex", "choice": "choice.choices"}[kind]
    request.params["sampling.response_format"] = name
    request.params[f"sampling.response_format.{engine_field}"] = name
    if kind == "json":
        if isinstance(value, str):  # vLLM's guided_json may be the schema's JSON text
            return ResponseFormat(json_schema=value)
        if not isinstance(value, dict | bool):
            fields.violations.append((name, "must be a JSON schema (an object)"))
            return None
        return ResponseFormat(json_schema=json.dumps(value))
    if kind == "regex":
        if not isinstance(value, str):
            fields.violations.append((name, "must be a string"))
            return None
        return ResponseFormat(regex=value)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        fields.violations.append((name, "must be a list of strings"))
        return None
    return ResponseFormat(choice=tuple(value))


def _openai_response_format(fields: _Fields, value: dict) -> list[tuple[str, str, object]]:
    """`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; `{"type": "json_object"}`: any
    JSON object; `{"type": "text"}`: no constraint."""
    kind = value.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json", {"type": "object"})]
    if kind != "json_schema":
        fields.violations.append(("response_format.type", "must be one of json_schema, json_object or text"))
        return []
    json_schema = value.get("json_schema")
    if not isinstance(json_schema, dict):
        fields.violations.append(("response_format.json_schema", "must be an object with a schema"))
        return []
    unknown = sorted(set(json_schema) - {"name", "description", "schema", "strict"})
    fields.violations += [(f"response_format.json_schema.{name}", "is not supported") for name in unknown]
    schema = json_schema.get("schema")
    if schema is None:  # OpenAI's schema is optional: none is any JSON
        schema = {}
    return [("response_format.json_schema.schema", "json", schema)]


def _tools(fields: _Fields, request: OpenAIRequest) -> None:
    """`tools`, `tool_choice`, `parallel_tool_calls`: calls are grammar-constrained from the first token, or
    in `auto` from the model's first call tag (service/chat/tool_calls.py)."""
    request.tools = tool_requests.parse_openai(fields.body, fields.violations)
    if request.tools is None or not request.tools.calls_allowed:
        return
    if request.sampling.response_format is not None:
        fields.violations.append(
            ("tools", "cannot be combined with a structured output, unless tool_choice is none")
        )
        return
    request.sampling.response_format = ResponseFormat(lark=tool_calls.grammar(request.tools))
    request.params.update({"sampling.response_format": "tools", "sampling.response_format.lark": "tools"})


def _stream_options(fields: _Fields, request: OpenAIRequest) -> None:
    """`include_usage`: a last chunk with the usage; vLLM's `continuous_usage_stats`: the usage so far in
    every chunk (guidellm asks for both)."""
    request.stream = fields.boolean("stream", False)
    options = fields.get("stream_options", dict, "an object")
    if options is None:
        return
    if not request.stream:
        fields.violations.append(("stream_options", "is only allowed with stream: true"))
        return
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    fields.violations += [(f"stream_options.{name}", "is not supported") for name in unknown]
    for name in ("include_usage", "continuous_usage_stats"):
        if options.get(name) is not None and not isinstance(options[name], bool):
            fields.violations.append((f"stream_options.{name}", "must be true or false"))
    request.include_usage = options.get("include_usage") is True
    request.continuous_usage = options.get("continuous_usage_stats") is True


def _prompt(fields: _Fields, request: OpenAIRequest) -> None:
    """A prompt is text or token ids, alone or as a list of one: one prompt per request."""
    prompt = fields.body.get("prompt")
    request.params.update({"prompt_ids": "prompt", "prompt": "prompt"})
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
        request.params.update({"prompt_ids": "prompt[0]", "prompt": "prompt[0]"})
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        request.prompt_ids = prompt
    elif prompt is None:
        fields.violations.append(("prompt", "is required"))
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        fields.violations.append(("prompt", "must be one prompt: this server takes one per request"))
    else:
        fields.violations.append(("prompt", "must be a string or token ids, or a list of one of them"))
    if request.prompt == "" or request.prompt_ids == []:
        fields.violations.append((request.params["prompt"], "must not be empty"))


def _messages(fields: _Fields, request: OpenAIRequest) -> None:
    """Messages of a `role` and a `content`: text, or a list of text parts, which are joined."""
    messages = fields.get("messages", list, "a list of messages")
    request.params.update({"prompt_ids": "messages", "messages": "messages", "chat": "messages"})
    if not messages:
        fields.violations.append(("messages", "must not be empty" if messages == [] else "is required"))
        return
    request.messages = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            fields.violations.append((f"messages[{i}]", "must be an object with a role and a content"))
            continue
        role, content = message.get("role"), _content(message.get("content"))
        tool_fields = tool_requests.parse_openai_message(message, f"messages[{i}]", fields.violations)
        unknown = sorted(set(message) - {"role", "content", "tool_calls", "tool_call_id", "name"})
        fields.violations += [(f"messages[{i}].{name}", "is not supported") for name in unknown]
        if not isinstance(role, str) or not role:
            fields.violations.append((f"messages[{i}].role", "must be a non-empty string"))
        if content is None and not (message.get("content") is None and tool_fields.get("tool_calls")):
            fields.violations.append((f"messages[{i}].content", "must be a string or a list of text parts"))
        request.messages.append(
            ChatMessage(role if isinstance(role, str) else "", content or "", **tool_fields)
        )


def _content(content: object) -> str | None:
    """A message's content as text; None when it is neither text nor a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _input_size_violations(request: OpenAIRequest, limits: RequestLimits) -> list[Violation]:
    if request.prompt is not None:
        violations = input_size_violations(limits, prompt=request.prompt)
    elif request.prompt_ids is not None:
        violations = input_size_violations(limits, num_prompt_ids=len(request.prompt_ids))
    elif request.messages is not None:
        violations = input_size_violations(limits, messages=request.messages)
    else:
        return []
    return request.violations(violations)


# ---- responses ---------------------------------------------------------------------------------------------


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

    def logprobs(self, scored: Sequence[TokenInfo]) -> dict:
        """The prompt's part of a choice's `logprobs`: the first token's log-probability is null."""
        rest = _logprobs_of(COMPLETION, scored, len(self.first_token))
        first = {"tokens": self.first_token, "token_logprobs": None, "top_logprobs": None, "text_offset": 0}
        return {name: [first[name], *values] for name, values in rest.items()}


def response(
    header: ResponseHeader,
    request: OpenAIRequest,
    events: Sequence[GenerationEvent],
    echo: EchoedPrompt | None = None,
) -> dict:
    """The whole answer of a request that was not streamed, from all of its events: a choice per
    completion, in index order, and the usage of them all (the prompt counted once). With `echo` each
    choice starts with the prompt."""
    by_index: dict[int, list[GenerationEvent]] = {}
    for event in events:
        by_index.setdefault(event.index, []).append(event)
    scored = [token for event in events for token in event.prompt_logprobs]  # completion 0's, once
    choices, completion_tokens = [], 0
    for index in sorted(by_index):
        completion = by_index[index]
        last = completion[-1]
        assert last.finished
        text = "" if request.echo_only else "".join(e.text for e in completion)
        tokens = [] if request.echo_only else [token for e in completion for token in e.tokens]
        prefix = echo.text if echo else ""
        choice = _choice(header, index, prefix + text, chunk=False, first=True)
        choice["logprobs"] = _choice_logprobs(header, request, tokens, len(prefix), echo, scored)
        choice["finish_reason"] = "length" if request.echo_only else _FINISH_REASONS[last.finish_reason]
        if (output := request.chat_output()) is not None:
            choice["message"] = output.message(text)
            choice["finish_reason"] = _finish_reason(last, output)
        choices.append(choice)
        completion_tokens += request.answered_tokens(last.completion_tokens)
    first = by_index[min(by_index)][-1]
    total = usage(first.prompt_tokens, completion_tokens, first.cached_prompt_tokens)
    return {**header.fields(chunk=False), "choices": choices, "usage": total}


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
            finish_reason = _finish_reason(event, output) if event.finished else None
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


def _finish_reason(last: GenerationEvent, output: ChatOutput) -> str:
    """`tool_calls` when the model ended after calling tools, else the engine's reason."""
    if output.called and last.finish_reason == FinishReason.EOS:
        return "tool_calls"
    return _FINISH_REASONS[last.finish_reason]


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
    if isinstance(error, InvalidArgument):
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

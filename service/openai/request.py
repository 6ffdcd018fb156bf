"""An OpenAI HTTP body as the engine's admission takes it (engine/frontend/admission.py).

A body is checked for its JSON shape here (types, known parameters); the engine's own rules
(`engine/frontend/limits.py`: sampling ranges, stop sequences, sizes) are applied to it by admission, with
their field paths renamed to OpenAI's parameters (`OpenAIRequest.param`). Every parameter the engine
cannot honour is refused, never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.frontend.admission import Admission, Prompt
from engine.frontend.engine import Engine
from engine.frontend.limits import MAX_TOP_LOGPROBS, RequestLimits, Violation
from engine.request import GenerationRequest, ResponseFormat, SamplingParams, StoppingParams
from service.chat import tool_calls
from service.chat import tools as tool_requests
from service.chat.output import ChatOutput
from service.openai.json_body import BodyFields
from service.openai.structured import response_format
from service.status import InvalidArgument, ModelNotFound

COMPLETION, CHAT = "completion", "chat"
MAX_SEED = 2**64  # the proto's uint64: both fronts take the same seeds
MAX_PRIORITY = 2**31  # the proto's int32

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
    refusals: list[Violation] = field(default_factory=list)  # what is wrong with the body's shape

    def admission(self, generation: GenerationRequest) -> Admission:
        """What admission takes for this body: `generation` (the HTTP request's id, deadline, trace and
        tenant) with the body's parameters. A body without an input has no token ids (it is refused)."""
        generation.sampling, generation.stopping = self.sampling, self.stopping
        generation.priority, generation.n, generation.cache_salt = self.priority, self.n, self.cache_salt
        generation.whole_answer = not self.stream
        return Admission(self.prompt_input(), generation, self.refusals, self.param)

    def prompt_input(self) -> Prompt:
        """The body's input: its prompt, its token ids or its chat (with its tools)."""
        if self.prompt is not None:
            return Prompt(text=self.prompt)
        if self.messages is not None:
            return Prompt(chat=tool_requests.Conversation(self.messages, self.tools))
        return Prompt(ids=self.prompt_ids or [])

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

    def answered_tokens(self, num_tokens: int) -> int:
        """How many of `num_tokens` generated tokens the answer holds (and its usage counts)."""
        return 0 if self.echo_only else num_tokens


def served_model(engine: Engine, model: str | None) -> str:
    """The served model's name; raises `ModelNotFound` when a body named another."""
    name = engine.model_info.name
    if model not in (None, name):
        raise ModelNotFound(f"the model {model!r} does not exist: this server serves {name!r}")
    return name


def parse_request(endpoint: str, body: object, limits: RequestLimits) -> OpenAIRequest:
    """The engine's view of a request `body`, what is wrong with its shape in `refusals` (admission reports
    them, after an input over a size limit and with the engine's rules); `InvalidArgument` for a body that is
    not an object."""
    if not isinstance(body, dict):
        raise InvalidArgument([("body", "must be a JSON object")])
    newer = endpoint == CHAT and body.get("max_completion_tokens") is not None  # it wins, as at OpenAI
    fields = BodyFields(body, "max_completion_tokens" if newer else "max_tokens")
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
    request.sampling.response_format = response_format(fields, request.params)
    if endpoint == COMPLETION:
        _prompt(fields, request)
    else:
        _messages(fields, request)
        _tools(fields, request)
    unknown = sorted(set(body) - _PARAMETERS[endpoint])
    request.refusals = [(name, "is not a parameter this server supports") for name in unknown]
    request.refusals += fields.violations
    return request


def _sampling(fields: BodyFields) -> SamplingParams:
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


def _stopping(fields: BodyFields) -> StoppingParams:
    """Null max tokens is the server's default (`--default-max-new-tokens`), shortened to fit the context."""
    name = fields.max_tokens_name
    max_tokens = fields.integer(name, 0, 0, 2**31 - 1)  # 0 only with echo (`_echo`)
    stop = fields.get("stop", (str, list), "a string or a list of strings")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        fields.violations.append(("stop", "must be a string or a list of strings"))
        stop = None
    stop_sequences = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return StoppingParams(max_tokens, stop_sequences, fields.boolean("ignore_eos", False))


def _logprobs(fields: BodyFields, request: OpenAIRequest) -> None:
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


def _echo(fields: BodyFields, request: OpenAIRequest) -> None:
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


def _logit_bias(fields: BodyFields, request: OpenAIRequest) -> dict[int, float]:
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


def _tools(fields: BodyFields, request: OpenAIRequest) -> None:
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


def _stream_options(fields: BodyFields, request: OpenAIRequest) -> None:
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


def _prompt(fields: BodyFields, request: OpenAIRequest) -> None:
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


def _messages(fields: BodyFields, request: OpenAIRequest) -> None:
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

"""What a request may ask for: every rule a request must pass before the engine accepts it.

Rules report (field path, description) pairs; field paths name the engine's objects
(`prompt_ids[3]`, `sampling.top_p`, `stopping.stop_sequences[0]`), and `service/` maps them to proto fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.request import (
    GREEDY_BELOW_TEMPERATURE,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    StoppingParams,
)

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_REPETITION_PENALTY = 10.0
MAX_ABS_FREQUENCY_PRESENCE_PENALTY = 2.0
# Characters of a prompt or a chat (README: Flags): a model's whole context at a few characters per token,
# with room to spare, while tokenizing it stays in the tens of milliseconds.
MAX_PROMPT_CHARS = 128 * 1024
MAX_CHAT_MESSAGES = 1024
MAX_TOP_LOGPROBS = 20  # as OpenAI's API: alternatives per token
# A response format's schema or regex, and its choices together, in characters: room for large schemas,
# while the worst compile stays well under a second (README: Structured output).
MAX_RESPONSE_FORMAT_CHARS = 64 * 1024
MAX_CHOICES = 1024
MAX_N = 16  # completions per request (--max-n)
MAX_LOGIT_BIAS_TOKENS = 300  # as OpenAI's API: tokens a request may bias
MAX_ABS_LOGIT_BIAS = 100.0
MAX_CACHE_SALT_CHARS = 1024  # vLLM's cache_salt: any string; bounded as every input is
# Entries of an answer built whole (tokens and their alternatives over every completion, scored prompt
# tokens and theirs): 128 Ki entries are about 4 MB of OpenAI completions JSON, 10 MB of chat JSON. Past it,
# stream (nothing is held) or ask for fewer completions, tokens or alternatives (README: Flags).
MAX_ANSWER_ENTRIES = 128 * 1024

Violation = tuple[str, str]

_PENALTY_RULE = (
    lambda v: abs(v) <= MAX_ABS_FREQUENCY_PRESENCE_PENALTY,
    f"in [-{MAX_ABS_FREQUENCY_PRESENCE_PENALTY:g}, {MAX_ABS_FREQUENCY_PRESENCE_PENALTY:g}]",
)
# (SamplingParams field, the rule as a predicate, the rule in words); every value must also be finite.
_SAMPLING_RULES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("temperature", lambda v: v >= 0, f">= 0 (below {GREEDY_BELOW_TEMPERATURE:g} is greedy)"),
    ("top_k", lambda v: v >= 0, ">= 0 (0 is off)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("repetition_penalty", lambda v: 0 < v <= MAX_REPETITION_PENALTY, f"in (0, {MAX_REPETITION_PENALTY:g}]"),
    ("frequency_penalty", *_PENALTY_RULE),
    ("presence_penalty", *_PENALTY_RULE),
    ("top_logprobs", lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}] (0 is none)"),
)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a request may ask for on one engine.

    `kv_capacity_tokens` is the whole KV cache (blocks x block size): a request whose prompt plus
    max_new_tokens exceeds it could never run, even alone. `max_prompt_chars` bounds a text prompt and a
    chat's roles and contents together, before they are tokenized.
    """

    max_context_len: int
    vocab_size: int
    kv_capacity_tokens: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_stop_sequence_chars: int = MAX_STOP_SEQUENCE_CHARS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_chat_messages: int = MAX_CHAT_MESSAGES
    max_n: int = MAX_N


class ChatMessage(Protocol):
    """One turn of a chat as `input_size_violations` reads it: who speaks and what they say."""

    role: str
    content: str


def check_request(request: GenerationRequest, limits: RequestLimits) -> int:
    """The request's effective max_new_tokens; raises `InvalidRequestError` listing every violation.

    Lengths are checked only once everything else is valid, so a field is never reported twice.
    """
    violations = _prompt_violations(request.prompt_ids, limits) + check_parameters(request, limits)
    if violations:
        raise InvalidRequestError.from_violations(violations)
    return _fitting_max_new_tokens(request, limits)


def check_parameters(request: GenerationRequest, limits: RequestLimits) -> list[Violation]:
    """Every violation of the rules that need no tokens: `parameter_violations`, `n` and the cache salt."""
    violations = parameter_violations(request.sampling, request.stopping, limits)
    violations += n_violations(request.n, limits)
    return violations + cache_salt_violations(request.cache_salt)


def check_prompt(request: GenerationRequest, limits: RequestLimits) -> int:
    """The effective max_new_tokens of a request whose parameters pass `check_parameters`: the rules that
    need its tokens (ids in the vocabulary, the prompt and new tokens within the context and KV cache, an
    answer built whole within its bound); raises `InvalidRequestError` for the first that fails."""
    violations = _prompt_violations(request.prompt_ids, limits)
    if violations:
        raise InvalidRequestError.from_violations(violations)
    return _fitting_max_new_tokens(request, limits)


def _fitting_max_new_tokens(request: GenerationRequest, limits: RequestLimits) -> int:
    max_new_tokens = resolve_max_new_tokens(len(request.prompt_ids), request.stopping, limits)
    if request.whole_answer:
        violations = answer_size_violations(
            request.n, max_new_tokens, len(request.prompt_ids), request.sampling
        )
        if violations:
            raise InvalidRequestError.from_violations(violations)
    return max_new_tokens


def answer_size_violations(
    n: int, max_new_tokens: int, num_prompt_tokens: int, sampling: SamplingParams
) -> list[Violation]:
    """An answer built whole holds at most `MAX_ANSWER_ENTRIES` entries: n x max_new_tokens tokens, plus the
    scored prompt's tokens (`prompt_logprobs`), each with its `top_logprobs` alternatives."""
    per_token = 1 + sampling.top_logprobs
    tokens = n * max_new_tokens + (num_prompt_tokens if sampling.prompt_logprobs else 0)
    if tokens * per_token <= MAX_ANSWER_ENTRIES:
        return []
    field = "sampling.top_logprobs" if sampling.top_logprobs else "stopping.max_new_tokens"
    return [
        (
            field,
            f"an answer of {n} completions x {max_new_tokens} tokens x {per_token} entries (a token and its "
            f"alternatives) is over the {MAX_ANSWER_ENTRIES} entries one answer may hold: stream it, or ask "
            "for fewer completions, tokens or alternatives",
        )
    ]


def parameter_violations(
    sampling: SamplingParams, stopping: StoppingParams, limits: RequestLimits
) -> list[Violation]:
    """Every violation of the rules that need no tokens: sampling ranges, max_new_tokens, stop sequences."""
    return (
        _sampling_violations(sampling)
        + _max_new_tokens_violations(stopping, limits)
        + _stop_sequence_violations(stopping.stop_sequences, limits)
        + _response_format_violations(sampling.response_format, stopping)
        + _logit_bias_violations(sampling.logit_bias, limits)
    )


def n_violations(n: int, limits: RequestLimits) -> list[Violation]:
    """The number of completions must be in [1, max_n]."""
    if 1 <= n <= limits.max_n:
        return []
    return [("n", f"must be in [1, {limits.max_n}] completions, got {n}")]


def cache_salt_violations(cache_salt: str) -> list[Violation]:
    """A cache salt must be at most `MAX_CACHE_SALT_CHARS` characters."""
    if len(cache_salt) <= MAX_CACHE_SALT_CHARS:
        return []
    return [("cache_salt", f"must be at most {MAX_CACHE_SALT_CHARS} characters, got {len(cache_salt)}")]


def input_size_violations(
    limits: RequestLimits,
    *,
    prompt: str | None = None,
    messages: Sequence[ChatMessage] | None = None,
    num_prompt_ids: int | None = None,
) -> list[Violation]:
    """The size rules of one input (give exactly one), checked before it is tokenized or templated.

    A text prompt, or a chat's roles and contents together, must be at most `max_prompt_chars` characters;
    a chat at most `max_chat_messages` messages (counted first: its characters are read only when that
    holds); token ids must leave room in the context for one new token. Violations here are
    `PromptTooLongError`s.
    """
    assert (prompt, messages, num_prompt_ids).count(None) == 2
    if prompt is not None:
        return _chars_violations("prompt", len(prompt), limits)
    if messages is not None:
        if len(messages) > limits.max_chat_messages:
            return [("messages", f"at most {limits.max_chat_messages} messages allowed, got {len(messages)}")]
        return _chars_violations("messages", sum(len(m.role) + len(m.content) for m in messages), limits)
    return _prompt_tokens_violations(num_prompt_ids, limits)


def resolve_max_new_tokens(num_prompt_tokens: int, stopping: StoppingParams, limits: RequestLimits) -> int:
    """The effective max_new_tokens for a prompt of `num_prompt_tokens`; raises if the request can never fit.

    The prompt plus the new tokens must fit both the context and the KV cache. The default (0) shrinks to
    fit; an explicit max_new_tokens must fit as given. Assumes `parameter_violations` found nothing.
    """
    too_long = _prompt_tokens_violations(num_prompt_tokens, limits)
    if too_long:
        raise PromptTooLongError.from_violations(too_long)
    budget, bound = _token_budget(limits)
    room = budget - num_prompt_tokens
    if stopping.max_new_tokens == 0:
        return min(limits.default_max_new_tokens, room)
    if stopping.max_new_tokens > room:
        raise InvalidRequestError(
            "stopping.max_new_tokens",
            f"the prompt ({num_prompt_tokens} tokens) plus max_new_tokens ({stopping.max_new_tokens}) "
            f"exceeds {bound}",
        )
    return stopping.max_new_tokens


def _token_budget(limits: RequestLimits) -> tuple[int, str]:
    """The most tokens (prompt + new) one request may hold, and what sets that bound, in words."""
    if limits.kv_capacity_tokens < limits.max_context_len:
        return limits.kv_capacity_tokens, f"the KV cache of {limits.kv_capacity_tokens} tokens"
    return limits.max_context_len, f"the model's context of {limits.max_context_len} tokens"


def _prompt_tokens_violations(num_prompt_tokens: int, limits: RequestLimits) -> list[Violation]:
    budget, bound = _token_budget(limits)
    if num_prompt_tokens < budget:
        return []
    return [("prompt_ids", f"is {num_prompt_tokens} tokens; {bound} must also hold at least one new token")]


def _chars_violations(field: str, num_chars: int, limits: RequestLimits) -> list[Violation]:
    if num_chars <= limits.max_prompt_chars:
        return []
    return [(field, f"must be at most {limits.max_prompt_chars} characters, got {num_chars}")]


def _prompt_violations(prompt_ids: list[int], limits: RequestLimits) -> list[Violation]:
    """The prompt must not be empty and its ids must be in the vocabulary; only the first bad id is named."""
    if not prompt_ids:
        return [("prompt_ids", "must not be empty")]
    vocab = limits.vocab_size
    bad = next(((i, t) for i, t in enumerate(prompt_ids) if not 0 <= t < vocab), None)
    if bad is None:
        return []
    index, token_id = bad
    return [(f"prompt_ids[{index}]", f"must be a token id in [0, {vocab}), got {token_id}")]


def _sampling_violations(sampling: SamplingParams) -> list[Violation]:
    violations = []
    for name, ok, rule in _SAMPLING_RULES:
        value = getattr(sampling, name)
        if not (math.isfinite(value) and ok(value)):
            violations.append((f"sampling.{name}", f"must be {rule}, got {value:g}"))
    return violations


def _logit_bias_violations(logit_bias: dict[int, float], limits: RequestLimits) -> list[Violation]:
    """At most `MAX_LOGIT_BIAS_TOKENS` token ids, each in the vocabulary, each bias finite and in [-100, 100];
    only the first bad entry is named."""
    if len(logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        return [("sampling.logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} token ids, got {len(logit_bias)}")]
    vocab, rule = limits.vocab_size, f"in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]"
    for token_id, bias in logit_bias.items():
        if not 0 <= token_id < vocab:
            return [(f"sampling.logit_bias[{token_id}]", f"is not a token id: ids are in [0, {vocab})")]
        if not (math.isfinite(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS):
            return [(f"sampling.logit_bias[{token_id}]", f"must be a bias {rule}, got {bias:g}")]
    return []


def _max_new_tokens_violations(stopping: StoppingParams, limits: RequestLimits) -> list[Violation]:
    limit, value = limits.max_new_tokens_limit, stopping.max_new_tokens
    if 0 <= value <= limit:
        return []
    return [("stopping.max_new_tokens", f"must be in [0, {limit}] (0 is the default), got {value}")]


def _stop_sequence_violations(stop_sequences: tuple[str, ...], limits: RequestLimits) -> list[Violation]:
    violations = []
    if len(stop_sequences) > limits.max_stop_sequences:
        violations.append(
            (
                "stopping.stop_sequences",
                f"at most {limits.max_stop_sequences} allowed, got {len(stop_sequences)}",
            )
        )
    max_chars = limits.max_stop_sequence_chars
    for i, stop in enumerate(stop_sequences):
        if not stop:
            violations.append((f"stopping.stop_sequences[{i}]", "must not be empty"))
        elif len(stop) > max_chars:
            violations.append(
                (f"stopping.stop_sequences[{i}]", f"must be at most {max_chars} characters, got {len(stop)}")
            )
    return violations


def _response_format_violations(
    response_format: ResponseFormat | None, stopping: StoppingParams
) -> list[Violation]:
    """Exactly one format, not empty, within the size limits, and no `ignore_eos` (the grammar's end is the
    output's). Whether a schema or regex compiles is `engine.core.structured`'s to say."""
    if response_format is None:
        return []
    formats = {
        "json_schema": response_format.json_schema,
        "regex": response_format.regex,
        "choice.choices": response_format.choice,
        "lark": response_format.lark,
    }
    given = [(name, value) for name, value in formats.items() if value is not None]
    if len(given) != 1:
        return [("sampling.response_format", "exactly one of json_schema, regex, choice or lark is required")]
    name, value = given[0]
    field = f"sampling.response_format.{name}"
    violations = []
    if stopping.ignore_eos:
        violations.append(
            ("stopping.ignore_eos", "must be false with a response_format: its end ends the output")
        )
    num_chars = sum(map(len, value)) if isinstance(value, tuple) else len(value)
    if not value:
        violations.append((field, "must not be empty"))
    elif isinstance(value, tuple) and len(value) > MAX_CHOICES:
        violations.append((field, f"at most {MAX_CHOICES} choices allowed, got {len(value)}"))
    elif num_chars > MAX_RESPONSE_FORMAT_CHARS:
        violations.append((field, f"must be at most {MAX_RESPONSE_FORMAT_CHARS} characters, got {num_chars}"))
    elif isinstance(value, tuple):
        violations += [(f"{field}[{i}]", "must not be empty") for i, choice in enumerate(value) if not choice]
    return violations

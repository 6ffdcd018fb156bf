"""Value objects that cross the engine's boundary: what a caller submits and what it gets back."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field, replace


class FinishReason(enum.Enum):
    """Why a sequence stopped generating."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the output must be (structured output): exactly one of a JSON schema (as JSON text), a regular
    expression the whole output matches, one of a list of strings, or a grammar in llguidance's Lark syntax
    (the servers build those, for tool calls). Hashable: grammars are cached by it."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    lark: str | None = None


# Temperatures below this are greedy decoding (vLLM's rule): logits divided by a smaller one leave float32's
# range (1e-50 is 0 in float32), and the distribution is the argmax's anyway. Both fronts, one rule.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling; the defaults are greedy decoding with no penalties."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    # What to report besides the tokens (as vLLM, with the sampling parameters): the `top_logprobs` most
    # likely alternatives of every token, and the log-probability of every prompt token after the first.
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    response_format: ResponseFormat | None = None  # constrains which tokens may be sampled
    # Added to the logits of these token ids before sampling (OpenAI's `logit_bias`): -100 all but bans a
    # token, 100 all but forces it. The reported log-probabilities stay the model's.
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is taken: temperature 0, or below `GREEDY_BELOW_TEMPERATURE`."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(slots=True)
class StoppingParams:
    """When a request stops: `max_new_tokens` (0 = the engine's default), EOS, stop sequences."""

    max_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(slots=True)
class GenerationRequest:
    """One generation request: prompt token ids plus parameters.

    `deadline` is a `time.monotonic()` instant after which the request is abandoned;
    `trace_context` is an opaque OpenTelemetry context the engine hands back to its tracer.
    `n` completions share the prompt; events carry their completion's `index`. With
    `sampling.prompt_logprobs`, completion 0's first event carries the scored prompt (once per request).
    The prefix cache is partitioned by `cache_tenant` (the service's, derived from the caller's API key)
    and `cache_salt` (the caller's): a request reuses only blocks computed for the same pair.
    """

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    priority: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline: float | None = None
    trace_context: object | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    n: int = 1
    cache_salt: str = ""
    cache_tenant: str = ""
    # The caller builds one answer of every event before sending any (a unary call, an HTTP answer that is
    # not streamed): its size is bounded at admission (`engine.frontend.limits.answer_size_violations`).
    whole_answer: bool = False

    @property
    def cache_scope(self) -> str:
        """Which kind of prefix-cache partition the request reads: `shared`, `key` or `salt` (for metrics)."""
        return "salt" if self.cache_salt else "key" if self.cache_tenant else "shared"

    def completion(self, index: int) -> GenerationRequest:
        """This request as completion `index` runs it. Completion 0 is the request itself; the others have a
        seed of their own (seed + index) and never score the prompt: completion 0 scores it once for the
        request, and they start on its prompt blocks, whose logits they do not compute."""
        if index == 0:
            return self
        seed = None if self.sampling.seed is None else (self.sampling.seed + index) % 2**64
        return replace(self, sampling=replace(self.sampling, seed=seed, prompt_logprobs=False))


@dataclass(slots=True)
class TopLogprob:
    """One of the most likely tokens at a position: its id, its text decoded alone, its log-probability."""

    id: int
    text: str
    logprob: float


@dataclass(slots=True)
class TokenInfo:
    """One generated (or scored prompt) token: its id, its text, its log-probability under the model,
    whether special, and the most likely alternatives at its position when the request asked for them."""

    id: int
    text: str
    logprob: float
    special: bool = False
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(slots=True)
class Timing:
    """Seconds spent queued, until the first token, and in total."""

    queue_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass(slots=True)
class GenerationEvent:
    """New output of one request since its previous event.

    `text` is new text only; concatenating every event's `text` gives the full output.
    The last event of a request has `finish_reason` set, plus usage and timing. With
    `SamplingParams.prompt_logprobs` the first event carries `prompt_logprobs`: the prompt's tokens from the
    second on, each scored given the ones before it.
    """

    request_id: str
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timing: Timing | None = None
    prompt_logprobs: tuple[TokenInfo, ...] = ()
    cached_prompt_tokens: int = 0  # of `prompt_tokens`, those whose KV was computed before (prefix cache)
    index: int = 0  # which of the request's n completions

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""What the client returns: plain dataclasses converted from the protos at the edge."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from protos.textgen.v1 import textgen_pb2 as pb


class FinishReason(enum.Enum):
    """Why generation stopped."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"

    @classmethod
    def from_proto(cls, value: int) -> FinishReason | None:
        return _FINISH_REASONS.get(value)


_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position: id, text decoded on its own, log-probability."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class Token:
    """One generated (or scored prompt) token: id, the text it added, its log-probability, whether it is
    special, and with `top_logprobs` requested the most likely tokens at its position, most likely first."""

    id: int
    text: str
    logprob: float
    special: bool
    top_logprobs: tuple[TopLogprob, ...] = ()

    @classmethod
    def from_proto(cls, t: pb.Token) -> Token:
        top = tuple(TopLogprob(id=a.id, text=a.text, logprob=a.logprob) for a in t.top_logprobs)
        return cls(id=t.id, text=t.text, logprob=t.logprob, special=t.special, top_logprobs=top)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens in the prompt, tokens generated, and the prompt tokens the server's prefix cache held."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @classmethod
    def from_proto(cls, u: pb.Usage) -> Usage:
        return cls(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


@dataclass(frozen=True, slots=True)
class Timing:
    """Server-side seconds: queued, until the first token, in total."""

    queue_s: float
    time_to_first_token_s: float
    total_s: float

    @classmethod
    def from_proto(cls, t: pb.Timing) -> Timing:
        return cls(
            queue_s=t.queue_duration.ToNanoseconds() / 1e9,
            time_to_first_token_s=t.time_to_first_token.ToNanoseconds() / 1e9,
            total_s=t.total_duration.ToNanoseconds() / 1e9,
        )


@dataclass(frozen=True, slots=True)
class Completion:
    """One of a request's `n` completions."""

    index: int
    text: str
    tokens: list[Token]
    finish_reason: FinishReason | None
    usage: Usage
    timing: Timing

    @classmethod
    def from_proto(cls, c: pb.Completion) -> Completion:
        return cls(index=c.index, **_output(c, finished=True))


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The whole output of one request: completion 0's text, tokens, finish reason and timing; the usage of
    all completions; every completion in `completions` (one unless the request asked for `n` > 1); the scored
    prompt in `prompt_tokens` with `prompt_logprobs` (once: the completions share the prompt)."""

    request_id: str
    text: str
    tokens: list[Token]
    finish_reason: FinishReason | None
    usage: Usage
    timing: Timing
    prompt_tokens: list[Token] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)

    @classmethod
    def from_proto(cls, r: pb.GenerateResponse) -> GenerationResult:
        return cls(
            request_id=r.request_id,
            **_output(r, finished=True),
            prompt_tokens=[Token.from_proto(t) for t in r.prompt_tokens],
            completions=[Completion.from_proto(c) for c in r.completions],
        )


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """New output of completion `index` since its previous chunk; the last chunk of each completion also
    has finish_reason, usage and timing; the request's first chunk the scored prompt (`prompt_tokens`) when
    `prompt_logprobs` was asked for."""

    request_id: str
    text: str
    tokens: list[Token]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    prompt_tokens: list[Token] = field(default_factory=list)
    index: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, r: pb.GenerateStreamResponse) -> StreamChunk:
        return cls(
            request_id=r.request_id,
            **_output(r, finished=False),
            prompt_tokens=[Token.from_proto(t) for t in r.prompt_tokens],
            index=r.index,
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model and the server's limits on requests."""

    model_name: str
    max_context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    dtype: str
    kv_block_size: int
    num_kv_blocks: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_stop_sequences: int
    max_stop_sequence_length: int

    @classmethod
    def from_proto(cls, r: pb.GetModelInfoResponse) -> ModelInfo:
        """Each field from the proto's field of the same name."""
        values = {f.name: getattr(r, f.name) for f in fields(cls)}
        return cls(**values | {"eos_token_ids": list(r.eos_token_ids)})


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    """Token ids and each token's text decoded on its own."""

    ids: list[int]
    pieces: list[str]

    @classmethod
    def from_proto(cls, r: pb.TokenizeResponse) -> TokenizeResult:
        return cls(ids=list(r.ids), pieces=list(r.pieces))


def _output(r: pb.GenerateResponse | pb.Completion | pb.GenerateStreamResponse, finished: bool) -> dict:
    """What every message of output holds: text, tokens, finish reason, usage and timing (when `finished`,
    always; a stream's chunk has the last two only when its completion ends)."""
    return {
        "text": r.text,
        "tokens": [Token.from_proto(t) for t in r.tokens],
        "finish_reason": FinishReason.from_proto(r.finish_reason),
        "usage": Usage.from_proto(r.usage) if finished or r.HasField("usage") else None,
        "timing": Timing.from_proto(r.timing) if finished or r.HasField("timing") else None,
    }

"""The one fold of a request's engine events into its completions, for every caller that answers whole:
`Engine.generate`, the gRPC front's unary `Generate`, the OpenAI front's answers that are not streamed and
the worker protocol's unary `Generate`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.request import FinishReason, GenerationEvent, Timing, TokenInfo


@dataclass(slots=True)
class GenerationResult:
    """The whole output of one completion (`index`) of a request.

    `prompt_logprobs` are the scored prompt (with `SamplingParams.prompt_logprobs`): completion 0 carries
    them, once for the request.
    """

    request_id: str
    text: str
    token_ids: list[int]
    tokens: list[TokenInfo]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timing: Timing | None
    prompt_logprobs: list[TokenInfo] = field(default_factory=list)
    cached_prompt_tokens: int = 0
    index: int = 0


def fold(events: Sequence[GenerationEvent]) -> list[GenerationResult]:
    """Every completion of a finished request, in index order, from all of its events (interleaved or not).

    Each completion's last event has finished: it gives the finish reason, usage and timing.
    """
    by_index: dict[int, list[GenerationEvent]] = {}
    for event in events:
        by_index.setdefault(event.index, []).append(event)
    return [_result(by_index[index]) for index in sorted(by_index)]


def _result(events: list[GenerationEvent]) -> GenerationResult:
    last = events[-1]
    assert last.finished, "a completion is folded once it has finished"
    tokens = [token for event in events for token in event.tokens]
    return GenerationResult(
        request_id=last.request_id,
        text="".join(event.text for event in events),
        token_ids=[token.id for token in tokens],
        tokens=tokens,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        timing=last.timing,
        prompt_logprobs=[token for event in events for token in event.prompt_logprobs],
        cached_prompt_tokens=last.cached_prompt_tokens,
        index=last.index,
    )

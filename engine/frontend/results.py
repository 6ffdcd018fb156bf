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


def coalesced(items: list[GenerationEvent | Exception]) -> list[GenerationEvent | Exception]:
    """`items` of one request, queued while its caller was busy, with each completion's events merged into
    one (in the order completions first appear), then the failure that may end `items`.

    A merged event says what its events said together: their text and tokens concatenated, the scored
    prompt of the first, the finish reason, counts and timing of the last. So a caller that is behind gets
    fewer, larger events, and concatenating every event's text still gives the whole output.
    """
    if len(items) == 1:
        return items
    failure = items[-1] if isinstance(items[-1], Exception) else None
    by_index: dict[int, list[GenerationEvent]] = {}
    for event in items[:-1] if failure is not None else items:
        by_index.setdefault(event.index, []).append(event)
    merged: list[GenerationEvent | Exception] = [_merged(events) for events in by_index.values()]
    return merged + [failure] if failure is not None else merged


def _merged(events: list[GenerationEvent]) -> GenerationEvent:
    if len(events) == 1:
        return events[0]
    last = events[-1]
    return GenerationEvent(
        request_id=last.request_id,
        text="".join(event.text for event in events),
        tokens=[token for event in events for token in event.tokens],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        timing=last.timing,
        prompt_logprobs=tuple(token for event in events for token in event.prompt_logprobs),
        cached_prompt_tokens=last.cached_prompt_tokens,
        index=last.index,
    )

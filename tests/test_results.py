"""The one fold of a request's engine events into its completions (engine/frontend/results.py)."""

from __future__ import annotations

import pytest

from engine.errors import RequestCancelledError
from engine.frontend.results import coalesced, fold
from engine.request import FinishReason, GenerationEvent, Timing, TokenInfo


def token(token_id: int, text: str) -> TokenInfo:
    return TokenInfo(token_id, text, -token_id / 10)


def test_interleaved_completions_fold_into_one_result_each_in_index_order():
    events = [
        GenerationEvent("r", "b", [token(2, "b")], index=1),
        GenerationEvent("r", "a", [token(1, "a")], index=0),
        GenerationEvent("r", "c", [token(3, "c")], FinishReason.EOS, 4, 2, Timing(0.1, 0.2, 0.3), index=0),
        GenerationEvent("r", "d", [token(4, "d")], FinishReason.LENGTH, 4, 2, Timing(0.1, 0.2, 0.4), index=1),
    ]

    results = fold(events)

    assert [(r.index, r.text, r.token_ids, r.finish_reason) for r in results] == [
        (0, "ac", [1, 3], FinishReason.EOS),
        (1, "bd", [2, 4], FinishReason.LENGTH),
    ]
    assert [r.timing.total_s for r in results] == [0.3, 0.4]


def test_usage_and_cache_hits_are_the_last_events():
    events = [
        GenerationEvent("r", "a", [token(1, "a")], prompt_tokens=0),
        GenerationEvent("r", "", [], FinishReason.STOP_SEQUENCE, 7, 1, cached_prompt_tokens=4),
    ]

    (result,) = fold(events)

    assert (result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens) == (7, 1, 4)


def test_the_scored_prompt_stays_with_the_completion_that_carried_it():
    scored = (token(5, "x"), token(6, "y"))
    events = [
        GenerationEvent("r", "a", [token(1, "a")], FinishReason.EOS, 3, 1, prompt_logprobs=scored, index=0),
        GenerationEvent("r", "b", [token(2, "b")], FinishReason.EOS, 3, 1, index=1),
    ]

    first, second = fold(events)

    assert first.prompt_logprobs == list(scored) and second.prompt_logprobs == []


def test_a_completion_that_has_not_finished_is_not_folded():
    with pytest.raises(AssertionError):
        fold([GenerationEvent("r", "a", [token(1, "a")])])


def test_events_queued_behind_a_busy_caller_merge_into_one_per_completion():
    scored = (token(5, "x"),)
    timing = Timing(0.1, 0.2, 0.3)
    items = [
        GenerationEvent("r", "a", [token(1, "a")], prompt_logprobs=scored),
        GenerationEvent("r", "p", [token(7, "p")], index=1),
        GenerationEvent("r", "b", [token(2, "b")]),
        GenerationEvent("r", "", [token(3, "")], FinishReason.EOS, 4, 3, timing, cached_prompt_tokens=2),
    ]

    first, second = coalesced(items)

    assert (first.index, first.text, [t.id for t in first.tokens]) == (0, "ab", [1, 2, 3])
    assert [t.logprob for t in first.tokens] == [-0.1, -0.2, -0.3]  # each token keeps its own
    assert first.prompt_logprobs == scored
    assert (first.finish_reason, first.prompt_tokens, first.completion_tokens) == (FinishReason.EOS, 4, 3)
    assert (first.timing, first.cached_prompt_tokens) == (timing, 2)
    assert second is items[1]  # a completion with one event keeps it as it is


def test_a_failure_stays_after_the_events_queued_before_it():
    failure = RequestCancelledError("request r was cancelled")
    items = [
        GenerationEvent("r", "a", [token(1, "a")]),
        GenerationEvent("r", "b", [token(2, "b")]),
        failure,
    ]

    merged, last = coalesced(items)

    assert (merged.text, merged.finished) == ("ab", False)
    assert last is failure


def test_a_lone_event_is_passed_through():
    items = [GenerationEvent("r", "a", [token(1, "a")])]

    assert coalesced(items) is items

"""The request rules of `engine/frontend/limits.py`, one behaviour per test, on plain values."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.frontend.limits import (
    MAX_ANSWER_ENTRIES,
    MAX_STOP_SEQUENCE_CHARS,
    MAX_STOP_SEQUENCES,
    RequestLimits,
    answer_size_violations,
    check_request,
    input_size_violations,
    parameter_violations,
    resolve_max_new_tokens,
)
from engine.request import GenerationRequest, SamplingParams, StoppingParams

LIMITS = RequestLimits(
    max_context_len=100,
    vocab_size=50,
    kv_capacity_tokens=1000,
    default_max_new_tokens=30,
    max_new_tokens_limit=80,
)
SMALL_CACHE = dataclasses.replace(LIMITS, kv_capacity_tokens=64)  # smaller than the context
SMALL_INPUTS = dataclasses.replace(LIMITS, max_prompt_chars=20, max_chat_messages=3)


def fields(sampling: SamplingParams | None = None, stopping: StoppingParams | None = None) -> list[str]:
    """The fields `parameter_violations` names for these parameters (defaults where not given)."""
    violations = parameter_violations(sampling or SamplingParams(), stopping or StoppingParams(), LIMITS)
    return [field for field, _ in violations]


def refused(request: GenerationRequest, limits: RequestLimits = LIMITS) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check_request(request, limits)
    return info.value


# ---- sampling -------------------------------------------------------------------------------------------


def test_default_parameters_have_no_violations():
    assert fields() == []


@pytest.mark.parametrize(
    "name, bad, good",
    [
        ("temperature", -0.1, 0.0),
        ("top_k", -1, 0),
        ("top_p", 0.0, 1.0),
        ("top_p", 1.01, 0.01),
        ("min_p", -0.1, 0.0),
        ("min_p", 1.1, 1.0),
        ("repetition_penalty", 0.0, 0.01),
        ("repetition_penalty", 10.5, 10.0),
        ("frequency_penalty", 2.5, 2.0),
        ("frequency_penalty", -2.5, -2.0),
        ("presence_penalty", 2.1, 2.0),
        ("presence_penalty", -2.1, -2.0),
    ],
)
def test_sampling_values_outside_their_range_are_refused_and_the_bounds_accepted(name, bad, good):
    assert fields(SamplingParams(**{name: bad})) == [f"sampling.{name}"]
    assert fields(SamplingParams(**{name: good})) == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "name", ["temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"]
)
def test_sampling_values_must_be_finite(name, value):
    assert fields(SamplingParams(**{name: value})) == [f"sampling.{name}"]


def test_a_sampling_violation_states_the_rule_and_the_value():
    [(_, description)] = parameter_violations(SamplingParams(temperature=-1), StoppingParams(), LIMITS)

    assert description == "must be >= 0 (below 1e-05 is greedy), got -1"


def test_every_sampling_violation_is_reported():
    bad = SamplingParams(temperature=-1, top_k=-1, top_p=0, min_p=2)

    assert fields(bad) == ["sampling.temperature", "sampling.top_k", "sampling.top_p", "sampling.min_p"]


# ---- max_new_tokens -------------------------------------------------------------------------------------


def test_max_new_tokens_over_the_limit_is_refused():
    assert fields(stopping=StoppingParams(max_new_tokens=81)) == ["stopping.max_new_tokens"]
    assert fields(stopping=StoppingParams(max_new_tokens=80)) == []


def test_negative_max_new_tokens_is_refused():
    assert fields(stopping=StoppingParams(max_new_tokens=-1)) == ["stopping.max_new_tokens"]


def test_default_max_new_tokens_is_used_when_it_fits():
    assert resolve_max_new_tokens(10, StoppingParams(), LIMITS) == 30


def test_default_max_new_tokens_shrinks_to_fit_the_context():
    assert resolve_max_new_tokens(90, StoppingParams(), LIMITS) == 10


def test_explicit_max_new_tokens_is_kept_when_it_fits():
    assert resolve_max_new_tokens(20, StoppingParams(max_new_tokens=80), LIMITS) == 80


def test_explicit_max_new_tokens_past_the_context_is_refused():
    with pytest.raises(InvalidRequestError) as info:
        resolve_max_new_tokens(21, StoppingParams(max_new_tokens=80), LIMITS)

    assert info.value.field == "stopping.max_new_tokens"
    assert "context of 100 tokens" in info.value.description


def test_a_prompt_that_fills_the_context_is_refused_on_the_prompt():
    with pytest.raises(PromptTooLongError) as info:
        resolve_max_new_tokens(100, StoppingParams(), LIMITS)

    assert info.value.field == "prompt_ids"
    assert "at least one new token" in info.value.description


def test_the_kv_cache_bounds_a_request_when_smaller_than_the_context():
    with pytest.raises(InvalidRequestError) as info:
        resolve_max_new_tokens(20, StoppingParams(max_new_tokens=45), SMALL_CACHE)

    assert info.value.field == "stopping.max_new_tokens"
    assert "KV cache of 64 tokens" in info.value.description


def test_default_max_new_tokens_shrinks_to_fit_the_kv_cache():
    assert resolve_max_new_tokens(50, StoppingParams(), SMALL_CACHE) == 14


# ---- input sizes, before tokenizing ----------------------------------------------------------------------


def message(role: str = "user", content: str = "") -> SimpleNamespace:
    return SimpleNamespace(role=role, content=content)


def test_a_prompt_over_max_prompt_chars_is_refused_and_one_at_it_accepted():
    [(field, description)] = input_size_violations(SMALL_INPUTS, prompt="x" * 21)

    assert field == "prompt"
    assert description == "must be at most 20 characters, got 21"
    assert input_size_violations(SMALL_INPUTS, prompt="x" * 20) == []


def test_a_chat_counts_its_roles_and_contents_together():
    ten = message(role="user", content="xxxxxx")

    over = input_size_violations(SMALL_INPUTS, messages=[ten, ten, message("u")])

    assert input_size_violations(SMALL_INPUTS, messages=[ten, ten]) == []
    assert over == [("messages", "must be at most 20 characters, got 21")]


def test_a_chat_over_max_chat_messages_is_refused_without_reading_them():
    unreadable = [object()] * 4  # neither role nor content: reading one would raise

    [(field, description)] = input_size_violations(SMALL_INPUTS, messages=unreadable)

    assert field == "messages"
    assert description == "at most 3 messages allowed, got 4"


def test_token_ids_that_fill_the_context_are_refused_before_they_are_read():
    [(field, description)] = input_size_violations(LIMITS, num_prompt_ids=100)

    assert field == "prompt_ids"
    assert "at least one new token" in description
    assert input_size_violations(LIMITS, num_prompt_ids=99) == []


def test_a_prompt_too_long_for_the_context_is_a_prompt_too_long_error():
    error = refused(GenerationRequest([1] * 100))

    assert isinstance(error, PromptTooLongError)
    assert error.field == "prompt_ids"


def test_max_new_tokens_too_long_for_the_prompt_is_not_a_prompt_too_long_error():
    error = refused(GenerationRequest([1] * 50, stopping=StoppingParams(max_new_tokens=51)))

    assert not isinstance(error, PromptTooLongError)


# ---- stop sequences -------------------------------------------------------------------------------------


def test_too_many_stop_sequences_are_refused():
    too_many = StoppingParams(stop_sequences=("s",) * (MAX_STOP_SEQUENCES + 1))

    assert fields(stopping=too_many) == ["stopping.stop_sequences"]
    assert fields(stopping=StoppingParams(stop_sequences=("s",) * MAX_STOP_SEQUENCES)) == []


def test_an_empty_stop_sequence_is_refused_by_its_index():
    assert fields(stopping=StoppingParams(stop_sequences=("ok", ""))) == ["stopping.stop_sequences[1]"]


def test_a_stop_sequence_too_long_is_refused_by_its_index():
    too_long = StoppingParams(
        stop_sequences=("x" * (MAX_STOP_SEQUENCE_CHARS + 1), "x" * MAX_STOP_SEQUENCE_CHARS)
    )

    assert fields(stopping=too_long) == ["stopping.stop_sequences[0]"]


def test_every_bad_stop_sequence_is_reported():
    many_empty = StoppingParams(stop_sequences=("",) * 20)

    assert len(fields(stopping=many_empty)) == 1 + 20


# ---- the whole request ------------------------------------------------------------------------------------


def test_a_valid_request_gets_its_effective_max_new_tokens():
    assert check_request(GenerationRequest([1, 2, 3]), LIMITS) == 30


def test_an_empty_prompt_is_refused():
    assert refused(GenerationRequest([])).field == "prompt_ids"


def test_a_token_id_past_the_vocabulary_is_refused_by_its_index():
    error = refused(GenerationRequest([1, 50, 99]))

    assert error.violations == [("prompt_ids[1]", "must be a token id in [0, 50), got 50")]


def test_a_negative_token_id_is_refused():
    assert refused(GenerationRequest([-1])).field == "prompt_ids[0]"


def test_every_violation_of_a_request_is_reported_at_once():
    request = GenerationRequest(
        [],
        sampling=SamplingParams(temperature=-1),
        stopping=StoppingParams(max_new_tokens=1000, stop_sequences=("",)),
    )

    assert [field for field, _ in refused(request).violations] == [
        "prompt_ids",
        "sampling.temperature",
        "stopping.max_new_tokens",
        "stopping.stop_sequences[0]",
    ]


def test_lengths_are_checked_only_once_the_parameters_are_valid():
    request = GenerationRequest([1] * 99, stopping=StoppingParams(max_new_tokens=1000))

    assert [field for field, _ in refused(request).violations] == ["stopping.max_new_tokens"]


def test_a_request_too_long_for_the_context_is_refused():
    request = GenerationRequest([1] * 50, stopping=StoppingParams(max_new_tokens=51))

    assert refused(request).field == "stopping.max_new_tokens"


def test_the_error_keeps_the_first_violation_as_field_and_description():
    error = refused(GenerationRequest([], sampling=SamplingParams(top_k=-1)))

    assert (error.field, error.description) == ("prompt_ids", "must not be empty")
    assert str(error) == "prompt_ids: must not be empty; sampling.top_k: must be >= 0 (0 is off), got -1"


def test_an_answer_built_whole_is_bounded_by_its_entries():
    sampling = SamplingParams(top_logprobs=20)

    [(field, description)] = answer_size_violations(16, 2047, 1, sampling)

    assert field == "sampling.top_logprobs" and str(MAX_ANSWER_ENTRIES) in description
    assert answer_size_violations(16, 2047, 1, SamplingParams()) == []  # 32k tokens alone: within
    assert answer_size_violations(1, MAX_ANSWER_ENTRIES // 21, 1, sampling) == []


def test_only_an_answer_built_whole_is_bounded():
    request = GenerationRequest(
        [1], SamplingParams(top_logprobs=20), StoppingParams(max_new_tokens=2047), n=16
    )
    limits = dataclasses.replace(
        LIMITS, max_context_len=4096, kv_capacity_tokens=65536, max_new_tokens_limit=4096
    )

    assert check_request(request, limits) == 2047  # streamed: nothing is held
    with pytest.raises(InvalidRequestError) as error:
        check_request(dataclasses.replace(request, whole_answer=True), limits)
    assert error.value.field == "sampling.top_logprobs"


# ---- logit bias -----------------------------------------------------------------------------------------


def test_a_logit_bias_inside_the_vocabulary_and_range_is_allowed():
    assert fields(SamplingParams(logit_bias={0: -100.0, 49: 100.0})) == []


@pytest.mark.parametrize(
    "logit_bias, field",
    [
        ({50: 1.0}, "sampling.logit_bias[50]"),  # the vocabulary is [0, 50)
        ({-1: 1.0}, "sampling.logit_bias[-1]"),
        ({3: 100.5}, "sampling.logit_bias[3]"),
        ({3: math.nan}, "sampling.logit_bias[3]"),
        ({3: -math.inf}, "sampling.logit_bias[3]"),
    ],
)
def test_a_logit_bias_outside_the_vocabulary_or_range_names_its_token(logit_bias, field):
    assert fields(SamplingParams(logit_bias=logit_bias)) == [field]


def test_a_logit_bias_of_more_than_300_tokens_is_refused():
    big = dataclasses.replace(LIMITS, vocab_size=1000)
    sampling = SamplingParams(logit_bias=dict.fromkeys(range(301), 1.0))

    violations = parameter_violations(sampling, StoppingParams(), big)

    assert [field for field, _ in violations] == ["sampling.logit_bias"]
    at_most = SamplingParams(logit_bias=dict.fromkeys(range(300), 1.0))
    assert parameter_violations(at_most, StoppingParams(), big) == []

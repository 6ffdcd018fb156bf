"""Tests for bench.workload: a seed fixes the workload; rates, lengths and prompts are what was asked."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bench.workload import (
    WorkloadConfig,
    lognormal_lengths,
    make_workload,
    poisson_arrivals,
    prompt_ids,
)


def test_same_seed_gives_the_same_workload():
    config = WorkloadConfig(num_requests=50, request_rate=3.0, seed=7)
    assert make_workload(config) == make_workload(config)


def test_different_seeds_give_different_workloads():
    first = make_workload(WorkloadConfig(num_requests=20, request_rate=3.0, seed=1))
    second = make_workload(WorkloadConfig(num_requests=20, request_rate=3.0, seed=2))
    assert [r.output_len for r in first] != [r.output_len for r in second]
    assert [r.prompt_text for r in first] != [r.prompt_text for r in second]


def test_changing_the_rate_changes_only_the_arrival_times():
    slow = make_workload(WorkloadConfig(num_requests=20, request_rate=1.0, seed=5))
    fast = make_workload(WorkloadConfig(num_requests=20, request_rate=math.inf, seed=5))
    assert [(r.prompt_len, r.output_len, r.prompt_text) for r in slow] == [
        (r.prompt_len, r.output_len, r.prompt_text) for r in fast
    ]
    assert [r.arrival_s for r in slow] != [r.arrival_s for r in fast]


def test_workload_has_the_requested_size_and_indices():
    specs = make_workload(WorkloadConfig(num_requests=13))
    assert [r.index for r in specs] == list(range(13))


def test_infinite_rate_sends_everything_at_time_zero():
    specs = make_workload(WorkloadConfig(num_requests=10, request_rate=math.inf))
    assert all(r.arrival_s == 0.0 for r in specs)


def test_poisson_arrivals_start_at_zero_increase_and_match_the_rate():
    arrivals = poisson_arrivals(np.random.default_rng(0), 20_000, rate=4.0)
    assert arrivals[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(arrivals))
    assert (len(arrivals) - 1) / arrivals[-1] == pytest.approx(4.0, rel=0.03)


def test_lognormal_lengths_have_the_requested_mean():
    lengths = lognormal_lengths(np.random.default_rng(0), 50_000, mean=64, sigma=0.5, low=1, high=10_000)
    assert np.mean(lengths) == pytest.approx(64, rel=0.02)


def test_lognormal_lengths_are_clipped_to_the_range():
    lengths = lognormal_lengths(np.random.default_rng(0), 5_000, mean=64, sigma=1.5, low=10, high=100)
    assert min(lengths) == 10 and max(lengths) == 100


def test_zero_sigma_gives_the_mean_exactly():
    specs = make_workload(WorkloadConfig(num_requests=5, prompt_len_mean=30, output_len_mean=12, len_sigma=0))
    assert {(r.prompt_len, r.output_len) for r in specs} == {(30, 12)}


def test_prompt_text_has_one_word_per_wanted_token():
    for spec in make_workload(WorkloadConfig(num_requests=10, seed=3)):
        assert len(spec.prompt_text.split()) == spec.prompt_len


def test_prompt_ids_are_cut_to_exactly_the_prompt_length():
    # A tokenizer that splits some words in two, as BPE does for rarer words.
    def encode(text: str) -> list[int]:
        return [n for word in text.split() for n in ([len(word)] if len(word) < 6 else [1, 2])]

    for spec in make_workload(WorkloadConfig(num_requests=10, seed=3)):
        ids = prompt_ids(spec, encode)
        assert len(ids) == spec.prompt_len
        assert ids == encode(spec.prompt_text)[: spec.prompt_len]


def test_invalid_config_is_rejected():
    with pytest.raises(AssertionError):
        WorkloadConfig(num_requests=0)
    with pytest.raises(AssertionError):
        WorkloadConfig(request_rate=0)

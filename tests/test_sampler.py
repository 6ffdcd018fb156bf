"""sample(): greedy, log-probabilities, temperature, top-k, top-p, min-p, penalties and per-row seeds."""

from __future__ import annotations

import torch

from engine.execution.sampler import FAILED, SamplingBatch, _filtered_probs, sample
from engine.request import GREEDY_BELOW_TEMPERATURE, SamplingParams


def make_batch(params: list[SamplingParams], history=None, outputs=None) -> SamplingBatch:
    """A batch whose rows have generators seeded from their params (None for unseeded rows)."""
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    history = history if history is not None else [[] for _ in params]
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingBatch(params, generators, history, outputs)


def draw(logits: torch.Tensor, params: SamplingParams, times: int) -> list[int]:
    """Sample one row `times` times with one seeded generator."""
    batch = make_batch([params])
    return [int(sample(logits[None, :], batch)[0][0]) for _ in range(times)]


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_picks_the_argmax():
    logits = random_logits(3, 100)
    token_ids, _ = sample(logits, make_batch([SamplingParams()] * 3))
    assert torch.equal(token_ids, logits.argmax(dim=-1))


def test_logprobs_are_those_of_the_raw_logits_at_the_chosen_tokens():
    logits = random_logits(3, 50)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.5, seed=2),
    ]
    token_ids, logprobs = sample(logits, make_batch(params, history=[[], [], [1, 2, 3]]))
    expected = torch.log_softmax(logits, dim=-1).gather(1, token_ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-6)


def test_sample_leaves_the_callers_logits_unchanged():
    logits = random_logits(1, 20)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, repetition_penalty=2.0, frequency_penalty=1.0, seed=0)
    sample(logits, make_batch([params], history=[[1, 2]], outputs=[[2]]))
    assert torch.equal(logits, before)


def test_top_k_one_is_greedy_whatever_the_temperature():
    logits = random_logits(1, 100)[0]
    draws = draw(logits, SamplingParams(temperature=5.0, top_k=1, seed=0), times=100)
    assert set(draws) == {int(logits.argmax())}


def test_tiny_top_p_keeps_only_the_top_token():
    logits = random_logits(1, 100)[0]
    draws = draw(logits, SamplingParams(temperature=5.0, top_p=1e-4, seed=0), times=100)
    assert set(draws) == {int(logits.argmax())}


def test_a_top_p_that_is_zero_in_float32_keeps_the_top_token():
    logits = random_logits(2, 100)
    token_ids, logprobs = sample(
        logits, make_batch([SamplingParams(temperature=1.0, top_p=1e-50, seed=0)] * 2)
    )
    assert torch.equal(token_ids, logits.argmax(dim=-1)) and torch.isfinite(logprobs).all()


def test_a_temperature_below_the_greedy_floor_is_greedy():
    logits = random_logits(3, 100)
    params = [SamplingParams(temperature=t, seed=0) for t in (1e-50, 1e-45, GREEDY_BELOW_TEMPERATURE / 2)]
    token_ids, logprobs = sample(logits, make_batch(params))
    assert all(p.greedy for p in params)
    assert torch.equal(token_ids, logits.argmax(dim=-1)) and torch.isfinite(logprobs).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    draws = draw(logits, SamplingParams(temperature=1.0, top_p=0.75, seed=0), times=300)
    assert set(draws) == {0, 1}  # 0.5 < 0.75 so token 1 stays; 0.5 + 0.3 reaches 0.75 so token 2 goes


def test_min_p_never_samples_tokens_below_min_p_times_the_top_probability():
    logits = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.06, 0.04]).log()
    draws = draw(logits, SamplingParams(temperature=1.0, min_p=0.25, seed=0), times=500)
    assert set(draws) == {0, 1, 2, 3}  # the threshold is 0.3 * 0.25 = 0.075: tokens 4 and 5 are filtered


def test_seeded_sampling_is_reproducible():
    logits = random_logits(1, 50)[0]
    params = SamplingParams(temperature=1.0, seed=42)
    first, second = draw(logits, params, times=20), draw(logits, params, times=20)
    assert first == second
    assert len(set(first)) > 1  # really sampled, not a constant


def test_seeded_row_draws_the_same_tokens_alone_or_in_a_batch():
    logits = random_logits(4, 50)
    row = SamplingParams(temperature=0.8, seed=1234)
    others = [
        SamplingParams(),
        SamplingParams(temperature=1.5, top_k=5, seed=7),
        SamplingParams(temperature=0.6, top_p=0.8, min_p=0.05, presence_penalty=0.5, seed=None),
    ]
    alone = draw(logits[2], row, times=20)
    batch = make_batch([others[0], others[1], row, others[2]], outputs=[[], [], [], [3, 3]])
    in_batch = [int(sample(logits, batch)[0][2]) for _ in range(20)]
    assert in_batch == alone
    assert len(set(alone)) > 1


def greedy_choice(logits: list[float], params: SamplingParams, history=(), outputs=()) -> int:
    batch = make_batch([params], history=[list(history)], outputs=[list(outputs)])
    return int(sample(torch.tensor([logits]), batch)[0][0])


def test_repetition_penalty_divides_a_seen_positive_logit():
    penalty = SamplingParams(repetition_penalty=2.0)
    # Seen token 0 goes from 2.0 to 1.0: it beats an unseen 0.99 and loses to an unseen 1.01.
    assert greedy_choice([2.0, 0.99], penalty, history=[0]) == 0
    assert greedy_choice([2.0, 1.01], penalty, history=[0]) == 1


def test_repetition_penalty_multiplies_a_seen_negative_logit():
    penalty = SamplingParams(repetition_penalty=2.0)
    # Seen token 0 goes from -1.0 to -2.0: it beats an unseen -2.01 and loses to an unseen -1.99.
    assert greedy_choice([-1.0, -2.01], penalty, history=[0]) == 0
    assert greedy_choice([-1.0, -1.99], penalty, history=[0]) == 1


def test_repetition_penalty_leaves_unseen_tokens_alone():
    penalty = SamplingParams(repetition_penalty=2.0)
    assert greedy_choice([1.0, 0.99, 0.0], penalty, history=[2]) == 0


def test_frequency_and_presence_penalties_subtract_count_times_frequency_plus_presence():
    penalty = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    # Token 0 was generated 3 times: 3.0 - (3 * 0.5 + 0.25) = 1.25.
    assert greedy_choice([3.0, 1.24], penalty, outputs=[0, 0, 0]) == 0
    assert greedy_choice([3.0, 1.26], penalty, outputs=[0, 0, 0]) == 1


def test_frequency_and_presence_penalties_ignore_prompt_tokens():
    penalty = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    assert greedy_choice([3.0, 2.99], penalty, history=[0, 0, 0], outputs=[]) == 0


def test_temperature_one_samples_the_softmax_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    draws = draw(logits, SamplingParams(temperature=1.0, seed=3), times=2000)
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, logits.softmax(dim=-1), rtol=0, atol=0.03)


def test_top_p_of_one_filters_nothing_when_another_row_uses_top_k():
    # A realistic vocabulary: in float32 the sorted cumulative sum reaches 1.0 before the last token.
    logits = random_logits(1, 49152) * 6
    alone = _filtered_probs(logits, [SamplingParams(temperature=1.0)])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=5)]
    in_batch = _filtered_probs(torch.cat([logits, logits]), params)[:1]
    assert bool((alone > 0).all())
    assert bool((in_batch > 0).all())


def test_a_grammar_mask_constrains_its_own_row_and_keeps_the_models_logprobs():
    logits = random_logits(3, 30)
    allowed = torch.ones(3, 30, dtype=torch.bool)
    allowed[0] = False
    allowed[0, 3] = True
    allowed[2] = False  # a mask that allows nothing: the row fails alone
    params = [SamplingParams(), SamplingParams(temperature=0.9, seed=4), SamplingParams()]
    batch = make_batch(params)
    batch.allowed = allowed

    token_ids, logprobs = sample(logits, batch)

    unmasked, _ = sample(logits, make_batch(params))
    assert token_ids[0] == 3 and token_ids[1] == unmasked[1] and token_ids[2] == FAILED
    assert logprobs[0] == torch.log_softmax(logits[0], dim=-1)[3]


def test_a_logit_bias_of_100_forces_its_token_and_keeps_the_models_logprob():
    logits = random_logits(2, 40)
    least_likely = int(logits[0].argmin())
    params = [SamplingParams(logit_bias={least_likely: 100.0}), SamplingParams(temperature=0.8, seed=3)]
    params[1].logit_bias = {least_likely: 100.0}

    token_ids, logprobs = sample(logits, make_batch(params))

    assert token_ids.tolist() == [least_likely, least_likely]
    assert logprobs[0] == torch.log_softmax(logits[0], dim=-1)[least_likely]


def test_a_logit_bias_of_minus_100_bans_the_greedy_choice():
    logits = random_logits(1, 40)
    top2 = logits[0].topk(2).indices.tolist()

    token_ids, _ = sample(logits, make_batch([SamplingParams(logit_bias={top2[0]: -100.0})]))

    assert token_ids.tolist() == [top2[1]]


def test_a_rows_logit_bias_never_changes_its_batchmates_tokens():
    logits = random_logits(3, 64)
    plain = [SamplingParams(), SamplingParams(temperature=1.0, seed=9)]
    biased = SamplingParams(logit_bias={int(i): 50.0 for i in logits[0].topk(60, largest=False).indices})

    alone, alone_logprobs = sample(logits[:2], make_batch(plain))
    together, together_logprobs = sample(logits, make_batch([*plain, biased]))

    assert together[:2].tolist() == alone.tolist()
    assert torch.equal(together_logprobs[:2], alone_logprobs)

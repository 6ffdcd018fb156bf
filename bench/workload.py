"""A seeded benchmark workload: arrival times, prompt and output lengths, and prompt text.

Lengths are lognormal with a given mean, clipped; arrivals are a Poisson process at a given rate
(an infinite rate sends everything at once). Prompt text is drawn from a built-in word list, so
nothing is downloaded; `prompt_ids` cuts its tokenization to exactly the wanted length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Common English words; with a GPT-2 style pre-tokenizer each space-separated word is at least one token.
_WORD_LIST = """
    the of and to in is was for on that with as by at from his her they this are had not be or which
    but have were one all their there been has when who will more no if out so said what up its about
    into than them can only other new some could time these two may then do first any my now such like
    our over man me even most made after also did many before must through back years where much your
    way well down should because each just those people how too little state good very make world still
    own see men work long get here between both life being under never day same another know while last
    might us great old year off come since against go came right used take three states himself few house
    use during without again place american around however home small found thought went say part once
    general high upon school every does got united left number course war until always away something
    fact though water less public put think almost hand enough far took head yet government system better
    set told nothing night end why called eyes find going look asked later knew point next program
    city business give group toward young days let room president side social given present several order
    national possible rather second face per among form important often things looked early white case
    john become large big need four within felt along children saw best church ever least power development
    light thing seemed family interest want members others mind country area done turned although open god
    service certain kind problem began different door thus help sense means whole matter perhaps itself
    york times law human line above name example action company hands local show whether five history gave
    today either act feet across taken past quite anything having seen death experience body word half
    really field am car words already themselves information tell together college shall money period held
    keep sure probably free seems real behind cannot political air question office brought whose special
    heard major problems ago became federal moment study available known result street economic boy
"""
WORDS = tuple(_WORD_LIST.split())


@dataclass(slots=True, frozen=True)
class WorkloadConfig:
    """What to generate: how many requests, how fast they arrive, how long prompts and outputs are.

    `request_rate` is in requests per second; `math.inf` means all requests arrive at time 0.
    Lengths are lognormal with mean `*_len_mean` and log-space spread `len_sigma`, clipped to `*_len_range`.
    """

    num_requests: int = 32
    request_rate: float = math.inf
    prompt_len_mean: float = 64.0
    output_len_mean: float = 64.0
    len_sigma: float = 0.5
    prompt_len_range: tuple[int, int] = (4, 1024)
    output_len_range: tuple[int, int] = (1, 1024)
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.num_requests > 0, "num_requests must be positive"
        assert self.request_rate > 0, "request_rate must be positive (math.inf = all at once)"
        assert self.prompt_len_mean > 0 and self.output_len_mean > 0, "length means must be positive"
        assert self.len_sigma >= 0, "len_sigma must be >= 0"
        for low, high in (self.prompt_len_range, self.output_len_range):
            assert 1 <= low <= high, "length ranges must be 1 <= low <= high"


@dataclass(slots=True, frozen=True)
class RequestSpec:
    """One request of the workload: when it is sent, its prompt, and exactly how many tokens it generates."""

    index: int
    arrival_s: float
    prompt_len: int
    output_len: int
    prompt_text: str


def lognormal_lengths(
    rng: np.random.Generator, n: int, mean: float, sigma: float, low: int, high: int
) -> list[int]:
    """`n` integer lengths, lognormal with mean `mean` (before clipping to [low, high])."""
    mu = math.log(mean) - sigma * sigma / 2  # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2 / 2)
    values = rng.lognormal(mu, sigma, size=n)
    return [int(v) for v in np.clip(np.rint(values), low, high)]


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> list[float]:
    """Arrival offsets in seconds of `n` requests, the first at 0, with exponential gaps of mean 1/rate."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.exponential(1.0 / rate, size=n - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


def make_workload(config: WorkloadConfig) -> list[RequestSpec]:
    """The workload for `config`; the same config always gives the same requests."""
    # Separate streams, so that changing the rate changes only the arrival times, not the requests.
    arrival_rng, length_rng, text_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3)
    )
    n = config.num_requests
    arrivals = poisson_arrivals(arrival_rng, n, config.request_rate)
    prompt_lens = lognormal_lengths(
        length_rng, n, config.prompt_len_mean, config.len_sigma, *config.prompt_len_range
    )
    output_lens = lognormal_lengths(
        length_rng, n, config.output_len_mean, config.len_sigma, *config.output_len_range
    )
    return [
        RequestSpec(i, arrivals[i], prompt_lens[i], output_lens[i], prompt_text(text_rng, prompt_lens[i]))
        for i in range(n)
    ]


def prompt_text(rng: np.random.Generator, num_words: int) -> str:
    """`num_words` random words: at least `num_words` tokens under a word-splitting tokenizer."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=num_words))


def prompt_ids(spec: RequestSpec, encode: Callable[[str], list[int]]) -> list[int]:
    """The prompt of `spec` as exactly `spec.prompt_len` token ids, given the model's `encode`."""
    ids = encode(spec.prompt_text)[: spec.prompt_len]
    assert len(ids) == spec.prompt_len, f"prompt {spec.index} tokenized to {len(ids)} < {spec.prompt_len}"
    return ids

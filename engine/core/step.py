"""One engine step as plain values: what the scheduler asks the runner to run, and what comes back.

`Scheduler.schedule()` returns a `Step` (its rows, `StepRow`); `ModelRunner.execute(step)` returns a
`StepOutput` (with the scored prompt positions, `PositionLogprobs`); `Scheduler.update(step, output)` applies
it. One value each way, as vLLM v1's `SchedulerOutput` and `ModelRunnerOutput`; neither side reaches into
the other's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.structured import GrammarMatcher
from engine.errors import EngineError
from engine.request import SamplingParams


@dataclass(slots=True)
class StepRow:
    """One sequence's part of a step: the tokens to run from `start_pos`, and whether to sample after them
    (`sample`: the runner returns the last token's logits; a row that scores its prompt returns every
    token's). The runner's `run` takes these rows as they are.

    `history` is the sequence's tokens before this step (prompt and output: the penalties read it);
    the first `num_prompt_tokens` of it are the prompt. `grammar` (structured output) says which tokens the
    row may sample: the runner only reads its mask; the scheduler's `update` advances it with the token.
    The defaults after `sample` are a bare row's, as benchmarks and tests run the model without sampling.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool = True
    seq_id: int = -1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    history: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    grammar: GrammarMatcher | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Whether this row's prompt tokens are scored (`prompt_logprobs`): the logits of every position are
        needed. Only before the first output token, so a sequence recomputed after preemption is not scored
        twice."""
        return self.sampling.prompt_logprobs and len(self.history) == self.num_prompt_tokens


@dataclass(slots=True)
class Step:
    """All prefill rows or all decode rows. `finished_seq_ids` ended since the previous step (the runner
    drops their per-request state, such as random generators); `preempted_seq_ids` lost their KV blocks
    while this step was scheduled."""

    is_prefill: bool
    rows: list[StepRow]
    finished_seq_ids: list[int] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)

    @property
    def sampled_rows(self) -> list[StepRow]:
        return [row for row in self.rows if row.sample]


@dataclass(slots=True)
class PositionLogprobs:
    """A scored prompt position: the token there, its log-probability, and the (id, log-probability) of the
    most likely tokens, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class StepOutput:
    """One sampled token and its log-probability per sampling row, in the order of `Step.sampled_rows`.

    `failed` maps a sequence id to why its row could not be sampled (say, non-finite probabilities), or to the
    error its request ends with (a grammar over its limits): that sequence fails alone, its token in
    `token_ids` is meaningless. Only for the rows that asked:
    `top_logprobs` maps a sequence id to the (id, log-probability) of its most likely next tokens, and
    `prompt_logprobs` to the prompt positions this step scored.

    A row whose grammar mask was not ready is `deferred` (its token here is meaningless): its sequence waits
    for its token, which a later step's `resolved` brings ((id, log-probability) by sequence id; its
    `top_logprobs` then too). `failed` may name such a waiting sequence as well.
    """

    token_ids: list[int]
    logprobs: list[float]
    failed: dict[int, str | EngineError] = field(default_factory=dict)
    top_logprobs: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[PositionLogprobs]] = field(default_factory=dict)
    deferred: set[int] = field(default_factory=set)
    resolved: dict[int, tuple[int, float]] = field(default_factory=dict)

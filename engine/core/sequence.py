"""A request's life inside the scheduler: its tokens, its KV blocks and where it stands."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from engine.batching import BatchRequest
from engine.core.kv_cache import cache_seed
from engine.core.structured import GrammarMatcher
from engine.request import FinishReason, GenerationRequest

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class SequenceGroup:
    """What the completions of one request share on the loop thread: where their events go, and how many have
    not ended yet (completion 0 forks the others, `Sequence.fork`, once its prompt is prefilled)."""

    sink: object = None
    num_live: int = 1


@dataclass(slots=True, eq=False)
class Sequence:
    """Scheduling state of one request; owned by the step-loop thread once submitted.

    `seq_id` is unique per submission (a caller may reuse a request id once the first has ended, even
    while the engine is still tearing that one down); every engine-side table is keyed by it. A request
    with n completions has n sequences, `index` 0 to n - 1, whose `group_id` is completion 0's `seq_id`: only
    completion 0 is submitted, and the scheduler forks the others from it once its prompt is prefilled.
    """

    request: GenerationRequest
    max_new_tokens: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of its full blocks, so far
    cache_seed: bytes = b""  # its prefix-cache partition, where its hash chain starts
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at its first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    admitted_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    grammar: GrammarMatcher | None = None  # with a response format: where its output stands in the grammar
    awaiting_mask: bool = False  # its last row ran, its token waits for its grammar's mask (`StepOutput`)
    ticket: BatchRequest | None = None  # its place in the scheduler's queue, from when it is first queued
    index: int = 0
    group_id: int = -1  # -1: this sequence's own id (completion 0)
    group: SequenceGroup = field(default_factory=SequenceGroup)

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.cache_seed = cache_seed(self.request.cache_tenant, self.request.cache_salt)
        if self.group_id < 0:
            self.group_id = self.seq_id

    def fork(self, index: int) -> Sequence:
        """Completion `index` of this sequence's request (this is completion 0): in its group, with a seed
        and a grammar matcher of its own, the prompt still to compute (it starts on completion 0's blocks)."""
        self.group.num_live += 1
        grammar = None if self.grammar is None else self.grammar.fork()
        request = self.request.completion(index)
        return Sequence(
            request, self.max_new_tokens, grammar=grammar, index=index, group_id=self.seq_id, group=self.group
        )

    @property
    def id(self) -> str:
        """The caller's request id."""
        return self.request.request_id

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def scores_prompt(self) -> bool:
        """Whether its prefill scores the prompt (`prompt_logprobs`): only before its first output token, so
        a sequence recomputed after preemption is not scored twice."""
        return self.request.sampling.prompt_logprobs and not self.num_completion_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet: the prompt (or the recompute) still to prefill."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def expired(self, now: float | None = None) -> bool:
        deadline = self.request.deadline
        return deadline is not None and (now if now is not None else time.monotonic()) >= deadline

"""One engine step as values, without threads or a model: schedule -> execute -> update -> events."""

from __future__ import annotations

from collections import defaultdict

from engine.batching import BatchConfig
from engine.core.engine_core import EngineCore
from engine.core.kv_cache import BlockAllocator
from engine.core.observer import EngineObserver
from engine.core.output import OutputProcessor
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.sequence import Sequence
from engine.core.step import Step, StepOutput
from engine.errors import RequestCancelledError, RequestFailedError
from engine.request import FinishReason, GenerationEvent, GenerationRequest, StoppingParams

EOS = 2


class LetterTokenizer:
    """Token i is the letter chr(ord('a') + i % 26): enough for the detokenizer."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class ScriptedRunner:
    """Samples the tokens of `script[seq_id]` in order; `fail` names sequences whose row cannot be sampled."""

    def __init__(self) -> None:
        self.script: dict[int, list[int]] = {}
        self.fail: set[int] = set()
        self.steps: list[Step] = []

    def execute(self, step: Step) -> StepOutput:
        self.steps.append(step)
        rows = step.sampled_rows
        tokens = [self.script[row.seq_id].pop(0) for row in rows]
        failed = {row.seq_id: "scripted failure" for row in rows if row.seq_id in self.fail}
        return StepOutput(tokens, [-0.5] * len(rows), failed)


def make_core(num_blocks: int = 16) -> tuple[EngineCore, ScriptedRunner]:
    allocator = BlockAllocator(num_blocks, block_size=4)
    config = SchedulerConfig(BatchConfig(max_batch_tokens=64))
    scheduler = Scheduler(config, allocator)
    runner = ScriptedRunner()
    outputs = OutputProcessor(LetterTokenizer(), {EOS}, eos_token_ids={EOS})
    return EngineCore(scheduler, runner, outputs, EngineObserver()), runner


def submit(core: EngineCore, runner: ScriptedRunner, tokens: list[int], **stopping) -> Sequence:
    stopping.setdefault("max_new_tokens", 8)
    seq = Sequence(
        GenerationRequest([10, 11, 12], stopping=StoppingParams(**stopping)), stopping["max_new_tokens"]
    )
    runner.script[seq.seq_id] = list(tokens)
    core.add(seq)
    return seq


def run_until_idle(core: EngineCore) -> list[tuple[Sequence, GenerationEvent | Exception]]:
    outbox: list = []
    for _ in range(100):
        if not core.scheduler.has_work():
            return outbox
        core.step(outbox)
    raise AssertionError("the core never went idle")


def events_of(outbox, seq: Sequence) -> list:
    return [item for s, item in outbox if s is seq]


def test_a_step_runs_what_the_scheduler_chose_and_the_tokens_become_events():
    core, runner = make_core()
    seq = submit(core, runner, [3, 4, 5], max_new_tokens=3)
    outbox = run_until_idle(core)
    first = runner.steps[0]
    assert first.is_prefill and [row.token_ids for row in first.rows] == [[10, 11, 12]]
    assert [step.is_prefill for step in runner.steps] == [True, False, False]
    events = events_of(outbox, seq)
    assert "".join(e.text for e in events) == "def"
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 3
    assert core.scheduler.allocator.num_free == 16


def test_eos_ends_a_sequence_unless_it_is_ignored():
    core, runner = make_core()
    stops = submit(core, runner, [3, EOS, 5])
    ignores = submit(core, runner, [3, EOS, 5], max_new_tokens=3, ignore_eos=True)
    outbox = run_until_idle(core)
    assert events_of(outbox, stops)[-1].finish_reason is FinishReason.EOS
    assert events_of(outbox, stops)[-1].completion_tokens == 2
    assert events_of(outbox, ignores)[-1].finish_reason is FinishReason.LENGTH


def test_a_stop_sequence_ends_the_sequence_and_frees_its_blocks():
    core, runner = make_core()
    seq = submit(core, runner, [3, 4, 5, 6, 7], stop_sequences=("ef",))
    outbox = run_until_idle(core)
    events = events_of(outbox, seq)
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert "".join(e.text for e in events) == "d"
    assert core.scheduler.allocator.num_free == 16 and not core.scheduler.sequences


def test_a_row_that_cannot_be_sampled_fails_alone():
    core, runner = make_core()
    bad = submit(core, runner, [3, 4])
    good = submit(core, runner, [3, 4], max_new_tokens=2)
    runner.fail.add(bad.seq_id)
    outbox = run_until_idle(core)
    [error] = events_of(outbox, bad)
    assert isinstance(error, RequestFailedError) and "scripted failure" in str(error)
    assert events_of(outbox, good)[-1].finish_reason is FinishReason.LENGTH
    assert core.scheduler.allocator.num_free == 16


def test_a_runner_fault_fails_the_sequences_of_that_step_only():
    core, runner = make_core()
    first = submit(core, runner, [3, 4, 5], max_new_tokens=3)
    outbox: list = []
    core.step(outbox)  # first's prefill
    second = submit(core, runner, [3])
    runner.script[second.seq_id] = []  # its prefill step raises (pop from an empty list)
    core.step(outbox)
    assert isinstance(events_of(outbox, second)[-1], RequestFailedError)
    outbox += run_until_idle(core)
    assert events_of(outbox, first)[-1].finish_reason is FinishReason.LENGTH


def test_abort_ends_a_sequence_once_and_frees_its_blocks():
    core, runner = make_core()
    seq = submit(core, runner, [3, 4, 5, 6])
    outbox: list = []
    core.step(outbox)
    core.abort(seq.seq_id, RequestCancelledError("cancelled"), outbox)
    core.abort(seq.seq_id, RequestCancelledError("again"), outbox)
    assert [type(item) for item in events_of(outbox, seq)] == [GenerationEvent, RequestCancelledError]
    assert core.scheduler.allocator.num_free == 16 and not core.scheduler.has_work()


def test_the_runner_hears_of_finished_sequences_in_the_next_step():
    core, runner = make_core()
    short = submit(core, runner, [3], max_new_tokens=1)
    submit(core, runner, [3, 4, 5], max_new_tokens=3)
    run_until_idle(core)
    assert runner.steps[1].finished_seq_ids == [short.seq_id]


def test_a_failed_step_hands_its_finished_sequences_on_to_the_next_step():
    core, runner = make_core()
    short = submit(core, runner, [3], max_new_tokens=1)
    submit(core, runner, [3, 4, 5], max_new_tokens=3)
    outbox: list = []
    core.step(outbox)  # both prefilled; short is done
    doomed = submit(core, runner, [3])
    runner.script[doomed.seq_id] = []  # its prefill step raises
    core.step(outbox)
    assert runner.steps[1].finished_seq_ids == [short.seq_id]
    run_until_idle(core)
    assert short.seq_id in runner.steps[2].finished_seq_ids  # the runner can still drop its state


class RecordingGrammar:
    """Stands in for a sequence's grammar matcher: records the tokens it is advanced with."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)


def test_the_loop_side_advances_a_sequences_grammar_with_each_sampled_token_and_not_a_failed_ones():
    core, runner = make_core()
    seq = submit(core, runner, [3, 4, EOS])
    failing = submit(core, runner, [3, 4])
    seq.grammar, failing.grammar = RecordingGrammar(), RecordingGrammar()
    runner.fail.add(failing.seq_id)
    run_until_idle(core)
    assert seq.grammar.accepted == [3, 4, EOS]  # the scripted runner never touches it: the update does
    assert failing.grammar.accepted == []


def test_a_stop_sequence_completed_by_an_eos_token_at_the_length_limit_is_the_finish_reason():
    core, runner = make_core()
    seq = submit(core, runner, [3, EOS], max_new_tokens=2, stop_sequences=("dc",))  # EOS reads "c"
    events = events_of(run_until_idle(core), seq)
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE and events[-1].completion_tokens == 2


def submit_n(core: EngineCore, runner: ScriptedRunner, n: int) -> Sequence:
    """A request of `n` completions, each scripted to sample 3, 4, 5, 6 (forks' ids are made later)."""
    runner.script = defaultdict(lambda: [3, 4, 5, 6])
    seq = Sequence(GenerationRequest([10, 11, 12], stopping=StoppingParams(max_new_tokens=4), n=n), 4)
    core.add(seq)
    return seq


def test_the_forked_completions_run_and_finish_like_completion_0():
    core, runner = make_core()
    first = submit_n(core, runner, n=3)
    outbox = run_until_idle(core)
    finished = sorted(item.index for seq, item in outbox if item.finished and seq.group is first.group)
    assert finished == [0, 1, 2] and "".join(e.text for e in events_of(outbox, first)) == "defg"
    assert core.scheduler.allocator.num_free == 16 and not core.scheduler.sequences


def test_cancelling_a_request_before_its_prefill_ends_completion_0_and_forks_nothing():
    core, runner = make_core()
    first = submit_n(core, runner, n=3)
    outbox: list = []
    core.abort_group(first.group_id, RequestCancelledError("cancelled"), outbox)
    assert [type(item) for _, item in outbox] == [RequestCancelledError]
    assert not core.scheduler.has_work() and not core.scheduler.sequences


def test_cancelling_a_request_after_the_forks_ends_every_live_completion_and_frees_their_blocks():
    core, runner = make_core()
    first = submit_n(core, runner, n=3)
    outbox: list = []
    core.step(outbox)  # completion 0's prefill: the two forks are queued
    core.step(outbox)  # their prefill
    assert len(core.scheduler.sequences) == 3
    core.abort_group(first.group_id, RequestCancelledError("cancelled"), outbox)
    ended = sorted(seq.index for seq, item in outbox if isinstance(item, RequestCancelledError))
    assert ended == [0, 1, 2] and core.scheduler.allocator.num_free == 16

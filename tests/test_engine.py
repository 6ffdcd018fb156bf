"""The engine end to end on tiny random-weight models: correctness, batching, KV accounting, errors."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.batching import BatchConfig
from engine.core.observer import EngineObserver
from engine.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    InvalidRequestError,
    QueueFullError,
    RequestCancelledError,
    RequestFailedError,
)
from engine.frontend.engine import Engine, EngineConfig
from engine.request import FinishReason, GenerationRequest, SamplingParams, StoppingParams
from tests.conftest import TINY_ARCHS

PROMPTS = [
    [5, 17, 300, 42, 7],
    [900, 901, 902],
    list(range(100, 140)),
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
]


class CountingObserver(EngineObserver):
    def __init__(self) -> None:
        self.preemptions = 0
        self.steps: list[tuple[bool, int]] = []

    def request_preempted(self, seq) -> None:
        self.preemptions += 1

    def step_finished(self, step, start, end, kv_used, kv_total) -> None:
        self.steps.append((step.is_prefill, len(step.rows)))


def make_engine(path, **kwargs) -> Engine:
    observer = kwargs.pop("observer", None)
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", **kwargs), observer=observer)
    engine.start()
    return engine


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache: the plainest possible reference."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def greedy(n: int) -> StoppingParams:
    return StoppingParams(max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir("llama"))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_output_matches_transformers_forward(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    engine = make_engine(path, weight_format="native")  # the exact path: auto is q4_1 for Llama-family models
    try:
        results = engine.generate(PROMPTS, stopping=greedy(12))
    finally:
        engine.shutdown()
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference_greedy(reference, prompt, 12)


def test_chunked_prefill_matches_unchunked(tiny_model_dir):
    prompt = list(range(200, 300))
    path = tiny_model_dir("llama")
    chunked = make_engine(path, batch=BatchConfig(max_batch_tokens=16))
    whole = make_engine(path)
    try:
        assert chunked.generate([prompt], stopping=greedy(10))[0].token_ids == (
            whole.generate([prompt], stopping=greedy(10))[0].token_ids
        )
    finally:
        chunked.shutdown()
        whole.shutdown()


def test_prefill_steps_never_exceed_max_batch_tokens(tiny_model_dir):
    observer = TokenBudgetObserver()
    engine = make_engine(tiny_model_dir("llama"), batch=BatchConfig(max_batch_tokens=24), observer=observer)
    try:
        engine.generate(PROMPTS * 2, stopping=greedy(4))
    finally:
        engine.shutdown()
    assert observer.prefill_tokens and max(observer.prefill_tokens) <= 24


class TokenBudgetObserver(EngineObserver):
    def __init__(self) -> None:
        self.prefill_tokens: list[int] = []

    def step_finished(self, step, start, end, kv_used, kv_total) -> None:
        if step.is_prefill:
            self.prefill_tokens.append(step.num_tokens)


async def test_output_does_not_depend_on_other_requests(llama_engine):
    alone = [llama_engine.generate([p], stopping=greedy(16))[0].token_ids for p in PROMPTS]

    async def run(prompt, delay):
        await asyncio.sleep(delay)
        events = llama_engine.submit(GenerationRequest(prompt, stopping=greedy(16)))
        return [t.id async for e in events for t in e.tokens]

    together = await asyncio.gather(*(run(p, 0.01 * i) for i, p in enumerate(PROMPTS * 2)))
    assert together == alone * 2


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llama_engine):
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = llama_engine.generate([PROMPTS[0]], sampling=sampling, stopping=greedy(16))[0]
    others = [SamplingParams(temperature=1.3, seed=i) for i in range(3)]
    batch = llama_engine.generate(PROMPTS, sampling=[sampling, *others], stopping=greedy(16))
    assert batch[0].token_ids == alone.token_ids


def test_preemption_recomputes_and_keeps_outputs(tiny_model_dir):
    observer = CountingObserver()
    path = tiny_model_dir("llama")
    # 8 blocks of 4 slots: four 11-token sequences cannot all grow to 40 tokens at once.
    small = make_engine(path, num_kv_blocks=12, kv_block_size=4, observer=observer)
    roomy = make_engine(path)
    try:
        prompts = [PROMPTS[3]] * 2 + [PROMPTS[0], PROMPTS[1]]
        got = small.generate(prompts, stopping=greedy(30))
        want = roomy.generate(prompts, stopping=greedy(30))
        assert observer.preemptions > 0
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert small.load.num_free_kv_blocks == small.load.num_kv_blocks
    finally:
        small.shutdown()
        roomy.shutdown()


def test_finish_reasons(llama_engine):
    length = llama_engine.generate([PROMPTS[0]], stopping=greedy(5))[0]
    assert length.finish_reason is FinishReason.LENGTH and length.completion_tokens == 5
    first = length.token_ids[0]
    llama_engine.eos_token_ids.add(first)
    try:
        eos = llama_engine.generate([PROMPTS[0]], stopping=StoppingParams(max_new_tokens=5))[0]
    finally:
        llama_engine.eos_token_ids.discard(first)
    assert eos.finish_reason is FinishReason.EOS and eos.token_ids == [first]


def test_stop_sequence_cuts_the_text(llama_engine):
    full = llama_engine.generate([PROMPTS[1]], stopping=greedy(12))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop, "the tiny model must produce some text for this test"
    cut = llama_engine.generate(
        [PROMPTS[1]], stopping=StoppingParams(max_new_tokens=12, stop_sequences=(stop,))
    )[0]
    assert cut.finish_reason is FinishReason.STOP_SEQUENCE
    assert cut.text == full.text[: full.text.index(stop)]


async def test_cancel_frees_kv_blocks(llama_engine):
    request = GenerationRequest(PROMPTS[2], stopping=greedy(500))
    events = llama_engine.submit(request)
    await anext(events)
    llama_engine.cancel(request.request_id)
    with pytest.raises(RequestCancelledError):
        async for _ in events:
            pass
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


async def test_closing_the_stream_cancels_the_request(llama_engine):
    events = llama_engine.submit(GenerationRequest(PROMPTS[2], stopping=greedy(500)))
    await anext(events)
    await events.aclose()
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


async def test_deadline_expiry_fails_the_request_and_frees_blocks(llama_engine):
    loop_time = asyncio.get_running_loop().time  # same clock as time.monotonic
    request = GenerationRequest(PROMPTS[2], stopping=greedy(2000), deadline=loop_time() + 0.3)
    with pytest.raises(DeadlineExceededError):
        async for _ in llama_engine.submit(request):
            pass
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


async def test_engine_fault_fails_only_the_requests_in_that_step(llama_engine, monkeypatch):
    runner = llama_engine.model_runner
    real_run = runner.run
    poisoned = [900, 901, 902, 903]

    def run(inputs, is_prefill):
        if any(item.token_ids[:4] == poisoned for item in inputs):
            raise RuntimeError("injected fault")
        return real_run(inputs, is_prefill)

    monkeypatch.setattr(runner, "run", run)
    healthy = llama_engine.submit(GenerationRequest(PROMPTS[0], stopping=greedy(30)))
    first = await anext(healthy)
    bad = llama_engine.submit(GenerationRequest(poisoned, stopping=greedy(30)))
    with pytest.raises(RequestFailedError):
        async for _ in bad:
            pass
    rest = [e async for e in healthy]
    assert sum(len(e.tokens) for e in [first, *rest]) == 30
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


def test_tiny_temperatures_and_penalties_fail_neither_their_request_nor_its_batchmates(llama_engine):
    hostile = [
        SamplingParams(temperature=1e-45, seed=1),
        SamplingParams(temperature=1e-38, seed=2),
        SamplingParams(temperature=1.0, repetition_penalty=1e-45, seed=3),
    ]
    innocent = [SamplingParams()] * len(PROMPTS)
    alone = llama_engine.generate(PROMPTS, stopping=greedy(6))
    together = llama_engine.generate(
        [[5, 6, 7]] * len(hostile) + PROMPTS, sampling=hostile + innocent, stopping=greedy(6)
    )
    assert all(r.completion_tokens == 6 for r in together)
    assert [r.token_ids for r in together[len(hostile) :]] == [r.token_ids for r in alone]


async def test_a_row_that_cannot_be_sampled_fails_only_its_own_request(llama_engine, monkeypatch):
    runner = llama_engine.model_runner
    real_run = runner.run
    poisoned = [900, 901, 902, 903]

    def run(inputs, is_prefill):
        logits = real_run(inputs, is_prefill)
        sampled = [item for item in inputs if item.sample]
        for i, item in enumerate(sampled):
            if item.token_ids[:4] == poisoned:
                logits[i] = float("nan")
        return logits

    monkeypatch.setattr(runner, "run", run)
    healthy = llama_engine.submit(GenerationRequest(PROMPTS[0], stopping=greedy(20)))
    first = await anext(healthy)
    bad = llama_engine.submit(GenerationRequest(poisoned, stopping=greedy(20)))
    with pytest.raises(RequestFailedError, match="sampling failed"):
        async for _ in bad:
            pass
    rest = [e async for e in healthy]
    assert sum(len(e.tokens) for e in [first, *rest]) == 20
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


async def test_a_request_id_in_flight_is_refused_and_free_again_once_cancelled(llama_engine):
    first = llama_engine.submit(GenerationRequest(PROMPTS[2], stopping=greedy(500), request_id="again"))
    await anext(first)
    with pytest.raises(DuplicateRequestError):
        llama_engine.submit(GenerationRequest(PROMPTS[0], stopping=greedy(4), request_id="again"))
    llama_engine.cancel("again")
    second = llama_engine.submit(GenerationRequest(PROMPTS[0], stopping=greedy(4), request_id="again"))
    assert sum([len(e.tokens) async for e in second]) == 4
    with pytest.raises(RequestCancelledError):
        async for _ in first:
            pass
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


def test_kv_pool_is_full_after_a_mix_of_outcomes(llama_engine):
    llama_engine.generate(
        PROMPTS, stopping=[greedy(3), greedy(7), StoppingParams(max_new_tokens=2), greedy(1)]
    )
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"prompt_ids": []}, "prompt_ids"),
        ({"prompt_ids": [10**9]}, "prompt_ids[0]"),
        ({"sampling": SamplingParams(temperature=-1)}, "sampling.temperature"),
        ({"sampling": SamplingParams(top_p=0)}, "sampling.top_p"),
        ({"sampling": SamplingParams(top_k=-1)}, "sampling.top_k"),
        ({"sampling": SamplingParams(repetition_penalty=0)}, "sampling.repetition_penalty"),
        ({"sampling": SamplingParams(frequency_penalty=3)}, "sampling.frequency_penalty"),
        ({"stopping": StoppingParams(max_new_tokens=2000, stop_sequences=())}, "stopping.max_new_tokens"),
        ({"stopping": StoppingParams(stop_sequences=("",))}, "stopping.stop_sequences[0]"),
        ({"stopping": StoppingParams(stop_sequences=tuple("abcdefghijklmnopq"))}, "stopping.stop_sequences"),
    ],
)
async def test_invalid_requests_are_refused_with_the_field(tiny_model_dir, request_kwargs, field):
    engine = Engine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", max_model_len=1024))
    request = GenerationRequest(**{"prompt_ids": [5, 6], **request_kwargs})
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(request)
    assert info.value.field == field


async def test_queue_full_is_refused(tiny_model_dir):
    engine = Engine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", max_queue_size=2))
    # Not started, so nothing leaves the queue.
    engine.submit(GenerationRequest([5]))
    engine.submit(GenerationRequest([6]))
    with pytest.raises(QueueFullError):
        engine.submit(GenerationRequest([7]))


async def test_higher_priority_is_served_first(tiny_model_dir):
    engine = make_engine(tiny_model_dir("llama"), batch=BatchConfig(max_batch_size=1))
    order: list[str] = []

    async def run(name, priority, n):
        async for event in engine.submit(
            GenerationRequest(PROMPTS[0], stopping=greedy(n), priority=priority)
        ):
            if event.finished:
                order.append(name)

    try:
        blocker = asyncio.create_task(run("blocker", 0, 20))
        while not engine.load.num_running:  # the blocker holds the one slot before the others queue
            await asyncio.sleep(0.001)
        tasks = [asyncio.create_task(run(f"p{p}", p, 2)) for p in (0, 5, 1, 9)]
        await asyncio.gather(blocker, *tasks)
    finally:
        engine.shutdown()
    assert order == ["blocker", "p9", "p5", "p1", "p0"]


def test_static_scheduling_gives_the_same_outputs(tiny_model_dir):
    path = tiny_model_dir("llama")
    observer = CountingObserver()
    static = make_engine(path, scheduling="static", observer=observer)
    observer.steps.clear()  # forget the warm-up
    try:
        got = static.generate(PROMPTS, stopping=[greedy(3), greedy(9), greedy(5), greedy(2)])
        assert static.load.num_free_kv_blocks == static.load.num_kv_blocks
    finally:
        static.shutdown()
    assert [r.token_ids for r in got] == make_reference_outputs(path)
    decode_batches = [n for is_prefill, n in observer.steps if not is_prefill]
    assert decode_batches and all(n == 4 for n in decode_batches)  # finished rows stay in the batch


def make_reference_outputs(path) -> list[list[int]]:
    engine = make_engine(path)
    try:
        lengths = [3, 9, 5, 2]
        return [
            engine.generate([p], stopping=greedy(n))[0].token_ids
            for p, n in zip(PROMPTS, lengths, strict=True)
        ]
    finally:
        engine.shutdown()


async def wait_for_idle(engine: Engine, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.load.num_running or engine.load.num_waiting:
        assert asyncio.get_running_loop().time() < deadline, "engine did not go idle"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the step that frees blocks may still be finishing


async def test_a_fault_outside_the_model_step_fails_in_flight_requests_and_the_loop_keeps_serving(
    llama_engine, monkeypatch
):
    scheduler = llama_engine.core.scheduler
    real_schedule = scheduler.schedule
    calls = {"n": 0}

    def schedule():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected scheduler fault")
        return real_schedule()

    monkeypatch.setattr(scheduler, "schedule", schedule)
    with pytest.raises(RequestFailedError, match="injected scheduler fault"):
        async for _ in llama_engine.submit(GenerationRequest(PROMPTS[0], stopping=greedy(30))):
            pass
    await wait_for_idle(llama_engine)
    assert llama_engine.load.num_free_kv_blocks == llama_engine.load.num_kv_blocks
    after = [e async for e in llama_engine.submit(GenerationRequest(PROMPTS[1], stopping=greedy(4)))]
    assert sum(len(e.tokens) for e in after) == 4


def test_split_prefill_packs_whole_sequences_and_cuts_only_long_ones():
    from engine.core.step import StepRow
    from engine.execution.model_runner import split_prefill

    a, b, c, d = (StepRow(list(range(n)), 0, [i]) for i, n in enumerate([3, 4, 10, 2]))
    parts = split_prefill([a, b, c, d], budget=8)
    assert [[len(x.token_ids) for x in part] for part in parts] == [[3, 4], [8], [2], [2]]
    assert parts[0] == [a, b] and parts[3] == [d]
    first, rest = parts[1][0], parts[2][0]  # sequence c, cut in two: the first piece continues into the next
    assert (first.start_pos, first.sample) == (0, False)
    assert (rest.start_pos, rest.sample, rest.token_ids) == (8, True, [8, 9])
    assert first.block_table is c.block_table
    assert split_prefill([a, b], budget=8) == [[a, b]]


@pytest.mark.parametrize("budget", [7, 16])
def test_prefill_split_into_passes_gives_the_same_logits(tiny_model_dir, budget):
    from engine.core.step import StepRow
    from engine.execution.model_runner import ModelRunner

    path = str(tiny_model_dir("llama"))
    whole = ModelRunner(path, "cpu", "float32", num_kv_blocks=64, prefill_chunk_tokens=0)
    split = ModelRunner(path, "cpu", "float32", num_kv_blocks=64, prefill_chunk_tokens=budget)
    outputs = []
    for runner in (whole, split):
        inputs = []
        for prompt in PROMPTS:
            table: list[int] = []
            assert runner.allocator.allocate(table, len(prompt))
            inputs.append(StepRow(prompt, 0, table))
        outputs.append(runner.run(inputs, is_prefill=True))
    assert outputs[0].shape == (len(PROMPTS), whole.vocab_size)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)

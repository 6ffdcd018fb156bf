"""Several completions per request (`n`): one prefill, a seed each, an index on every event, one cancel;
with log-probabilities (every completion's tokens, the prompt scored once) and structured output (a
grammar matcher per completion)."""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from client import AsyncTextGenClient, TextGenClient
from client.cli import main as cli_main
from engine.core.observer import EngineObserver
from engine.errors import InvalidRequestError
from engine.request import FinishReason, GenerationRequest, ResponseFormat, SamplingParams, StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb
from tests.test_engine import make_engine

PROMPT = list(range(300, 340))  # 40 tokens: two whole 16-token blocks and a half
SAMPLED = SamplingParams(temperature=1.0, seed=1234)


class PrefillCounter(EngineObserver):
    def __init__(self) -> None:
        self.prefill_tokens = 0
        self.queued = []  # every sequence submitted

    def request_queued(self, seq) -> None:
        self.queued.append(seq)

    def step_finished(self, step, start, end, kv_used, kv_total) -> None:
        if step.is_prefill:
            self.prefill_tokens += step.num_tokens


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """Prefix caching off: what completions share, they share without the cache."""
    counter = PrefillCounter()
    engine = make_engine(tiny_model_dir("llama"), prefix_caching=False, observer=counter)
    engine.counter = counter
    yield engine
    engine.shutdown()


def stopping(max_new_tokens: int = 10) -> StoppingParams:
    return StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True)


async def completions(engine, request: GenerationRequest) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    async for event in engine.submit(request):
        tokens.setdefault(event.index, []).extend(t.id for t in event.tokens)
    return tokens


async def all_events(engine, request: GenerationRequest) -> list:
    return [event async for event in engine.submit(request)]


async def test_each_completion_has_its_index_and_all_finish(engine, wait_until_idle):
    finished = []
    async for event in engine.submit(GenerationRequest(PROMPT, SAMPLED, stopping(), n=3)):
        if event.finished:
            finished.append(event.index)
    assert sorted(finished) == [0, 1, 2]
    wait_until_idle(engine)


async def test_completion_i_samples_as_a_single_request_seeded_seed_plus_i(engine):
    together = await completions(engine, GenerationRequest(PROMPT, SAMPLED, stopping(6), n=2))
    alone = SamplingParams(temperature=1.0, seed=1235)
    assert together[1] == (await completions(engine, GenerationRequest(PROMPT, alone, stopping(6))))[0]
    assert together[0] != together[1]


async def test_greedy_completions_all_equal_the_single_greedy_output(engine):
    together = await completions(engine, GenerationRequest(PROMPT, stopping=stopping(), n=3))
    alone = engine.generate([PROMPT], stopping=stopping())[0].token_ids
    assert [together[i] for i in range(3)] == [alone] * 3


async def test_the_prompt_is_prefilled_once_and_later_completions_compute_only_its_last_block(engine):
    before = engine.counter.prefill_tokens
    await completions(engine, GenerationRequest(PROMPT, stopping=stopping(2), n=4))
    assert engine.counter.prefill_tokens - before == 40 + 3 * (40 - 32)


async def test_cancelling_the_call_cancels_every_completion_and_frees_their_blocks(engine, wait_until_idle):
    events = engine.submit(GenerationRequest(PROMPT, SAMPLED, stopping(500), n=3))
    seen = [await anext(events) for _ in range(4)]
    await events.aclose()
    wait_until_idle(engine)
    assert seen and engine.load.num_free_kv_blocks == engine.load.num_kv_blocks


async def test_every_completions_tokens_carry_their_top_logprobs(engine):
    sampling = SamplingParams(temperature=1.0, seed=21, top_logprobs=3)
    events = await all_events(engine, GenerationRequest(PROMPT, sampling, stopping(5), n=3))

    tokens = {i: [t for e in events if e.index == i for t in e.tokens] for i in range(3)}
    assert [len(tokens[i]) for i in range(3)] == [5, 5, 5]
    assert all(len(t.top_logprobs) == 3 for i in range(3) for t in tokens[i])


async def test_with_prompt_logprobs_only_completion_0_scores_the_prompt_once(engine):
    params = SamplingParams(temperature=1.0, seed=5, prompt_logprobs=True)
    alone = engine.generate([PROMPT], SamplingParams(prompt_logprobs=True), stopping(2))[0].prompt_logprobs
    before = engine.counter.prefill_tokens

    events = await all_events(engine, GenerationRequest(PROMPT, params, stopping(2), n=4))

    scored = [e for e in events if e.prompt_logprobs]
    assert [e.index for e in scored] == [0] and events[0] is scored[0]
    assert [t.id for t in scored[0].prompt_logprobs] == PROMPT[1:]
    torch.testing.assert_close(
        torch.tensor([t.logprob for t in scored[0].prompt_logprobs]),
        torch.tensor([t.logprob for t in alone]),
        rtol=0,
        atol=1e-5,
    )
    # Completions 1 to 3 still start on completion 0's two whole blocks: no prompt logits needed there.
    assert engine.counter.prefill_tokens - before == 40 + 3 * (40 - 32)


REGEX = r"[a-z]{2,5}-[0-9]{2,3}"


async def test_with_a_response_format_each_completion_has_its_own_matcher_and_matches(engine):
    sampling = SamplingParams(temperature=1.0, seed=9, response_format=ResponseFormat(regex=REGEX))
    queued_before = len(engine.counter.queued)

    events = await all_events(
        engine, GenerationRequest(PROMPT, sampling, StoppingParams(max_new_tokens=160), n=4)
    )

    grammars = [seq.grammar for seq in engine.counter.queued[queued_before:]]
    assert len(grammars) == 4 and len({id(g) for g in grammars}) == 4 and None not in grammars
    texts = {i: "".join(e.text for e in events if e.index == i) for i in range(4)}
    assert all(re.fullmatch(REGEX, text) for text in texts.values()), texts
    assert [e.finish_reason for e in events if e.finished] == [FinishReason.EOS] * 4
    assert len(set(texts.values())) > 1  # sampled apart, each walking the grammar on its own


@pytest.mark.parametrize("n", [0, 17])
def test_n_outside_one_to_max_n_is_refused_with_the_field(engine, n):
    with pytest.raises(InvalidRequestError) as error:
        engine._enqueue(GenerationRequest(PROMPT, n=n), sink=None)
    assert error.value.violations[0][0] == "n"


# ---- over gRPC, the Python clients and the CLI ----------------------------------------------------------


def test_unary_response_holds_every_completion_with_completion_0_on_top(stub):
    request = pb.GenerateRequest(
        prompt="Once upon a time",
        sampling=pb.SamplingParameters(temperature=1.0, seed=7),
        stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
        n=3,
    )
    response = stub.Generate(request, timeout=30)
    assert [c.index for c in response.completions] == [0, 1, 2]
    first = response.completions[0]
    assert (response.text, list(response.tokens), response.finish_reason) == (
        first.text, list(first.tokens), first.finish_reason,
    )  # fmt: skip
    assert response.usage.completion_tokens == 18 and first.usage.completion_tokens == 6


def test_stream_messages_carry_their_completion_index(stub):
    request = pb.GenerateRequest(
        prompt="Once upon a time", stopping=pb.StoppingCriteria(max_new_tokens=5, ignore_eos=True), n=2
    )
    messages = list(stub.GenerateStream(request, timeout=30))
    assert sorted(m.index for m in messages if m.finish_reason) == [0, 1]
    assert sum(len(m.tokens) for m in messages if m.index == 1) == 5


def test_n_over_the_limit_is_invalid_argument_naming_n(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(prompt="Hi", n=17), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n:" in error.value.details()


def test_the_sync_client_returns_n_completions(server):
    with TextGenClient(server.target, timeout=60) as client:
        result = client.generate("Hello", n=2, max_new_tokens=3, temperature=1.0, seed=3)
    assert [c.index for c in result.completions] == [0, 1] and result.text == result.completions[0].text


async def test_the_async_client_streams_chunks_with_their_index(server):
    async with AsyncTextGenClient(server.target, timeout=60) as client:
        chunks = [chunk async for chunk in client.stream("Hello", n=2, max_new_tokens=3)]
    assert {chunk.index for chunk in chunks} == {0, 1}


def test_the_cli_prints_each_completion_under_its_index(server, capsys):
    assert cli_main(["Hello", "--target", server.target, "--n", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- completion 0 ---" in out and "--- completion 1 ---" in out


def test_every_completion_message_carries_top_logprobs_over_grpc(stub):
    request = pb.GenerateRequest(
        prompt="Once upon a time",
        sampling=pb.SamplingParameters(temperature=1.0, seed=11),
        stopping=pb.StoppingCriteria(max_new_tokens=4, ignore_eos=True),
        n=3,
        top_logprobs=2,
    )
    response = stub.Generate(request, timeout=30)
    assert [len(c.tokens) for c in response.completions] == [4, 4, 4]
    assert all(len(t.top_logprobs) == 2 for c in response.completions for t in c.tokens)
    assert all(len(t.top_logprobs) == 2 for t in response.tokens)


def test_the_scored_prompt_comes_once_in_the_response_and_on_the_first_stream_message(stub):
    request = pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=PROMPT),
        stopping=pb.StoppingCriteria(max_new_tokens=3, ignore_eos=True),
        n=3,
        prompt_logprobs=True,
    )
    response = stub.Generate(request, timeout=30)
    assert [t.id for t in response.prompt_tokens] == PROMPT[1:]

    messages = list(stub.GenerateStream(request, timeout=30))
    assert [t.id for t in messages[0].prompt_tokens] == PROMPT[1:] and messages[0].index == 0
    assert not any(m.prompt_tokens for m in messages[1:])

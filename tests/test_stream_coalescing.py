"""A caller that falls behind its request's events gets them merged: fewer, larger events (and stream
messages) that say exactly what the separate ones said, with nothing lost or repeated.

The engine's own callers first; then each front of a server whose event loop is held (as a loop busy with
other streams would be) while the engine finishes a stream already begun: the stream's reader then gets the
rest in fewer messages than tokens, and they add up to the unary answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import grpc
import openai
import pytest
from conftest import ServerThread, base_url
from smg_grpc_proto import vllm_engine_pb2 as worker_pb
from smg_grpc_proto import vllm_engine_pb2_grpc as worker_pb_grpc

from bench.serving.openai_client import OpenAIHttpClient
from engine.errors import RequestCancelledError
from engine.frontend.engine import Engine
from engine.frontend.results import fold
from engine.request import GenerationEvent, GenerationRequest, SamplingParams, StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc

PROMPT = [1, 450, 7483, 310, 3444, 338]


def greedy(max_new_tokens: int, top_logprobs: int = 0) -> tuple[SamplingParams, StoppingParams]:
    return SamplingParams(top_logprobs=top_logprobs), StoppingParams(max_new_tokens, ignore_eos=True)


async def collect(events) -> list[GenerationEvent]:
    return [event async for event in events]


async def test_a_caller_that_fell_behind_gets_one_event_with_its_whole_output(tiny_engine: Engine):
    behind = tiny_engine.submit(GenerationRequest(PROMPT, *greedy(8, top_logprobs=2)))
    # Submitted after `behind` and longer: once it has ended, all of `behind`'s events are queued.
    await collect(tiny_engine.submit(GenerationRequest(PROMPT[:3], *greedy(24))))

    events = await collect(behind)

    (expected,) = tiny_engine.generate([PROMPT], stopping=StoppingParams(8, ignore_eos=True))
    assert len(events) == 1
    (event,) = events
    assert event.finished and event.completion_tokens == 8
    assert (event.text, [t.id for t in event.tokens]) == (expected.text, expected.token_ids)
    assert all(len(t.top_logprobs) == 2 for t in event.tokens)


async def test_completions_that_fell_behind_merge_apart_and_fold_to_the_same_output(tiny_engine: Engine):
    sampling = SamplingParams(temperature=1.0, seed=7, top_logprobs=1)
    stopping = StoppingParams(10, ignore_eos=True)
    behind = tiny_engine.submit(GenerationRequest(PROMPT, sampling, stopping, n=2))
    await collect(tiny_engine.submit(GenerationRequest(PROMPT[:3], *greedy(24))))

    events = await collect(behind)
    prompt = await collect(tiny_engine.submit(GenerationRequest(PROMPT, sampling, stopping, n=2)))

    assert sorted(event.index for event in events) == [0, 1]  # one per completion, never merged across
    merged, separate = fold(events), fold(prompt)
    assert [(r.text, r.token_ids, r.finish_reason) for r in merged] == [
        (r.text, r.token_ids, r.finish_reason) for r in separate
    ]


async def test_a_cancelled_caller_that_fell_behind_gets_each_token_once_then_the_cancellation(
    tiny_engine: Engine, wait_until_idle
):
    behind = tiny_engine.submit(GenerationRequest(PROMPT, *greedy(400), request_id="behind"))
    await collect(tiny_engine.submit(GenerationRequest(PROMPT[:3], *greedy(8))))
    tiny_engine.cancel("behind")

    events = []
    with pytest.raises(RequestCancelledError):
        async for event in behind:
            events.append(event)

    (uncancelled,) = tiny_engine.generate([PROMPT], stopping=StoppingParams(400, ignore_eos=True))
    received = [t.id for event in events for t in event.tokens]
    assert len(received) >= 8  # at least as many steps as the request that ran beside it
    assert received == uncancelled.token_ids[: len(received)]
    assert "".join(event.text for event in events) == uncancelled.text[: len("".join(e.text for e in events))]
    assert len(events) < len(received)
    await asyncio.to_thread(wait_until_idle, tiny_engine)


# ---- the fronts, their event loop held ----------------------------------------------------------------

NUM_TOKENS = 40  # per completion: far more than the messages a reader held back once can get


@pytest.fixture(scope="module")
def held_server(server_config):  # a server of its own: the tests hold its loop
    server = ServerThread(dataclasses.replace(server_config(), http_port=0)).start()
    yield server
    server.stop()


def read_late(stream: Iterator, server: ServerThread, wait_until_idle) -> list:
    """Every message of `stream`: the first, then the rest once the engine has finished it, the server's
    loop held until then."""
    first = next(stream)
    with server.loop_held():
        wait_until_idle(server.engine)
    return [first, *stream]


def test_a_grpc_stream_read_late_gets_fewer_messages_adding_up_to_the_unary_answer(
    held_server, wait_until_idle
):
    request = pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParameters(temperature=1.0, seed=11),
        stopping=pb.StoppingCriteria(max_new_tokens=NUM_TOKENS, ignore_eos=True),
        n=2,
        top_logprobs=2,
    )
    with grpc.insecure_channel(held_server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        unary = stub.Generate(request, timeout=60)
        messages = read_late(stub.GenerateStream(request, timeout=60), held_server, wait_until_idle)

    for completion in unary.completions:
        own = [m for m in messages if m.index == completion.index]
        tokens = [t for m in own for t in m.tokens]
        assert len(own) < len(tokens) == NUM_TOKENS
        assert "".join(m.text for m in own) == completion.text
        assert [t.id for t in tokens] == [t.id for t in completion.tokens]
        assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in completion.tokens])
        assert [[a.id for a in t.top_logprobs] for t in tokens] == [
            [a.id for a in t.top_logprobs] for t in completion.tokens
        ]
        assert [m.finish_reason for m in own[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(own) - 1)
        assert own[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert own[-1].usage.completion_tokens == NUM_TOKENS


def test_a_worker_stream_read_late_counts_each_chunks_tokens(held_server, wait_until_idle):
    def request(stream: bool) -> worker_pb.GenerateRequest:
        sampling = worker_pb.SamplingParams(
            temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1
        )
        return worker_pb.GenerateRequest(
            tokenized=worker_pb.TokenizedInput(input_ids=PROMPT), sampling_params=sampling, stream=stream
        )

    with grpc.insecure_channel(held_server.target) as channel:
        worker = worker_pb_grpc.VllmEngineStub(channel)
        (unary,) = worker.Generate(request(stream=False), timeout=60)
        streamed = read_late(worker.Generate(request(stream=True), timeout=60), held_server, wait_until_idle)

    chunks = [r.chunk for r in streamed if r.WhichOneof("response") == "chunk"]
    complete = unary.complete
    assert len(chunks) < NUM_TOKENS
    assert sum(c.completion_tokens for c in chunks) == complete.completion_tokens == NUM_TOKENS
    assert [t for c in chunks for t in c.token_ids] == list(complete.output_ids)
    assert [lp for c in chunks for lp in c.output_logprobs.token_logprobs] == pytest.approx(
        list(complete.output_logprobs.token_logprobs)
    )
    last = streamed[-1].complete  # as vLLM's servicer: the last chunk's tokens again (the gateway adds up)
    assert list(last.output_ids) == list(chunks[-1].token_ids) and last.finish_reason == "length"


def test_an_openai_stream_read_late_gives_the_sdk_the_unstreamed_text_and_logprobs(
    held_server, wait_until_idle
):
    url = base_url(held_server) + "/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        model = held_server.engine.model_info.name
        asked = dict(model=model, prompt=PROMPT, max_tokens=NUM_TOKENS, logprobs=1, temperature=0)
        whole = client.completions.create(**asked, extra_body={"ignore_eos": True})
        stream = client.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
        chunks = read_late(iter(stream), held_server, wait_until_idle)

    (choice,) = whole.choices
    said = [c.choices[0] for c in chunks if c.choices]
    assert len(said) < NUM_TOKENS
    assert "".join(c.text for c in said) == choice.text
    assert [t for c in said for t in c.logprobs.tokens] == choice.logprobs.tokens
    assert [o for c in said for o in c.logprobs.text_offset] == choice.logprobs.text_offset
    logprobs = [lp for c in said for lp in c.logprobs.token_logprobs]
    assert logprobs == pytest.approx(choice.logprobs.token_logprobs)
    assert [c.finish_reason for c in said] == [None] * (len(said) - 1) + ["length"]
    assert chunks[-1].usage.completion_tokens == NUM_TOKENS


async def test_the_http_load_generator_counts_the_tokens_of_a_late_chunk(held_server, wait_until_idle):
    chunks = []
    async with OpenAIHttpClient(base_url(held_server)) as client:
        async for chunk in client.stream(PROMPT, NUM_TOKENS, timeout_s=60):
            if not chunks:
                with held_server.loop_held():
                    await asyncio.to_thread(wait_until_idle, held_server.engine)
            chunks.append(chunk)

    assert len(chunks) < NUM_TOKENS
    assert sum(c.num_tokens for c in chunks) == NUM_TOKENS
    # each token counted when the chunk carrying it came, none left for the usage chunk at the end to settle
    assert chunks[-1].num_tokens == 0 and chunks[-1].prompt_tokens == len(PROMPT)

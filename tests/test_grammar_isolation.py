"""A grammar that goes over the grammar engine's limits, or is late, fails only its own request: its plain
batchmates finish with the tokens they get alone, and no KV block is left behind; over the engine and over
the HTTP front (400, naming the parameter) and gRPC (INVALID_ARGUMENT)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading

import aiohttp
import grpc
import pytest
import torch
from conftest import ServerThread
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.batching import BatchConfig
from engine.core.structured import GRAMMAR_THREAD_NICE, GrammarMatcher, GrammarWorkers
from engine.errors import GrammarLimitError
from engine.frontend.engine import Engine, EngineConfig
from engine.request import GenerationRequest, ResponseFormat, SamplingParams, StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb

# Both compile, then need more lexer than the parser limits allow as soon as the first "a" comes.
ADVERSARIAL_REGEX = "(a|aa){300,3000}b"
ADVERSARIAL_SCHEMA = {
    "type": "object",
    "properties": {"s": {"type": "string", "pattern": f"^{ADVERSARIAL_REGEX}$"}},
    "required": ["s"],
}
ADVERSARIAL = {
    "regex": ResponseFormat(regex=ADVERSARIAL_REGEX),
    "json_schema": ResponseFormat(json_schema=json.dumps(ADVERSARIAL_SCHEMA)),
}
PLAIN_PROMPTS = ["The weather today", "Once upon a time", "A list of fruits:"]
PLAIN_STOPPING = StoppingParams(max_new_tokens=24, ignore_eos=True)
# A batch forms only once the plain requests and their neighbour all wait (or after 5 s): they share their
# prefill step and their decode steps, where the neighbour's grammar fails.
TOGETHER = BatchConfig(min_batch_size=len(PLAIN_PROMPTS) + 1, max_wait_ms=5000)
FILLER = "Without a grammar:"  # a plain fourth request, for the plain requests' batch alone


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    config = EngineConfig(
        model=str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=256, batch=TOGETHER
    )
    engine = Engine(config)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def plain_alone(engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate([*PLAIN_PROMPTS, FILLER], SamplingParams(), PLAIN_STOPPING)][
        :-1
    ]


async def run_together(engine: Engine, neighbour: GenerationRequest) -> tuple[list[list[int]], Exception]:
    """The plain greedy requests' tokens and `neighbour`'s error, all submitted at once."""
    engine.grammars.compile(neighbour.sampling.response_format)  # as a server does, before submitting

    async def tokens(request: GenerationRequest) -> list[int] | Exception:
        try:
            return [token.id async for event in engine.submit(request) for token in event.tokens]
        except Exception as e:
            return e

    plain = [GenerationRequest(engine.tokenize(p), stopping=PLAIN_STOPPING) for p in PLAIN_PROMPTS]
    *outputs, error = await asyncio.gather(*map(tokens, [*plain, neighbour]))
    return outputs, error


async def wait_until_idle(engine: Engine) -> None:
    while engine.load.num_running or engine.load.num_waiting or engine.load.num_used_kv_blocks:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind", ADVERSARIAL)
async def test_a_grammar_over_its_limits_fails_alone_and_its_batchmates_keep_their_tokens(
    engine, plain_alone, kind
):
    sampling = SamplingParams(response_format=ADVERSARIAL[kind])
    neighbour = GenerationRequest(engine.tokenize("Say a:"), sampling, StoppingParams(max_new_tokens=64))

    tokens, error = await run_together(engine, neighbour)

    assert tokens == plain_alone
    assert isinstance(error, GrammarLimitError)
    assert error.field == f"sampling.response_format.{kind}"
    assert "too many expressions" in error.description
    await asyncio.wait_for(wait_until_idle(engine), 10)


def held_masks(monkeypatch) -> threading.Event:
    """Every matcher computes its masks only once the returned event is set."""
    released = threading.Event()
    fill_mask = GrammarMatcher.fill_mask

    def held(self, out):
        released.wait()
        fill_mask(self, out)

    monkeypatch.setattr(GrammarMatcher, "fill_mask", held)
    return released


async def test_a_grammar_late_past_the_step_budget_fails_alone(engine, plain_alone, monkeypatch):
    released = held_masks(monkeypatch)  # a matcher stuck until the test is over
    monkeypatch.setattr(engine.model_runner.sampler.grammar_workers, "budget_ms", 50.0)
    sampling = SamplingParams(response_format=ResponseFormat(regex="[0-9]{4}"))
    neighbour = GenerationRequest(engine.tokenize("A year:"), sampling, StoppingParams(max_new_tokens=8))
    try:
        tokens, error = await run_together(engine, neighbour)
    finally:
        released.set()

    assert tokens == plain_alone
    assert isinstance(error, GrammarLimitError) and "per-step budget of 50 ms" in error.description
    await asyncio.wait_for(wait_until_idle(engine), 10)


async def test_a_slow_grammar_holds_only_its_own_request_and_keeps_its_tokens(
    engine, plain_alone, monkeypatch
):
    sampling = SamplingParams(response_format=ResponseFormat(regex="[0-9]{4}"))

    def neighbour() -> GenerationRequest:
        return GenerationRequest(engine.tokenize("A year:"), sampling, StoppingParams(max_new_tokens=8))

    alone = [token.id async for event in engine.submit(neighbour()) for token in event.tokens]
    released = held_masks(monkeypatch)  # the neighbour's masks wait until the plain requests have finished

    async def tokens(request: GenerationRequest) -> list[int]:
        return [token.id async for event in engine.submit(request) for token in event.tokens]

    slowed = asyncio.ensure_future(tokens(neighbour()))
    plain = [GenerationRequest(engine.tokenize(p), stopping=PLAIN_STOPPING) for p in PLAIN_PROMPTS]
    try:
        # The batch does not wait for the neighbour's masks: its batchmates finish while they are held.
        assert await asyncio.wait_for(asyncio.gather(*map(tokens, plain)), 30) == plain_alone
        assert not slowed.done()
    finally:
        released.set()
    assert await asyncio.wait_for(slowed, 30) == alone  # sampled from the logits it had: the same tokens
    await asyncio.wait_for(wait_until_idle(engine), 10)


def test_a_late_mask_is_demoted_to_the_lowest_cpu_priority_and_its_thread_replaced(engine, monkeypatch):
    if sys.platform != "linux":
        pytest.skip("a thread's own niceness is Linux's")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    started, released = threading.Event(), threading.Event()
    niceness: list[int] = []

    def held(self, out):  # the first mask waits for the test; every mask notes its thread's niceness
        started.set()
        if not niceness:
            released.wait()
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    monkeypatch.setattr(GrammarMatcher, "fill_mask", held)
    workers = GrammarWorkers(num_threads=1)
    try:
        late = engine.grammars.matcher(ResponseFormat(regex="[0-9]{4}"))
        masks = workers.start([late], engine.model_runner.vocab_size)
        assert started.wait(10)
        _, failed, deferred = masks.result(torch.device("cpu"), wait_s=0.01)
        assert (failed, deferred) == ({}, {0})
        released.set()
        late.task.result(timeout=10)
        assert niceness == [max(GRAMMAR_THREAD_NICE, base)]
        # The demoted thread left; the next mask runs on a new thread at the loop's priority.
        ordinary = engine.grammars.matcher(ResponseFormat(regex="[0-9]{4}"))
        workers.start([ordinary], engine.model_runner.vocab_size)
        ordinary.task.result(timeout=10)
        assert niceness == [max(GRAMMAR_THREAD_NICE, base), base]
    finally:
        released.set()
        workers.close()


# ---- over the fronts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(server_config):
    server = ServerThread(dataclasses.replace(server_config(batch=TOGETHER), http_port=0)).start()
    yield server
    server.stop()


async def test_over_http_the_adversarial_request_is_400_and_its_batchmates_are_unchanged(http_server):
    engine = http_server.engine
    alone = [r.text for r in engine.generate([*PLAIN_PROMPTS, FILLER], SamplingParams(), PLAIN_STOPPING)][:-1]
    engine.grammars.compile(ResponseFormat(regex=ADVERSARIAL_REGEX))  # its compile delays no one
    url = f"http://127.0.0.1:{http_server.server.http.port}/v1/completions"
    plain = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True} for p in PLAIN_PROMPTS]
    adversarial = {"prompt": "Say a:", "max_tokens": 64, "guided_regex": ADVERSARIAL_REGEX}

    async with aiohttp.ClientSession() as session:

        async def post(body: dict) -> tuple[int, dict]:
            async with session.post(url, json=body) as response:
                return response.status, await response.json()

        *answers, (status, refusal) = await asyncio.gather(*map(post, [*plain, adversarial]))

    assert [(s, a["choices"][0]["text"]) for s, a in answers] == [(200, text) for text in alone]
    error = refusal["error"]
    assert (status, error["code"], error["param"]) == (400, "grammar_too_complex", "guided_regex")
    assert "too many expressions" in error["message"]
    await asyncio.wait_for(wait_until_idle(engine), 10)


async def test_streamed_over_http_the_adversarial_request_ends_with_its_own_error_event(http_server):
    url = f"http://127.0.0.1:{http_server.server.http.port}/v1/completions"
    plain = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in PLAIN_PROMPTS]  # to fill the batch
    # Not compiled before: a format whose grammar failed once fails at its next first mask, before any output.
    regex = ADVERSARIAL_REGEX.replace("300", "301")
    adversarial = {"prompt": "Say a:", "max_tokens": 64, "guided_regex": regex, "stream": True}

    async with aiohttp.ClientSession() as session:

        async def post(body: dict) -> tuple[int, bytes]:
            async with session.post(url, json=body) as response:
                return response.status, await response.read()

        *answers, (status, streamed) = await asyncio.gather(*map(post, [*plain, adversarial]))

    events = [e.removeprefix("data: ") for e in streamed.decode().split("\n\n") if e]
    error = json.loads(events[-2])["error"]
    assert status == 200 and events[-1] == "[DONE]"
    assert (error["code"], error["param"]) == ("grammar_too_complex", "guided_regex")
    assert [s for s, _ in answers] == [200] * len(plain)


def test_over_grpc_the_adversarial_request_is_invalid_argument_naming_the_format(stub):
    request = pb.GenerateRequest(
        prompt="Say a:",
        stopping=pb.StoppingCriteria(max_new_tokens=64),
        response_format=pb.ResponseFormat(json_schema=json.dumps(ADVERSARIAL_SCHEMA)),
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request, timeout=60)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reasons = [
        info.reason for info in unpacked(rpc_status.from_call(error.value), error_details_pb2.ErrorInfo)
    ]
    violations = unpacked(rpc_status.from_call(error.value), error_details_pb2.BadRequest)[0].field_violations
    assert reasons == ["GRAMMAR_TOO_COMPLEX"]
    assert [v.field for v in violations] == ["response_format.json_schema"]


def unpacked(status, kind) -> list:
    found = []
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


class _FailingMatcher:
    """An llguidance matcher whose every mask fails: a grammar over its limits from the first token on."""

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        raise RuntimeError("lexer error: too many expressions constructed")


def test_a_format_that_failed_before_any_output_is_refused_at_admission(engine):
    response_format = ResponseFormat(regex="(b|bb){5}c")
    matcher = engine.grammars.matcher(response_format)
    matcher._matcher = _FailingMatcher()
    with pytest.raises(GrammarLimitError, match="too many expressions"):
        matcher.allowed()
    # The next request of that format costs no prefill and no step: it is refused before it is queued.
    with pytest.raises(GrammarLimitError, match="already failed before any output") as refused:
        sampling = SamplingParams(response_format=response_format)
        engine.generate(["Say b:"], sampling, StoppingParams(max_new_tokens=8))
    assert refused.value.field == "sampling.response_format.regex"
    assert engine.load.num_waiting == 0 and engine.load.num_running == 0


def test_a_format_that_failed_after_some_output_is_still_admitted(engine):
    response_format = ResponseFormat(regex="(d|dd){5}e")
    matcher = engine.grammars.matcher(response_format)
    assert matcher.allowed() is not None
    matcher.accept(engine.tokenize("d")[0])
    matcher._matcher = _FailingMatcher()
    with pytest.raises(GrammarLimitError, match="at output token 1"):
        matcher.allowed()
    engine.grammars.compile(response_format)  # a path-dependent failure does not condemn the format

"""Tests for bench.loadgen against a fake in-process gRPC server that streams a known number of tokens."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest
import pytest_asyncio

from bench.loadgen import run_load, tokenize_prompts
from bench.workload import RequestSpec
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

STOPS_EARLY = 1000  # the fake server ends such requests after 3 tokens, as if at EOS
FAILS = 999  # the fake server fails such requests with INTERNAL


class FakeServer(pb_grpc.TextGenerationServiceServicer):
    """Streams `max_new_tokens` tokens two per message; tokenizes each word to its length."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    async def Tokenize(self, request, context):
        return pb.TokenizeResponse(ids=[len(word) for word in request.text.split()])

    async def GenerateStream(self, request, context):
        self.requests.append(request)
        n = request.stopping.max_new_tokens
        if n == FAILS:
            await context.abort(grpc.StatusCode.INTERNAL, "engine fault")
        num_tokens = 3 if n == STOPS_EARLY else n
        for sent in range(0, num_tokens, 2):
            await asyncio.sleep(0.01)
            yield pb.GenerateStreamResponse(tokens=[pb.Token(id=7)] * min(2, num_tokens - sent), text="ab")


@pytest_asyncio.fixture
async def fake_server():
    server = grpc.aio.server()
    servicer = FakeServer()
    pb_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


def spec(index: int, output_len: int, arrival_s: float = 0.0, text: str = "a bb ccc") -> RequestSpec:
    return RequestSpec(index, arrival_s, len(text.split()), output_len, text)


@pytest.mark.asyncio
async def test_prompts_are_tokenized_by_the_server_and_cut_to_length(fake_server):
    target, _ = fake_server
    specs = [RequestSpec(0, 0.0, 2, 1, "a bb ccc"), RequestSpec(1, 0.0, 1, 1, "dddd e")]
    assert await tokenize_prompts(target, specs) == [[1, 2], [4]]


@pytest.mark.asyncio
async def test_requests_ask_for_exactly_their_length_with_eos_ignored(fake_server):
    target, servicer = fake_server
    await run_load(target, [spec(0, 5)], [[11, 12, 13]], progress=False)
    (request,) = servicer.requests
    assert list(request.input_ids.ids) == [11, 12, 13]
    assert request.stopping.max_new_tokens == 5
    assert request.stopping.ignore_eos
    assert not request.sampling.HasField("temperature")  # greedy


@pytest.mark.asyncio
async def test_every_token_gets_an_arrival_time(fake_server):
    target, _ = fake_server
    result = await run_load(target, [spec(0, 5), spec(1, 1)], [[1], [2]], progress=False)
    first, second = result.traces
    assert (first.output_tokens, second.output_tokens) == (5, 1)
    assert first.ok and second.ok
    # Two tokens per message: the second of each pair arrives with the first.
    assert first.token_times_s[0] == first.token_times_s[1]
    assert first.token_times_s[2] > first.token_times_s[1]
    assert first.start_s < first.token_times_s[0] <= first.end_s


@pytest.mark.asyncio
async def test_short_and_failed_requests_are_errors(fake_server):
    target, _ = fake_server
    result = await run_load(
        target, [spec(0, STOPS_EARLY), spec(1, FAILS), spec(2, 2)], [[1]] * 3, progress=False
    )
    short, failed, fine = result.traces
    assert short.error == f"expected {STOPS_EARLY} tokens, got 3"
    assert failed.error.startswith("INTERNAL")
    assert fine.ok
    assert result.summary().num_errors == 2


@pytest.mark.asyncio
async def test_requests_are_sent_at_their_arrival_times(fake_server):
    target, _ = fake_server
    result = await run_load(target, [spec(0, 1, 0.0), spec(1, 1, 0.2)], [[1], [2]], progress=False)
    first, second = result.traces
    assert second.start_s - first.start_s == pytest.approx(0.2, abs=0.05)
    assert result.duration_s == pytest.approx(second.end_s - first.start_s, abs=0.01)


@pytest.mark.asyncio
async def test_concurrency_limit_keeps_requests_from_overlapping(fake_server):
    target, _ = fake_server
    result = await run_load(target, [spec(i, 4) for i in range(3)], [[1]] * 3, concurrency=1, progress=False)
    ordered = sorted(result.traces, key=lambda t: t.start_s)
    assert all(a.end_s <= b.start_s for a, b in itertools.pairwise(ordered))

"""The Python client and CLI against a real server: typed results, streaming, deadlines, retries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from client import (
    AsyncTextGenClient,
    FinishReason,
    GenerationResult,
    RetryPolicy,
    StreamChunk,
    TextGenClient,
)
from client.retry import retry_delay
from engine.batching import BatchConfig
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
FAST_RETRY = RetryPolicy(max_attempts=200, initial_backoff_s=0.02, max_backoff_s=0.1)


class RefusingServicer(textgen_pb2_grpc.TextGenerationServiceServicer):
    """Refuses the first `refusals` Tokenize calls with RESOURCE_EXHAUSTED, with RetryInfo when
    `retry_after_s` is set; answers the others."""

    def __init__(self, refusals: int, retry_after_s: float | None) -> None:
        self.refusals = refusals
        self.retry_after_s = retry_after_s
        self.calls = 0

    def Tokenize(self, request, context):
        self.calls += 1
        if self.calls <= self.refusals:
            context.abort_with_status(rpc_status.to_status(self._refusal()))
        return pb.TokenizeResponse(ids=[1], pieces=["a"])

    def _refusal(self) -> status_pb2.Status:
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="refused")
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            status.details.append(detail)
        return status


@pytest.fixture
def refusing_server():
    """Factory: `RefusingServicer` arguments -> (the servicer, the target of a server running it)."""
    servers = []

    def start(refusals: int, retry_after_s: float | None = None) -> tuple[RefusingServicer, str]:
        servicer = RefusingServicer(refusals, retry_after_s)
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        textgen_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def client(server):
    with TextGenClient(server.target, timeout=60) as client:
        yield client


def test_generate_returns_a_typed_result(client):
    result = client.generate(PROMPT, max_new_tokens=6, ignore_eos=True, request_id="typed")

    assert isinstance(result, GenerationResult)
    assert result.request_id == "typed"
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage.completion_tokens == len(result.tokens) == 6
    assert result.text == "".join(t.text for t in result.tokens)
    assert 0 < result.timing.time_to_first_token_s <= result.timing.total_s


def test_stream_yields_text_deltas_that_add_up_to_the_generate_text(client):
    unary = client.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
    chunks = list(client.stream(PROMPT, max_new_tokens=10, ignore_eos=True))

    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == unary.text
    assert [t.id for c in chunks for t in c.tokens] == [t.id for t in unary.tokens]
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage == unary.usage


def test_chat_messages_and_input_ids_are_inputs_too(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    templated = client.tokenize(messages=messages)

    by_chat = client.generate(messages=messages, max_new_tokens=3, ignore_eos=True)
    by_ids = client.generate(input_ids=templated.ids, max_new_tokens=3, ignore_eos=True)

    assert by_chat.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(templated.ids)
    assert by_chat.text == by_ids.text


def test_model_info_and_tokenize_are_typed(client):
    info = client.model_info()
    tokens = client.tokenize("Hello world")

    assert info.max_context_length == 2048 and info.vocab_size > 0
    assert "".join(tokens.pieces) == "Hello world"


def test_exactly_one_input_is_required(client):
    with pytest.raises(ValueError):
        client.generate(max_new_tokens=3)
    with pytest.raises(ValueError):
        client.generate("a", input_ids=[1, 2])


def test_invalid_argument_is_raised_without_retrying(client):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPT, temperature=-1.0)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.temperature" in error.value.details()
    assert time.monotonic() - started < 5


def test_stopping_a_stream_early_cancels_the_request_on_the_server(client, server, wait_until_idle):
    stream = client.stream(PROMPT, max_new_tokens=1900, ignore_eos=True)
    for _ in range(3):
        next(stream)
    stream.close()

    wait_until_idle(server.engine)


def test_timeout_raises_deadline_exceeded(client, server, wait_until_idle):
    with pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPT, max_new_tokens=1900, ignore_eos=True, timeout=0.3)

    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(server.engine)


async def test_async_client_generates_streams_and_describes(server):
    async with AsyncTextGenClient(server.target, timeout=60) as client:
        unary = await client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
        chunks = [c async for c in client.stream(PROMPT, max_new_tokens=8, ignore_eos=True)]
        info = await client.model_info()
        tokens = await client.tokenize(PROMPT)

    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert info.vocab_size > 0
    assert unary.usage.prompt_tokens == len(tokens.ids)


async def test_client_retries_a_full_queue_until_every_request_is_served(start_server):
    server = start_server(batch=BatchConfig(max_batch_size=1), max_queue_size=1)
    async with AsyncTextGenClient(server.target, timeout=120, retry=FAST_RETRY) as client:
        results = await asyncio.gather(
            *(client.generate(PROMPT, max_new_tokens=16, ignore_eos=True) for _ in range(6))
        )

    assert [r.usage.completion_tokens for r in results] == [16] * 6


async def test_retry_delay_is_read_from_the_servers_retry_info(start_server):
    server = start_server(batch=BatchConfig(max_batch_size=1), max_queue_size=1)
    request = pb.GenerateRequest(
        prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=64, ignore_eos=True)
    )
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        results = await asyncio.gather(
            *(stub.Generate(request, timeout=60) for _ in range(6)), return_exceptions=True
        )

    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert refused
    assert all(retry_delay(error) > 0 for error in refused)


def test_client_retries_while_the_server_loads_its_model(unloaded_server):
    results = []

    def call() -> None:
        with TextGenClient(unloaded_server.target, timeout=120, retry=FAST_RETRY) as client:
            results.append(client.generate(PROMPT, max_new_tokens=2, ignore_eos=True))

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # the first attempts get UNAVAILABLE
    unloaded_server.load()
    caller.join(timeout=60)

    assert results and results[0].usage.completion_tokens == 2


def test_resource_exhausted_with_retry_info_is_retried(refusing_server):
    servicer, target = refusing_server(refusals=2, retry_after_s=0.01)
    with TextGenClient(target, timeout=30) as client:
        tokens = client.tokenize("a")

    assert tokens.ids == [1]
    assert servicer.calls == 3


def test_resource_exhausted_without_retry_info_is_not_retried(refusing_server):
    servicer, target = refusing_server(refusals=1)
    with TextGenClient(target, timeout=30) as client, pytest.raises(grpc.RpcError) as error:
        client.tokenize("a")

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 1


def test_a_response_over_the_clients_size_limit_is_not_retried(refusing_server):
    servicer, target = refusing_server(refusals=0)
    options = [("grpc.max_receive_message_length", 1)]
    with TextGenClient(target, timeout=30, options=options) as client, pytest.raises(grpc.RpcError) as error:
        client.tokenize("a")

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # raised by gRPC, without RetryInfo
    assert servicer.calls == 1


def test_cli_prints_the_streamed_text(client, server):
    expected = client.generate(PROMPT, max_new_tokens=8, ignore_eos=False).text
    args = ["--target", server.target, "--stream", "--max-new-tokens", "8"]

    done = subprocess.run(
        [sys.executable, "-m", "client", PROMPT, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    assert "completion tokens" in done.stderr


def test_cli_reports_errors_with_their_code(server):
    done = subprocess.run(
        [sys.executable, "-m", "client", "", "--target", server.target],
        cwd=REPO,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "prompt" in done.stderr

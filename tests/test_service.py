"""The gRPC server end to end: a real engine on the tiny model, called over gRPC with the generated stubs."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.batching import BatchConfig
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc

SERVICE = "textgen.v1.TextGenerationService"


def greedy(
    prompt: str = "The capital of France is", max_new_tokens: int = 12, **fields
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True), **fields
    )


def test_generate_returns_text_tokens_usage_and_timing(stub):
    response = stub.Generate(greedy(max_new_tokens=12), timeout=30)

    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(response.tokens) == response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(
        stub.Tokenize(pb.TokenizeRequest(text="The capital of France is")).ids
    )
    assert response.text == "".join(t.text for t in response.tokens)
    assert all(t.logprob <= 0 for t in response.tokens)
    timing = response.timing
    total = timing.total_duration.ToNanoseconds()
    assert 0 <= timing.queue_duration.ToNanoseconds() <= timing.time_to_first_token.ToNanoseconds() <= total
    assert total > 0


def test_stream_text_concatenates_to_the_generate_text(stub):
    request = greedy(max_new_tokens=20)

    unary = stub.Generate(request, timeout=30)
    messages = list(stub.GenerateStream(request, timeout=30))

    assert "".join(m.text for m in messages) == unary.text
    assert [t.id for m in messages for t in m.tokens] == [t.id for t in unary.tokens]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert not any(m.HasField("usage") or m.HasField("timing") for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage == unary.usage
    assert last.HasField("timing")


def test_chat_input_is_rendered_with_the_chat_template(stub):
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="Hello there")])
    templated = list(stub.Tokenize(pb.TokenizeRequest(chat=chat)).ids)
    plain = list(stub.Tokenize(pb.TokenizeRequest(text="Hello there")).ids)

    response = stub.Generate(
        pb.GenerateRequest(chat=chat, stopping=pb.StoppingCriteria(max_new_tokens=4, ignore_eos=True)),
        timeout=30,
    )

    assert len(templated) > len(plain)
    assert any(templated[i : i + len(plain)] == plain for i in range(len(templated)))
    assert response.usage.prompt_tokens == len(templated)
    assert response.usage.completion_tokens == 4


def test_input_ids_are_passed_to_the_model_unchanged(stub):
    ids = list(stub.Tokenize(pb.TokenizeRequest(text="The capital of France is")).ids)

    stopping = pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True)
    by_ids = stub.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=ids), stopping=stopping), timeout=30)
    by_prompt = stub.Generate(greedy(max_new_tokens=8), timeout=30)

    assert by_ids.usage.prompt_tokens == len(ids)
    assert [t.id for t in by_ids.tokens] == [t.id for t in by_prompt.tokens]


def test_request_id_is_echoed_or_generated(stub):
    named = stub.Generate(greedy(max_new_tokens=2, request_id="my-request-1"), timeout=30)
    anonymous = list(stub.GenerateStream(greedy(max_new_tokens=3), timeout=30))

    assert named.request_id == "my-request-1"
    ids = {m.request_id for m in anonymous}
    assert len(ids) == 1 and ids != {""}


def test_stop_sequence_ends_the_output_before_the_match(stub):
    full = stub.Generate(greedy(max_new_tokens=24), timeout=30)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), f"the greedy output {full.text!r} has no usable stop sequence"

    request = greedy(max_new_tokens=24)
    request.stopping.stop_sequences.append(stop)
    stopped = stub.Generate(request, timeout=30)

    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert stop not in stopped.text
    assert full.text.startswith(stopped.text)


def test_seeded_sampling_is_reproducible(stub):
    request = greedy(max_new_tokens=10, sampling=pb.SamplingParameters(temperature=1.0, top_p=0.9, seed=1234))

    first = stub.Generate(request, timeout=30)
    second = stub.Generate(request, timeout=30)

    assert [t.id for t in first.tokens] == [t.id for t in second.tokens]


def test_model_info_describes_the_model_and_limits(stub, server):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

    assert info.model_name == server.engine.model_info.name
    assert info.max_context_length == 2048
    assert info.vocab_size == server.engine.model_info.vocab_size
    assert info.num_kv_blocks == server.engine.load.num_kv_blocks
    assert info.default_max_new_tokens == server.config.engine.default_max_new_tokens
    assert info.max_new_tokens_limit == server.config.engine.max_new_tokens_limit
    assert info.max_stop_sequences > 0 and info.max_stop_sequence_length > 0
    assert info.device == "cpu" and info.dtype == "float32"


def test_tokenize_returns_ids_and_pieces(stub):
    response = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)

    assert len(response.ids) == len(response.pieces) >= 2
    assert "".join(response.pieces) == "Hello world"


def test_health_is_serving_and_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_32_concurrent_streams_each_get_exactly_max_new_tokens(server):
    max_new_tokens = 16

    async def one(stub, i: int) -> tuple[int, pb.GenerateStreamResponse]:
        request = greedy(f"Story number {i}:", max_new_tokens=max_new_tokens)
        num_tokens, last = 0, None
        async for message in stub.GenerateStream(request, timeout=120):
            num_tokens += len(message.tokens)
            last = message
        return num_tokens, last

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        results = await asyncio.gather(*(one(stub, i) for i in range(32)))

    for num_tokens, last in results:
        assert num_tokens == max_new_tokens
        assert last.usage.completion_tokens == max_new_tokens
        assert last.finish_reason == pb.FINISH_REASON_LENGTH


async def test_higher_priority_requests_are_served_first_under_load(start_server):
    server = start_server(batch=BatchConfig(max_batch_size=1))
    done: list[str] = []

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        blocker = stub.GenerateStream(greedy(max_new_tokens=1500), timeout=120)
        await blocker.read()  # the blocker runs: everything below waits in the queue

        async def one(name: str, priority: int) -> None:
            await stub.Generate(greedy(max_new_tokens=4, priority=priority, request_id=name), timeout=120)
            done.append(name)

        # One at a time into the queue: requests sent together are tokenized on two threads, and which
        # reaches the engine first is a race; first come, first served is about arrival at the engine.
        tasks = []
        for name, priority in [(f"low-{i}", 0) for i in range(3)] + [(f"high-{i}", 10) for i in range(3)]:
            tasks.append(asyncio.create_task(one(name, priority)))
            queued = len(tasks)
            await _until(lambda queued=queued: server.engine.load.num_waiting == queued)
        blocker.cancel()  # frees the only batch slot: the queue drains in priority order
        await asyncio.gather(*tasks)

    assert done == ["high-0", "high-1", "high-2", "low-0", "low-1", "low-2"]


def test_engine_fault_fails_only_its_requests_and_the_server_keeps_serving(start_server, monkeypatch):
    server = start_server(max_queue_size=64)  # its own engine: the fault is injected into its model runner
    runner = server.engine.model_runner
    real_run = runner.run

    def broken_run(*args, **kwargs):
        raise RuntimeError("injected fault")

    with grpc.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        monkeypatch.setattr(runner, "run", broken_run)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Generate(greedy(max_new_tokens=4), timeout=30)
        monkeypatch.setattr(runner, "run", real_run)

        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert stub.Generate(greedy(max_new_tokens=4), timeout=30).usage.completion_tokens == 4
    assert server.engine.load.num_free_kv_blocks == server.engine.load.num_kv_blocks


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)

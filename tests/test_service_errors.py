"""Status codes: what the server answers to bad requests, overload, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from engine.batching import BatchConfig
from engine.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestCancelledError,
    RequestFailedError,
)
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.status import InvalidArgument, MalformedRequest, NotReady, PromptTooLong, to_status

PROMPT = "Once upon a time"


def request(**fields) -> pb.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    return pb.GenerateRequest(**fields)


def sampling(**fields) -> pb.GenerateRequest:
    return request(sampling=pb.SamplingParameters(**fields))


def stopping(**fields) -> pb.GenerateRequest:
    return request(stopping=pb.StoppingCriteria(**fields))


def status_details(error: grpc.RpcError, detail_type):
    """The details of `detail_type` in the google.rpc.Status the server attached to `error`."""
    status: status_pb2.Status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    found = []
    for any_detail in status.details:
        detail = detail_type()
        if any_detail.Unpack(detail):
            found.append(detail)
    return found


def violated_fields(error: grpc.RpcError) -> list[str]:
    (bad_request,) = status_details(error, error_details_pb2.BadRequest)
    return [v.field for v in bad_request.field_violations]


def error_reason(error: grpc.RpcError) -> str:
    (error_info,) = status_details(error, error_details_pb2.ErrorInfo)
    assert error_info.domain == "textgen.v1"
    return error_info.reason


INVALID_REQUESTS = {
    "no input": (pb.GenerateRequest(), "input"),
    "empty prompt": (request(prompt=""), "prompt"),
    "empty chat": (pb.GenerateRequest(chat=pb.ChatInput()), "chat.messages"),
    "empty input_ids": (pb.GenerateRequest(input_ids=pb.TokenIds()), "input_ids.ids"),
    "input id past the vocabulary": (
        pb.GenerateRequest(input_ids=pb.TokenIds(ids=[1, 10**6])),
        "input_ids.ids[1]",
    ),
    "temperature < 0": (sampling(temperature=-0.5), "sampling.temperature"),
    "top_p = 0": (sampling(top_p=0.0), "sampling.top_p"),
    "top_p > 1": (sampling(top_p=1.5), "sampling.top_p"),
    "top_k < 0": (sampling(top_k=-1), "sampling.top_k"),
    "min_p > 1": (sampling(min_p=1.5), "sampling.min_p"),
    "repetition_penalty = 0": (sampling(repetition_penalty=0.0), "sampling.repetition_penalty"),
    "frequency_penalty > 2": (sampling(frequency_penalty=2.5), "sampling.frequency_penalty"),
    "presence_penalty < -2": (sampling(presence_penalty=-3.0), "sampling.presence_penalty"),
    "too many stop sequences": (
        stopping(stop_sequences=[f"s{i}" for i in range(17)]),
        "stopping.stop_sequences",
    ),
    "stop sequence too long": (stopping(stop_sequences=["ok", "x" * 257]), "stopping.stop_sequences[1]"),
    "empty stop sequence": (stopping(stop_sequences=[""]), "stopping.stop_sequences[0]"),
    "max_new_tokens over the limit": (stopping(max_new_tokens=5000), "stopping.max_new_tokens"),
    "prompt + max_new_tokens over the context": (
        pb.GenerateRequest(
            input_ids=pb.TokenIds(ids=[7] * 2000), stopping=pb.StoppingCriteria(max_new_tokens=100)
        ),
        "stopping.max_new_tokens",
    ),
    "prompt fills the context": (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[7] * 2048)), "input_ids"),
    "request_id too long": (request(request_id="r" * 129), "request_id"),
    "top_logprobs > 20": (request(top_logprobs=21), "top_logprobs"),
}


@pytest.mark.parametrize("bad_request, field", INVALID_REQUESTS.values(), ids=INVALID_REQUESTS.keys())
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_invalid_request_is_invalid_argument_naming_the_field(stub, rpc, bad_request, field):
    with pytest.raises(grpc.RpcError) as error:
        response = getattr(stub, rpc)(bad_request, timeout=10)
        list(response) if rpc == "GenerateStream" else response

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(error.value)
    assert field in error.value.details()
    too_long = bad_request is INVALID_REQUESTS["prompt fills the context"][0]
    assert error_reason(error.value) == ("PROMPT_TOO_LONG" if too_long else "INVALID_ARGUMENT")


def test_every_invalid_field_is_reported_at_once(stub):
    bad = request(
        sampling=pb.SamplingParameters(temperature=-1, top_k=-1),
        stopping=pb.StoppingCriteria(max_new_tokens=10**6),
    )

    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(bad, timeout=10)

    assert violated_fields(error.value) == [
        "sampling.temperature",
        "sampling.top_k",
        "stopping.max_new_tokens",
    ]


FLOODS = {
    "1,000 empty stop sequences": (
        stopping(stop_sequences=[""] * 1000),
        ["stopping.stop_sequences", "stopping.stop_sequences[0]"],
    ),
    "200 chat messages without a role": (
        pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="", content="hi")] * 200)),
        ["chat.messages[0].role", "chat.messages[1].role"],
    ),
}


@pytest.mark.parametrize("bad_request, first_fields", FLOODS.values(), ids=FLOODS.keys())
def test_a_flood_of_violations_is_invalid_argument_with_ten_listed_and_the_rest_counted(
    stub, bad_request, first_fields
):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(bad_request, timeout=10)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (bad_request_detail,) = status_details(error.value, error_details_pb2.BadRequest)
    violations = bad_request_detail.field_violations
    assert len(violations) == 11
    assert [v.field for v in violations[:2]] == first_fields
    assert violations[-1].field == ""
    assert "more invalid fields" in violations[-1].description


def test_a_status_stays_under_8_kib_however_many_and_long_its_violations():
    status = to_status(InvalidArgument([("f" * 1000, "é" * 10_000)] * 1000))

    assert status.ByteSize() < 8 * 1024
    assert len(status.message.encode()) <= 512


C = code_pb2
STATUSES = {
    "invalid argument": (InvalidArgument([("prompt", "empty")]), C.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    "invalid request": (InvalidRequestError("sampling.top_p", "> 1"), C.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    "prompt too long": (PromptTooLong([("prompt", "too long")]), C.INVALID_ARGUMENT, "PROMPT_TOO_LONG"),
    "too many tokens": (PromptTooLongError("prompt_ids", "long"), C.INVALID_ARGUMENT, "PROMPT_TOO_LONG"),
    "malformed": (MalformedRequest("Wire format was corrupt"), C.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
    "queue full": (QueueFullError("full"), C.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
    "deadline": (DeadlineExceededError("late"), C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    "cancelled": (RequestCancelledError("cancelled"), C.CANCELLED, "CANCELLED"),
    "draining": (EngineStoppedError("draining"), C.UNAVAILABLE, "DRAINING"),
    "loading": (NotReady("loading"), C.UNAVAILABLE, "MODEL_LOADING"),
    "duplicate id": (DuplicateRequestError("dup"), C.ALREADY_EXISTS, "ALREADY_EXISTS"),
    "engine fault": (RequestFailedError("boom"), C.INTERNAL, "ENGINE_FAULT"),
    "unexpected": (RuntimeError("bug"), C.INTERNAL, "INTERNAL"),
}


@pytest.mark.parametrize("error, code, reason", STATUSES.values(), ids=STATUSES.keys())
def test_every_error_has_one_code_and_an_error_info_with_its_reason(error, code, reason):
    status = to_status(error)

    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert status.code == code
    assert [(info.reason, info.domain) for info in infos] == [(reason, "textgen.v1")]


def test_a_long_error_message_is_cut_short():
    status = to_status(RequestFailedError("x" * 100_000))

    assert status.message.startswith("xxx") and status.message.endswith("...")
    assert len(status.message.encode()) <= 512


def test_tokenize_without_input_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(pb.TokenizeRequest(), timeout=10)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(error.value) == ["input"]


async def test_full_queue_is_resource_exhausted_with_retry_info(start_server):
    server = start_server(batch=BatchConfig(max_batch_size=1), max_queue_size=1)
    long = request(stopping=pb.StoppingCriteria(max_new_tokens=64, ignore_eos=True))

    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        results = await asyncio.gather(
            *(stub.Generate(long, timeout=60) for _ in range(6)), return_exceptions=True
        )

    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert errors, "six requests on one slot and a queue of one: some must be refused"
    assert len(errors) < 6
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(error) == "QUEUE_FULL"
        (retry_info,) = status_details(error, error_details_pb2.RetryInfo)
        assert retry_info.retry_delay.ToNanoseconds() > 0
        pushback = dict(error.trailing_metadata())["grpc-retry-pushback-ms"]
        assert int(pushback) == retry_info.retry_delay.ToMilliseconds()
    assert all(r.usage.completion_tokens == 64 for r in results if not isinstance(r, grpc.RpcError))


def readme_service_config() -> str:
    """The gRPC service config (JSON) the README gives for clients with gRPC's built-in retries."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (config,) = re.findall(r"```json\n(.*?)```", readme, re.DOTALL)
    return json.dumps(json.loads(config))


def test_the_readmes_retry_policy_waits_out_a_full_queue_as_pushed_back(server, monkeypatch):
    submit, attempts = server.engine.submit, []

    def full_twice(request, max_new_tokens):
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            raise QueueFullError("the queue is full", retry_after_s=0.3)
        return submit(request, max_new_tokens)

    monkeypatch.setattr(server.engine, "submit", full_twice)
    options = [("grpc.service_config", readme_service_config()), ("grpc.enable_retries", 1)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        response = stub.Generate(request(stopping=pb.StoppingCriteria(max_new_tokens=2)), timeout=30)

    assert response.usage.completion_tokens == 2
    assert len(attempts) == 3
    assert all(later - earlier >= 0.3 for earlier, later in itertools.pairwise(attempts))


def test_deadline_exceeded_ends_the_request_and_frees_its_kv_blocks(stub, server, wait_until_idle):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(
            request(stopping=pb.StoppingCriteria(max_new_tokens=1900, ignore_eos=True)), timeout=0.5
        )

    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(server.engine)


def test_cancelling_a_stream_ends_the_request_and_frees_its_kv_blocks(stub, server, wait_until_idle):
    call = stub.GenerateStream(
        request(stopping=pb.StoppingCriteria(max_new_tokens=1900, ignore_eos=True)), timeout=60
    )
    for _ in range(3):
        next(call)
    assert server.engine.load.num_free_kv_blocks < server.engine.load.num_kv_blocks

    call.cancel()

    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    wait_until_idle(server.engine)


def test_a_request_id_in_flight_cannot_be_reused(stub):
    first = stub.GenerateStream(
        request(request_id="dup", stopping=pb.StoppingCriteria(max_new_tokens=1000, ignore_eos=True)),
        timeout=60,
    )
    next(first)

    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request(request_id="dup"), timeout=10)
    first.cancel()

    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error.value) == "ALREADY_EXISTS"


def test_unavailable_and_not_serving_until_the_model_is_loaded(unloaded_server):
    with grpc.insecure_channel(unloaded_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as error:
            textgen_pb2_grpc.TextGenerationServiceStub(channel).Generate(request(), timeout=5)

    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(error.value) == "MODEL_LOADING"

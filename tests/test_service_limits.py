"""Limits before work: message, metadata and input sizes, malformed bytes, connection age, a free loop."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.config import MIN_CLIENT_PING_INTERVAL_S, ServerConfig, grpc_server_options
from tests.conftest import ServerThread

SERVICE = "/textgen.v1.TextGenerationService/"
SMALL = dict(max_request_bytes=64 * 1024, max_metadata_bytes=2 * 1024)
SMALL_INPUTS = dict(max_prompt_chars=1000, max_chat_messages=4)


def error_reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason the server attached to `error`."""
    infos = []
    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    (info,) = infos
    assert info.domain == "textgen.v1"
    return info.reason


def violated_fields(error: grpc.RpcError) -> list[str]:
    for detail in rpc_status.from_call(error).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return [v.field for v in bad_request.field_violations]
    raise AssertionError("no BadRequest in the status")


@pytest.fixture(scope="module")
def small_server(server_config):
    """A server with small message, metadata and input limits."""
    config = dataclasses.replace(server_config(**SMALL_INPUTS), **SMALL)
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_stub(small_server):
    with grpc.insecure_channel(small_server.target) as channel:
        yield textgen_pb2_grpc.TextGenerationServiceStub(channel)


def health_check(channel: grpc.Channel, timeout: float = 10) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


# ---- message and metadata sizes ---------------------------------------------------------------------------


def test_a_message_over_max_request_bytes_is_resource_exhausted_and_the_server_stays_up(
    small_server, small_stub
):
    with pytest.raises(grpc.RpcError) as error:
        small_stub.Generate(pb.GenerateRequest(prompt="x" * (SMALL["max_request_bytes"] + 1)), timeout=10)

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_name


def test_the_default_request_limit_refuses_five_mib(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(pb.TokenizeRequest(text="x" * (5 * 1024 * 1024)), timeout=30)

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Tokenize(pb.TokenizeRequest(text="hello"), timeout=10).ids


def test_metadata_over_max_metadata_bytes_is_resource_exhausted(small_stub):
    big = (("x-padding", "p" * SMALL["max_metadata_bytes"]),)

    with pytest.raises(grpc.RpcError) as error:
        small_stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=big, timeout=10)

    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small_stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("x-small", "p" * 512),), timeout=10)


def test_model_info_reports_the_limits_a_client_needs(small_stub):
    info = small_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

    assert info.max_prompt_chars == SMALL_INPUTS["max_prompt_chars"]
    assert info.max_chat_messages == SMALL_INPUTS["max_chat_messages"]
    assert info.max_request_bytes == SMALL["max_request_bytes"]
    assert info.max_metadata_bytes == SMALL["max_metadata_bytes"]
    assert info.min_keepalive_time.ToSeconds() == MIN_CLIENT_PING_INTERVAL_S


# ---- input sizes, before tokenizing ---------------------------------------------------------------------


TOO_LONG = {
    "prompt": ("Generate", pb.GenerateRequest(prompt="x" * 1001), "prompt"),
    "chat characters": (
        "Generate",
        pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x" * 997)])),
        "chat.messages",
    ),
    "chat messages": (
        "GenerateStream",
        pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="hi")] * 5)),
        "chat.messages",
    ),
    "tokenize text": ("Tokenize", pb.TokenizeRequest(text="x" * 1001), "text"),
    "tokenize chat": (
        "Tokenize",
        pb.TokenizeRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x" * 1000)])),
        "chat.messages",
    ),
}


@pytest.mark.parametrize("rpc, request_, field", TOO_LONG.values(), ids=TOO_LONG.keys())
def test_an_input_over_its_size_limit_is_prompt_too_long_and_never_tokenized(
    small_server, small_stub, monkeypatch, rpc, request_, field
):
    engine = small_server.engine
    for name in ("tokenize", "apply_chat_template"):
        monkeypatch.setattr(engine, name, lambda *_: pytest.fail("tokenized an input over its limit"))

    with pytest.raises(grpc.RpcError) as error:
        response = getattr(small_stub, rpc)(request_, timeout=10)
        list(response) if rpc == "GenerateStream" else response

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "PROMPT_TOO_LONG"
    assert violated_fields(error.value) == [field]


def test_an_input_at_its_size_limit_is_served(small_stub):
    response = small_stub.Generate(
        pb.GenerateRequest(prompt="x" * 1000, stopping=pb.StoppingCriteria(max_new_tokens=1)), timeout=30
    )

    assert response.usage.completion_tokens == 1


def test_a_prompt_over_the_context_after_tokenizing_is_prompt_too_long(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(prompt="hello " * 3000), timeout=30)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "PROMPT_TOO_LONG"
    assert violated_fields(error.value) == ["prompt"]


# ---- malformed request bytes ----------------------------------------------------------------------------

MALFORMED = {"truncated": "120b6865", "not UTF-8": "1207fffec0af68656c6c6f"}
METHODS = {"Generate": "unary", "GenerateStream": "stream", "GetModelInfo": "unary", "Tokenize": "unary"}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("method, kind", METHODS.items(), ids=METHODS.keys())
def test_malformed_request_bytes_are_invalid_argument_with_one_log_line(
    server, caplog, method, kind, payload
):
    with grpc.insecure_channel(server.target) as channel:
        make_call = channel.unary_stream if kind == "stream" else channel.unary_unary
        call = make_call(SERVICE + method, request_serializer=None, response_deserializer=None)
        with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as error:
            response = call(bytes.fromhex(payload), timeout=10)
            list(response) if kind == "stream" else response

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "MALFORMED_REQUEST"
    assert "Error parsing message" in error.value.details()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["service.handlers"]
    assert warnings[0].exc_info is None and "\n" not in warnings[0].getMessage()


def test_a_malformed_request_does_not_disturb_the_next_one(stub, server):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary(SERVICE + "Tokenize", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError):
            raw(bytes.fromhex(MALFORMED["truncated"]), timeout=10)

    assert stub.Tokenize(pb.TokenizeRequest(text="hello"), timeout=10).ids


# ---- the event loop stays free while prompts are tokenized ------------------------------------------------


def test_a_health_check_answers_while_a_prompt_is_being_tokenized(server, monkeypatch):
    started, release = threading.Event(), threading.Event()
    tokenize = server.engine.tokenize

    def held_tokenize(text: str, add_special_tokens: bool = False) -> list[int]:
        started.set()
        release.wait(30)
        return tokenize(text, add_special_tokens)

    monkeypatch.setattr(server.engine, "tokenize", held_tokenize)
    with grpc.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        call = stub.Tokenize.future(pb.TokenizeRequest(text="hello"), timeout=60)
        try:
            assert started.wait(30)
            status = health_check(channel)  # on the event loop's thread, tokenizing would hold it: timeout
        finally:
            release.set()
        assert call.result().ids

    assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_health_check_answers_before_a_large_prompt_is_tokenized(start_server, monkeypatch):
    server = start_server(max_prompt_chars=4_000_000)
    started, times = threading.Event(), {}
    tokenize = server.engine.tokenize

    def timed_tokenize(text: str, add_special_tokens: bool = False) -> list[int]:
        started.set()
        ids = tokenize(text, add_special_tokens)
        times["tokenized"] = time.monotonic()
        return ids

    monkeypatch.setattr(server.engine, "tokenize", timed_tokenize)
    prompt = ("The quick brown fox jumps over the lazy dog. " * 80_000)[:3_400_000]  # ~2 s to tokenize
    with grpc.insecure_channel(server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        call = stub.Generate.future(pb.GenerateRequest(prompt=prompt), timeout=120)
        assert started.wait(60)
        health_check(channel)
        answered = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            call.result()

    assert answered < times["tokenized"]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # 755k tokens: over the context


# ---- connections ----------------------------------------------------------------------------------------


def test_a_call_outliving_its_connections_max_age_finishes_within_the_grace(server_config, monkeypatch):
    config = dataclasses.replace(server_config(), max_connection_age_s=0.5, max_connection_age_grace_s=60)
    server = ServerThread(config).start()
    release = threading.Event()
    tokenize = server.engine.tokenize

    def held_tokenize(text: str, add_special_tokens: bool = False) -> list[int]:
        release.wait(30)
        return tokenize(text, add_special_tokens)

    monkeypatch.setattr(server.engine, "tokenize", held_tokenize)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
            call = stub.Generate.future(
                pb.GenerateRequest(prompt="hello", stopping=pb.StoppingCriteria(max_new_tokens=4)), timeout=60
            )
            time.sleep(2)  # four times the connection's age (+-10%): its GOAWAY has been sent
            release.set()
            assert call.result().usage.completion_tokens == 4
            assert stub.Tokenize(pb.TokenizeRequest(text="hello"), timeout=10).ids  # on a new connection
    finally:
        release.set()
        server.stop()


def test_connection_age_zero_sets_no_age():
    options = dict(grpc_server_options(ServerConfig(max_connection_age_s=0)))

    assert "grpc.max_connection_age_ms" not in options
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_the_connection_grace_outlasts_its_age_by_default():
    options = dict(grpc_server_options(ServerConfig()))

    assert options["grpc.max_connection_age_grace_ms"] > options["grpc.max_connection_age_ms"]
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == MIN_CLIENT_PING_INTERVAL_S * 1000

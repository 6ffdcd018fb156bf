"""Bad input on the OpenAI HTTP front is a 400 with OpenAI's error body (naming the parameter where there
is one), never a 500 or a traceback in the log: bad Unicode, deep nesting, JSON constants; sampling
extremes follow the engine's one rule (as on gRPC); an answer built whole is bounded at admission."""

from __future__ import annotations

import dataclasses
import json
import logging

import aiohttp
import grpc
import pytest
from conftest import ServerThread

from engine.frontend.limits import MAX_ANSWER_ENTRIES
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.openai.json_body import MAX_JSON_DEPTH

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def http_server(server_config):
    server = ServerThread(dataclasses.replace(server_config(), http_port=0)).start()
    yield server
    server.stop()


async def post(server: ServerThread, path: str, data: bytes) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{server.server.http.port}{path}"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


def nested(depth: int) -> bytes:
    return b'{"prompt": "hi", "stop": ' + b"[" * depth + b"]" * depth + b"}"


# (path, raw body, the error's code, its param)
MALFORMED = {
    "a lone surrogate as a parameter name": (
        COMPLETIONS,
        rb'{"prompt": "hi", "\ud800": 1}',
        "invalid_argument",
        "\\ud800",
    ),
    "a lone surrogate in the prompt": (COMPLETIONS, rb'{"prompt": "\ud800"}', "invalid_argument", "prompt"),
    "a lone surrogate in a message": (
        CHAT,
        rb'{"messages": [{"role": "user", "content": "a\udfffb"}]}',
        "invalid_argument",
        "messages[0].content",
    ),
    "a lone surrogate in a stop sequence": (
        COMPLETIONS,
        rb'{"prompt": "hi", "stop": ["\ud83d"]}',
        "invalid_argument",
        "stop[0]",
    ),
    "nested 5,000 deep": (COMPLETIONS, nested(5000), "malformed_request", None),
    "nested past the depth limit": (
        COMPLETIONS,
        nested(MAX_JSON_DEPTH + 1),
        "invalid_argument",
        "stop" + "[0]" * (MAX_JSON_DEPTH - 1),
    ),
    "NaN": (COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', "malformed_request", None),
    "Infinity": (COMPLETIONS, b'{"prompt": "hi", "top_p": -Infinity}', "malformed_request", None),
    "not UTF-8": (COMPLETIONS, b'{"prompt": "\xff"}', "malformed_request", None),
}


@pytest.mark.parametrize("path, body, code, param", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_body_is_400_naming_the_parameter_without_a_traceback(
    http_server, caplog, path, body, code, param
):
    with caplog.at_level(logging.WARNING):
        status, answer = await post(http_server, path, body)

    assert status == 400
    assert (answer["error"]["code"], answer["error"]["param"]) == (code, param)
    assert answer["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
async def test_a_vanishing_temperature_or_top_p_is_greedy_not_a_fault(http_server, field):
    greedy = {"prompt": "hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    vanishing = {**greedy, "temperature": 1.0, field: 1e-50}  # top_p: only the most likely token is left

    status, answer = await post(http_server, COMPLETIONS, json.dumps(vanishing).encode())
    _, expected = await post(http_server, COMPLETIONS, json.dumps(greedy).encode())

    assert status == 200
    assert answer["choices"][0]["text"] == expected["choices"][0]["text"]


# 16 completions x 2047 tokens x (1 + 20 alternatives): 688k entries, some 21 MB of JSON built at once.
HUGE_ANSWER = {"prompt": "hi", "n": 16, "max_tokens": 2047, "logprobs": 20}


async def test_an_answer_over_the_entry_budget_is_400_before_any_token_is_generated(http_server):
    status, answer = await post(http_server, COMPLETIONS, json.dumps(HUGE_ANSWER).encode())

    assert status == 400
    assert (answer["error"]["code"], answer["error"]["param"]) == ("invalid_argument", "logprobs")
    assert str(MAX_ANSWER_ENTRIES) in answer["error"]["message"]
    assert http_server.engine.load.num_running == 0 and http_server.engine.load.num_waiting == 0


async def test_the_same_answer_streamed_is_served_since_nothing_is_held(http_server, wait_until_idle):
    url = f"http://127.0.0.1:{http_server.server.http.port}{COMPLETIONS}"
    body = {**HUGE_ANSWER, "stream": True}
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        first = await response.content.readuntil(b"\n\n")  # then the client goes away: cancelled

    assert response.status == 200
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["logprobs"]
    wait_until_idle(http_server.engine)  # the client went away: its 16 completions were cancelled


def test_over_grpc_a_unary_answer_over_the_entry_budget_is_invalid_argument(http_server):
    request = pb.GenerateRequest(
        prompt="hi", n=16, top_logprobs=20, stopping=pb.StoppingCriteria(max_new_tokens=2047)
    )
    with grpc.insecure_channel(http_server.target) as channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, timeout=30)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_logprobs" in error.value.details()

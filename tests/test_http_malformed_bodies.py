"""Malformed bodies on the OpenAI HTTP front are each a 400 with OpenAI's error body (naming the parameter
where there is one), never a 500 or a traceback in the log: bad Unicode, deep nesting, JSON constants,
sampling extremes (which follow the engine's one rule, as on gRPC)."""

from __future__ import annotations

import dataclasses
import json
import logging

import aiohttp
import pytest
from conftest import ServerThread

from service.json_body import MAX_JSON_DEPTH

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

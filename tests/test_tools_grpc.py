"""Tools and reasoning on textgen.v1: tools in `ChatInput`, calls in the responses, on the tiny random-weight
model (whose calls are valid only because the grammar makes them so)."""

from __future__ import annotations

import dataclasses
import json

import grpc
import jsonschema
import pytest
from conftest import ServerThread
from test_service_errors import violated_fields

from engine.frontend.admission import Prompt, prompt_ids
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.chat.tools import ChatTurn, Conversation, Tool, ToolCall, ToolRequest

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = pb.Tool(name="get_weather", description="The weather in a city", parameters=json.dumps(PARAMETERS))
TIME = pb.Tool(name="get_time", description="The time now")
ASK = pb.ChatMessage(role="user", content="Weather in Paris?")
REQUIRED = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)


def chat_request(
    *, tools=(WEATHER, TIME), tool_choice=REQUIRED, parallel=False, **fields
) -> pb.GenerateRequest:
    chat = pb.ChatInput(messages=[ASK], tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel)
    return pb.GenerateRequest(
        chat=chat,
        sampling=pb.SamplingParameters(temperature=1.0, seed=3),
        stopping=pb.StoppingCriteria(max_new_tokens=120),
        **fields,
    )


def assert_valid(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.name in names and call.id.startswith("call_")
        schema = PARAMETERS if call.name == "get_weather" else {"additionalProperties": False}
        jsonschema.validate(json.loads(call.arguments), schema)


def test_required_calls_come_back_as_tool_calls_and_the_text_is_the_content(stub):
    response = stub.Generate(chat_request())

    assert_valid(response.tool_calls, {"get_weather", "get_time"})
    assert len(response.tool_calls) == 1
    assert response.text == ""
    assert list(response.completions[0].tool_calls) == list(response.tool_calls)
    assert response.finish_reason == pb.FINISH_REASON_EOS


def test_a_named_function_is_called(stub):
    response = stub.Generate(chat_request(tool_choice=pb.ToolChoice(function="get_weather")))

    assert_valid(response.tool_calls, {"get_weather"})


def test_streamed_calls_come_whole_and_equal_the_unstreamed(stub):
    whole = stub.Generate(chat_request())

    messages = list(stub.GenerateStream(chat_request()))

    calls = [call for m in messages for call in m.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert "".join(m.text for m in messages) == whole.text


def test_tool_choice_none_is_plain_text(stub):
    response = stub.Generate(chat_request(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)))

    assert not response.tool_calls and response.text


def test_tokenize_renders_a_tool_round_trip_as_generate_does(stub, server):
    call = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris","days":1}')
    chat = pb.ChatInput(
        messages=[
            ASK,
            pb.ChatMessage(role="assistant", tool_calls=[call]),
            pb.ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ],
        tools=[WEATHER],
    )

    ids = stub.Tokenize(pb.TokenizeRequest(chat=chat)).ids

    turns = [
        ChatTurn("user", ASK.content),
        ChatTurn("assistant", "", (ToolCall("call_1", "get_weather", call.arguments),)),
        ChatTurn("tool", "sunny", tool_call_id="call_1"),
    ]
    tools = ToolRequest((Tool("get_weather", WEATHER.description, PARAMETERS),))
    assert list(ids) == prompt_ids(server.engine, Prompt(chat=Conversation(turns, tools)))
    assert "<tool_response>\nsunny\n</tool_response>" in server.engine.decode(list(ids))


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tools": [pb.Tool(name="a b")]}, "chat.tools[0].name"),
        ({"tools": [pb.Tool(name="f", parameters="{nope")]}, "chat.tools[0].parameters"),
        ({"tools": [WEATHER, WEATHER]}, "chat.tools"),
        ({"tool_choice": pb.ToolChoice(function="nope")}, "chat.tool_choice.function"),
        ({"tools": [], "tool_choice": REQUIRED}, "chat.tool_choice"),
        ({"response_format": pb.ResponseFormat(regex="a+")}, "chat.tools"),
        ({"tools": [pb.Tool(name="f", parameters='{"type": "nonsense"}')]}, "chat.tools"),
    ],
)
def test_bad_tools_are_invalid_argument_naming_the_field(stub, request_fields, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(chat_request(**request_fields))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(error.value)


@pytest.fixture(scope="module")
def reasoning_stub(server_config):
    server = ServerThread(dataclasses.replace(server_config(), reasoning_parser="think")).start()
    with grpc.insecure_channel(server.target) as channel:
        yield textgen_pb2_grpc.TextGenerationServiceStub(channel)
    server.stop()


def test_reasoning_is_apart_from_the_text_streamed_or_not(reasoning_stub):
    request = pb.GenerateRequest(
        chat=pb.ChatInput(messages=[ASK]),
        sampling=pb.SamplingParameters(temperature=1.0, seed=1),
        stopping=pb.StoppingCriteria(max_new_tokens=60),
        response_format=pb.ResponseFormat(regex="<think>[a-z]{1,12}</think>[a-z]{1,12}"),
    )

    response = reasoning_stub.Generate(request)
    messages = list(reasoning_stub.GenerateStream(request))

    assert response.reasoning.isalpha() and response.text.isalpha()
    assert "".join(m.reasoning for m in messages) == response.reasoning
    assert "".join(m.text for m in messages) == response.text

"""Tools and reasoning on /v1/chat/completions, through the official `openai` client and LangChain's
`ChatOpenAI`, on the tiny random-weight model: its calls are valid only because the grammar makes them so."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from conftest import base_url, start_http_server
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic import BaseModel, ConfigDict, Field
from test_openai_http import assert_openai_error, post

from engine.frontend.admission import Prompt, prompt_ids
from service.chat.tools import ChatTurn, Conversation, Tool, ToolCall, ToolRequest
from service.config import parse_config

WEATHER_PARAMETERS = {  # bounded, so that even the random-weight model completes a call well within budget
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
SCHEMAS = {
    "get_weather": WEATHER_PARAMETERS,
    "get_time": {"type": "object", "properties": {}, "additionalProperties": False},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"max_tokens": 120, "seed": 5}


def assert_valid_calls(tool_calls, names: set[str]) -> None:
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(stream) -> tuple[str, dict[int, dict], list[str | None]]:
    """Content, calls (index -> id, name, arguments) and finish reasons, assembled from the chunks."""
    content, calls, finish_reasons = "", {}, []
    for chunk in stream:
        choice = chunk.choices[0]
        finish_reasons.append(choice.finish_reason)
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.id is not None:
                assert call.index not in calls and call.type == "function"
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            calls[call.index]["arguments"] += call.function.arguments or ""
    return content, calls, finish_reasons


# ---- the official client ---------------------------------------------------------------------------------


def test_required_returns_calls_whose_arguments_validate(client, model):
    completion = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        **CALL,
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_a_streamed_call_is_the_unstreamed_call_in_fragments(client, model):
    request = dict(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False
    )

    whole = client.chat.completions.create(**request, **CALL).choices[0].message.tool_calls[0]
    content, calls, finish_reasons = collect_stream(
        client.chat.completions.create(**request, **CALL, stream=True)
    )

    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (whole.function.name, whole.function.arguments)
    ]
    assert finish_reasons[-1] == "tool_calls" and set(finish_reasons[:-1]) == {None}


def test_a_named_function_is_the_function_called(client, model):
    named = {"type": "function", "function": {"name": "get_time"}}

    completion = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=named, **CALL
    )

    calls = completion.choices[0].message.tool_calls
    assert_valid_calls(calls, {"get_time"})


def test_parallel_calls_are_indexed_in_the_stream_and_each_validates(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        stream=True,
        max_tokens=300,
        seed=2,
    )

    _, calls, finish_reasons = collect_stream(stream)

    assert list(calls) == list(range(len(calls)))
    complete = list(calls.values()) if finish_reasons[-1] == "tool_calls" else list(calls.values())[:-1]
    assert complete  # a call cut off by max_tokens is the last one, and only then
    for call in complete:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_tool_choice_none_answers_in_text(client, model):
    completion = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )

    choice = completion.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_auto_answers_in_text_or_valid_calls(client, model):
    for seed in range(3):
        completion = client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=24, seed=seed
        )
        choice = completion.choices[0]
        if choice.message.tool_calls:
            assert_valid_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        else:
            assert choice.message.content is not None and choice.finish_reason in ("stop", "length")


def test_a_tool_round_trip_renders_the_call_and_its_result_into_the_next_prompt(client, model, http_server):
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, **CALL
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]

    answer = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], max_tokens=8, seed=1
    )

    turns = [
        ChatTurn("user", ASK[0]["content"]),
        ChatTurn("assistant", "", (ToolCall(call.id, call.function.name, call.function.arguments),)),
        ChatTurn("tool", "sunny, 21 C", tool_call_id=call.id),
    ]
    tools = ToolRequest((Tool("get_weather", "The weather in a city", WEATHER_PARAMETERS),))
    ids = prompt_ids(http_server.engine, Prompt(chat=Conversation(turns, tools)))
    prompt = http_server.engine.decode(ids, skip_special_tokens=False)
    assert answer.usage.prompt_tokens == len(ids)
    arguments = json.dumps(json.loads(call.function.arguments))
    assert f'<tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert answer.choices[0].message.content is not None or answer.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            "tools",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "x"}]}]}, "messages[0].tool_calls[0]"),
    ],
)
async def test_bad_tools_are_400_naming_the_parameter(http_server, fields, param):
    body = {"messages": ASK, **fields}

    status, answer, _ = await post(base_url(http_server) + "/v1/chat/completions", body)

    assert status == 400
    assert_openai_error(answer, "invalid_argument", param)


# ---- LangChain -----------------------------------------------------------------------------------------


@tool
def get_weather(city: Annotated[str, Field(max_length=8)], unit: Literal["c", "f"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Pet(BaseModel):
    """A pet."""

    model_config = ConfigDict(extra="forbid")  # no other keys: the random-weight model may not wander

    name: str = Field(max_length=6)
    legs: Literal[2, 4]


@pytest.fixture(scope="module")
def chat_model(http_server, model):
    return ChatOpenAI(
        base_url=base_url(http_server) + "/v1",
        api_key="unused",
        model=model,
        max_tokens=120,
        seed=5,
        max_retries=0,
    )


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_langchain_bind_tools_gets_calls_with_parsed_arguments(chat_model, tool_choice):
    message = chat_model.bind_tools([get_weather], tool_choice=tool_choice).invoke("Weather in Paris?")

    assert message.tool_calls and {c["name"] for c in message.tool_calls} == {"get_weather"}
    for call in message.tool_calls:
        jsonschema.validate(call["args"], get_weather.tool_call_schema.model_json_schema())
    assert not message.invalid_tool_calls


def test_langchain_streams_tool_call_chunks_into_the_same_calls(chat_model):
    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)

    streamed = None
    for chunk in bound.stream("Weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    whole = bound.invoke("Weather in Paris?")

    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [
        (c["name"], c["args"]) for c in whole.tool_calls
    ]
    assert len(streamed.tool_calls) == 1


def test_langchain_tool_round_trip(chat_model):
    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    history = [HumanMessage("Weather in Paris?")]
    call_message = bound.invoke(history)
    history += [
        call_message,
        ToolMessage(
            get_weather.invoke(call_message.tool_calls[0]), tool_call_id=call_message.tool_calls[0]["id"]
        ),
    ]

    answer = chat_model.bind_tools([get_weather]).invoke(history)

    assert answer.content or answer.tool_calls


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output_is_a_valid_instance(chat_model, method):
    pet = chat_model.with_structured_output(Pet, method=method).invoke("Describe a pet.")

    assert isinstance(pet, Pet)


# ---- reasoning ---------------------------------------------------------------------------------------------

THINKING = {"guided_regex": "<think>[a-z]{1,12}</think>[a-z]{1,12}"}  # what a reasoning model writes


@pytest.fixture(scope="module")
def reasoning_client(server_config):
    server = start_http_server(server_config, reasoning_parser="think")
    with openai.OpenAI(base_url=base_url(server) + "/v1", api_key="unused", max_retries=0) as client:
        yield client, server.engine.model_info.name
    server.stop()


def test_a_think_block_is_reasoning_content(reasoning_client):
    client, model = reasoning_client

    completion = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=60, seed=1, extra_body=THINKING
    )

    message = completion.choices[0].message
    assert message.model_extra["reasoning_content"].isalpha()
    assert message.content.isalpha()
    assert completion.choices[0].finish_reason == "stop"


def test_streamed_reasoning_deltas_join_to_the_unstreamed_split(reasoning_client):
    client, model = reasoning_client
    request = dict(model=model, messages=ASK, max_tokens=60, seed=1, extra_body=THINKING)

    message = client.chat.completions.create(**request).choices[0].message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""

    assert (reasoning, content) == (message.model_extra["reasoning_content"], message.content)


def test_without_the_parser_the_think_block_is_content(client, model):
    completion = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=60, seed=1, extra_body=THINKING
    )

    message = completion.choices[0].message
    assert message.content.startswith("<think>")
    assert "reasoning_content" not in (message.model_extra or {})


def test_the_reasoning_parser_flag_and_its_environment_variable(monkeypatch):
    assert parse_config([]).reasoning_parser == "none"
    assert parse_config(["--reasoning-parser", "think"]).reasoning_parser == "think"
    monkeypatch.setenv("TEXTGEN_REASONING_PARSER", "think")
    assert parse_config([]).reasoning_parser == "think"
    monkeypatch.setenv("TEXTGEN_REASONING_PARSER", "deepseek")
    with pytest.raises(SystemExit):
        parse_config([])


# ---- the OpenAI Agents SDK -------------------------------------------------------------------------------


@function_tool
def weather_in(city: Annotated[str, Field(max_length=8)], unit: Literal["c", "f"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def weather_agent(http_server, model):
    set_tracing_disabled(True)  # the SDK's tracing would upload to OpenAI
    client = AsyncOpenAI(base_url=base_url(http_server) + "/v1", api_key="unused", max_retries=0)
    return Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        tools=[weather_in],
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=120),
        tool_use_behavior="stop_on_first_tool",  # the tool's answer is the agent's
    )


def test_an_agents_sdk_agent_calls_its_tool_with_valid_arguments(weather_agent):
    result = Runner.run_sync(weather_agent, "Weather in Paris?")

    assert result.final_output.startswith("sunny in ")


async def test_a_streamed_agents_sdk_run_calls_its_tool(weather_agent):
    result = Runner.run_streamed(weather_agent, "Weather in Paris?")
    kinds = [event.type async for event in result.stream_events()]

    assert "raw_response_event" in kinds
    assert result.final_output.startswith("sunny in ")

"""Tool calls and reasoning without a server: the call grammar (llguidance), the streaming parsers and the
chat rendered for templates with and without a tool format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.frontend.admission import Prompt, prompt_ids
from engine.request import ResponseFormat
from service.chat.output import ChatOutput
from service.chat.reasoning import ReasoningSplitter
from service.chat.tool_calls import ToolCallParser, grammar, parse_all
from service.chat.tools import ChatTurn, Conversation, Tool, ToolCall, ToolRequest, template_inputs

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
)
TIME = Tool("get_time", "The time now")
CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris \\"}{","days":2}}</tool_call>'
TEXT_AND_CALLS = f"Let me look.\n{CALL}\n" + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def chunked(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ---- the grammar -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_grammar(tiny_engine):
    return lambda tools: tiny_engine.grammars.compile(ResponseFormat(lark=grammar(tools))).deep_copy()


def consumes(matcher, tokenizer, text: str) -> bool:
    return all(matcher.consume_token(i) for i in tokenizer(text, add_special_tokens=False).input_ids)


def test_auto_allows_any_text_and_the_end_without_a_call(compile_grammar, tiny_engine):
    matcher = compile_grammar(ToolRequest((WEATHER, TIME)))

    assert consumes(matcher, tiny_engine.tokenizer, "Any answer at all, {json} or <tool_use> included.")
    assert matcher.is_accepting()


def test_auto_constrains_a_call_from_the_moment_the_model_opens_one(compile_grammar, tiny_engine):
    valid, invalid = (
        compile_grammar(ToolRequest((WEATHER, TIME))),
        compile_grammar(ToolRequest((WEATHER, TIME))),
    )

    assert consumes(valid, tiny_engine.tokenizer, TEXT_AND_CALLS.replace('": ', '":').replace(", ", ","))
    assert valid.is_accepting()
    assert not consumes(invalid, tiny_engine.tokenizer, 'Let me look. <tool_call>{"name":"get_wether"')


@pytest.mark.parametrize(
    "text",
    [
        "Sure: " + CALL,  # text before a required call
        CALL.replace('"days":2', '"days":"2"'),  # an argument of the wrong type
        CALL.replace(',"days":2', ""),  # a required argument missing
        CALL.replace('{"name"', '{ "name"'),  # whitespace: compact JSON only
    ],
)
def test_required_refuses_anything_but_valid_calls(compile_grammar, tiny_engine, text):
    matcher = compile_grammar(ToolRequest((WEATHER, TIME), "required"))

    assert not consumes(matcher, tiny_engine.tokenizer, text)


def test_a_named_function_is_the_only_one_callable_and_once_without_parallel_calls(
    compile_grammar, tiny_engine
):
    tools = ToolRequest((WEATHER, TIME), "function", "get_time", parallel=False)
    matcher, other = compile_grammar(tools), compile_grammar(tools)

    assert consumes(
        matcher, tiny_engine.tokenizer, '<tool_call>{"name":"get_time","arguments":{}}</tool_call>'
    )
    assert matcher.is_accepting()
    assert not consumes(matcher, tiny_engine.tokenizer, "\n<tool_call>")
    assert not consumes(other, tiny_engine.tokenizer, CALL)


# ---- the parser --------------------------------------------------------------------------------------------


def stream_parse(tools: ToolRequest, pieces: list[str]) -> tuple[str, dict[int, dict]]:
    """The content and the calls (index -> id, name, arguments) a client assembles from the deltas."""
    output, content, calls = ChatOutput(tools, reasoning=False), "", {}
    for i, piece in enumerate(pieces):
        delta = output.delta(piece, last=i == len(pieces) - 1)
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] not in calls and call["type"] == "function"
                calls[call["index"]] = {"id": call["id"], "name": call["function"]["name"], "arguments": ""}
            calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return content, calls


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=12))
def test_streamed_calls_are_the_same_however_the_text_is_cut(cuts):
    tools = ToolRequest((WEATHER, TIME))

    content, calls = stream_parse(tools, chunked(TEXT_AND_CALLS, cuts))

    assert content == "Let me look.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": 'Paris "}{', "days": 2}),
        ("get_time", {}),
    ]
    assert len({c["id"] for c in calls.values()}) == 2


def test_text_that_only_looks_like_a_tag_is_content():
    parser = ToolCallParser(ToolRequest((WEATHER,)))

    held = parser.feed("a <tool")
    rest = parser.feed("box> b <")
    end = parser.finish()

    assert (held.content, rest.content, end.content) == ("a ", "<toolbox> b ", "<")
    assert parser.calls == []


@pytest.mark.parametrize(
    "cut", ["<tool_call>", '<tool_call>{"name":"get_we', '<tool_call>{"name":"get_weather","arguments":{"ci']
)
def test_a_call_cut_off_by_the_end_is_no_call_and_no_content(cut):
    content, calls = parse_all(ToolRequest((WEATHER,)), "Hm. " + cut)

    assert (content, calls) == ("Hm. ", [])


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}',
        ' {"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}};'
        ' {"name": "get_time", "parameters": {}}',
    ],
)
def test_llama_json_calls_are_read_in_auto(text):
    content, calls = parse_all(ToolRequest((WEATHER, TIME)), text)

    assert content == ""
    assert (calls[0].name, json.loads(calls[0].arguments)) == ("get_weather", {"city": "Oslo", "days": 1})


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # invalid against the schema
        '{"name": "get_wether", "parameters": {"city": "Oslo", "days": 1}}',  # no such tool
        '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}',  # not JSON
        '{"answer": 42}',
    ],
)
def test_llama_json_that_is_no_valid_call_is_content(text):
    assert parse_all(ToolRequest((WEATHER, TIME)), text) == (text, [])


# ---- reasoning ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=8))
def test_a_think_block_is_reasoning_however_the_text_is_cut(cuts):
    splitter, reasoning, content = ReasoningSplitter(), "", ""
    for piece in [*chunked("\n<think>a < b </thin</think>\n\nThe answer.", cuts)]:
        split = splitter.feed(piece)
        reasoning, content = reasoning + split.reasoning, content + split.content
    end = splitter.finish()

    assert (reasoning + end.reasoning, content + end.content) == ("a < b </thin", "The answer.")


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("No thinking <think>here</think>", "", "No thinking <think>here</think>"),
        ("<think>cut o", "cut o", ""),
    ],
)
def test_only_a_leading_think_block_is_reasoning(text, reasoning, content):
    message = ChatOutput(None, reasoning=True).message(text)

    assert (message["reasoning_content"] or "", message["content"]) == (reasoning, content)


def test_reasoning_then_a_call():
    message = ChatOutput(ToolRequest((WEATHER,)), reasoning=True).message(f"<think>Weather?</think>{CALL}")

    assert message["reasoning_content"] == "Weather?"
    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


# ---- the chat template's input -----------------------------------------------------------------------------

HISTORY = [
    ChatTurn("user", "Weather in Paris?"),
    ChatTurn(
        "assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris", "days": 1}'),)
    ),
    ChatTurn("tool", "sunny, 21 C", tool_call_id="call_1"),
    ChatTurn("tool", "rain tomorrow", tool_call_id="call_2"),
]


def test_without_a_tool_format_the_template_gets_the_generic_one(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    messages, tools = template_inputs(tokenizer.chat_template, HISTORY, ToolRequest((WEATHER,)))

    assert tools is None
    assert messages[0]["role"] == "system" and json.dumps(WEATHER.openai()) in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": "<tool_call>"
        + json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "days": 1}})
        + "</tool_call>",
    }
    assert messages[3] == {
        "role": "user",
        "content": "<tool_response>\nsunny, 21 C\n</tool_response>\n"
        "<tool_response>\nrain tomorrow\n</tool_response>",
    }
    assert len(messages) == 4


def test_tool_choice_none_shows_no_tools(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    messages, _ = template_inputs(tokenizer.chat_template, HISTORY[:1], ToolRequest((WEATHER,), "none"))

    assert messages == [{"role": "user", "content": "Weather in Paris?"}]


HERMES_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_a_template_with_a_tool_format_renders_tools_and_calls_itself(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.tokenizer, "chat_template", HERMES_LIKE)

    ids = prompt_ids(tiny_engine, Prompt(chat=Conversation(HISTORY[:3], ToolRequest((WEATHER, TIME)))))

    assert tiny_engine.decode(ids, skip_special_tokens=False) == (
        "<tools>get_weather;get_time;</tools><|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}'
        "</tool_call><|im_end|>\n<|im_start|>tool\nsunny, 21 C<|im_end|>\n<|im_start|>assistant"
    )

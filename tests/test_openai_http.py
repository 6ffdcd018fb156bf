"""The OpenAI-compatible HTTP front, driven by the official `openai` client and by raw HTTP (aiohttp): the
same engine, admission, deadlines, keys, drain and traces as gRPC, and OpenAI's error bodies."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import ssl
import time

import aiohttp
import grpc
import jsonschema
import openai
import pytest
import trustme
from conftest import ServerThread, base_url, start_http_server
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bench.loadgen import run_load
from bench.serving.openai_client import OpenAIHttpClient
from bench.workload import RequestSpec
from engine.batching import BatchConfig
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.config import parse_config
from service.security.tls import TlsFiles
from telemetry.server import Telemetry

PROMPT = "The capital of France is"
KEY = "http-key-0123456789"
LONG = 1900  # tokens: seconds of the tiny model, so a request can end long before it would finish
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def stub(http_server):
    with grpc.insecure_channel(http_server.target) as channel:
        yield textgen_pb2_grpc.TextGenerationServiceStub(channel)


async def post(url: str, body: object, headers: dict | None = None) -> tuple[int, dict, dict]:
    """POST `body` (JSON, or bytes as they are); the status, the JSON answer and the headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=headers) as response:
        return response.status, await response.json(), {k.lower(): v for k, v in response.headers.items()}


async def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json()


async def sse_events(url: str, body: dict) -> list[str]:
    """The `data` of every server-sent event of a streamed answer, in order."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = (await response.read()).decode()
    events = [event for event in text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


def assert_openai_error(body: dict, code: str, param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert body["error"]["message"]


# ---- generation through the official client ------------------------------------------------------


def test_a_completion_is_the_same_text_as_grpc_generate(client, model, stub):
    grpc_response = stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=12, ignore_eos=True)),
        timeout=30,
    )

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, **GREEDY)

    (choice,) = completion.choices
    assert choice.text == grpc_response.text
    assert choice.finish_reason == "length"
    assert completion.object == "text_completion" and completion.model == model
    assert completion.usage.prompt_tokens == grpc_response.usage.prompt_tokens
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_a_streamed_completion_concatenates_to_the_unstreamed_text(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, **GREEDY)

    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, stream=True, **GREEDY))

    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_a_chat_completion_renders_the_chat_template(client, model, stub):
    messages = [{"role": "user", "content": "Hello there"}]
    chat = pb.ChatInput(messages=[pb.ChatMessage(role="user", content="Hello there")])
    templated = stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=10).ids

    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=4, **GREEDY)

    (choice,) = completion.choices
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert completion.usage.prompt_tokens == len(templated)
    assert completion.usage.completion_tokens == 4


def test_a_streamed_chat_sends_the_role_first_and_the_usage_last(client, model):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    unstreamed = client.chat.completions.create(model=model, messages=messages, max_tokens=6, **GREEDY)

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )

    *content, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content for c in content) == unstreamed.choices[0].message.content
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in content)
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert usage.usage.prompt_tokens == unstreamed.usage.prompt_tokens


def test_models_lists_the_served_model(client, model, http_server):
    (listed,) = client.models.list().data

    assert listed.id == model
    assert listed.model_extra["max_model_len"] == http_server.engine.model_info.max_context_len


def test_seeded_sampling_with_vendor_fields_is_reproducible(client, model):
    def sample() -> str:
        return (
            client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=4,
                temperature=1.0,
                seed=42,
                extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert sample() == sample()


# ---- n, log-probabilities and structured output ------------------------------------------------------

SMALL_SCHEMA = {  # bounded, so that even the random-weight model completes it well within the budget
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


def sampled_texts(client, model, seed: int, n: int) -> list[str]:
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, seed=seed, n=n, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in completion.choices] == list(range(n))
    return [c.text for c in completion.choices]


def test_n_completions_are_indexed_and_completion_i_is_seed_plus_i(client, model):
    texts = sampled_texts(client, model, seed=11, n=3)

    assert texts == [sampled_texts(client, model, seed=11 + i, n=1)[0] for i in range(3)]


def test_n_completions_count_every_completion_in_the_usage(client, model):
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, n=3, seed=1, extra_body={"ignore_eos": True}
    )

    assert completion.usage.completion_tokens == 15
    assert all(c.finish_reason == "length" for c in completion.choices)


def test_streamed_n_completions_carry_their_index_and_match_the_unstreamed(client, model):
    messages = [{"role": "user", "content": "Hi"}]
    params = {"model": model, "messages": messages, "max_tokens": 6, "n": 3, "seed": 5}
    params["extra_body"] = {"ignore_eos": True}
    whole = client.chat.completions.create(**params)

    chunks = list(
        client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )

    *content, usage = chunks
    by_index: dict[int, list] = {}
    for chunk in content:
        (choice,) = chunk.choices
        by_index.setdefault(choice.index, []).append(choice)
    assert sorted(by_index) == [0, 1, 2]
    for index, choices in by_index.items():
        assert choices[0].delta.role == "assistant"
        assert "".join(c.delta.content for c in choices) == whole.choices[index].message.content
        assert [c.finish_reason for c in choices][-1] == "length"
    assert usage.usage.completion_tokens == 18 == whole.usage.completion_tokens


def test_completion_logprobs_are_grpc_top_logprobs(client, model, stub):
    grpc_response = stub.Generate(
        pb.GenerateRequest(
            prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True), top_logprobs=3
        ),
        timeout=30,
    )

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)

    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [t.text for t in grpc_response.tokens]
    assert logprobs.token_logprobs == pytest.approx([t.logprob for t in grpc_response.tokens], abs=1e-5)
    assert [list(top) for top in logprobs.top_logprobs] == [
        [a.text for a in t.top_logprobs] for t in grpc_response.tokens
    ]
    for top, token in zip(logprobs.top_logprobs, grpc_response.tokens, strict=True):
        assert list(top.values()) == pytest.approx([a.logprob for a in token.top_logprobs], abs=1e-5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]


def test_streamed_completion_logprobs_match_the_unstreamed(client, model):
    params = {"model": model, "prompt": PROMPT, "max_tokens": 6, "logprobs": 2, **GREEDY}
    whole = client.completions.create(**params).choices[0].logprobs

    chunks = list(client.completions.create(**params, stream=True))

    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == whole.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == whole.text_offset


def test_chat_logprobs_are_the_content_tokens_with_their_bytes_and_alternatives(client, model):
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )

    choice = completion.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for token in content:
        assert token.bytes == list(token.token.encode()) and token.logprob <= 0
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-5)  # greedy: the best


def test_chat_top_logprobs_without_logprobs_is_refused(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2
        )

    assert error.value.param == "top_logprobs"


def test_json_schema_output_validates_against_the_schema(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SMALL_SCHEMA}}

    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A pet as JSON"}],
        max_tokens=160,
        seed=3,
        response_format=response_format,
    )

    jsonschema.validate(json.loads(completion.choices[0].message.content), SMALL_SCHEMA)
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_is_constrained_to_any_json_object(client, model, http_server, monkeypatch):
    # An unbounded object: the random-weight model never closes it, so what is checked is the constraint.
    compiled = []
    compile_response_format = http_server.engine.grammars.compile
    monkeypatch.setattr(
        http_server.engine.grammars,
        "compile",
        lambda response_format: compiled.append(response_format) or compile_response_format(response_format),
    )

    completion = client.completions.create(
        model=model,
        prompt="JSON:",
        max_tokens=8,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )

    assert compiled and all(json.loads(f.json_schema) == {"type": "object"} for f in compiled)
    assert completion.choices[0].text.startswith("{")


def test_guided_choice_output_is_one_of_the_choices(client, model):
    choices = ["yes", "no", "maybe"]

    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=10, n=3, seed=2, extra_body={"guided_choice": choices}
    )

    assert all(c.text in choices for c in completion.choices)


def test_guided_regex_output_matches_the_regex(client, model):
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=20, seed=1, extra_body={"guided_regex": "[a-z]{2,5}-[0-9]{2}"}
    )

    assert re.fullmatch("[a-z]{2,5}-[0-9]{2}", completion.choices[0].text)


BAD_FORMATS = {
    "a schema that does not compile": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    "a regex that does not compile": ({"guided_regex": "a(b"}, "guided_regex"),
    "no choices": ({"guided_choice": []}, "guided_choice"),
    "an unknown response_format type": ({"response_format": {"type": "xml"}}, "response_format.type"),
    "two formats": ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    "logprobs over 20": ({"logprobs": 21}, "logprobs"),
    "n over --max-n": ({"n": 17}, "n"),
}


@pytest.mark.parametrize("fields, param", BAD_FORMATS.values(), ids=BAD_FORMATS.keys())
async def test_a_bad_n_logprobs_or_format_is_400_naming_the_parameter(http_server, fields, param):
    status, answer, _ = await post(f"{base_url(http_server)}/v1/completions", {"prompt": PROMPT, **fields})

    assert status == 400
    assert_openai_error(answer, "invalid_argument", param)


def test_response_format_text_is_no_constraint(client, model):
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, **GREEDY)

    text = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "response_format": {"type": "text"}},
    )  # fmt: skip

    assert text.choices[0].text == plain.choices[0].text


# ---- errors over raw HTTP ------------------------------------------------------------------------

INVALID_BODIES = {
    "temperature < 0": ("completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    "top_p = 0": ("completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    "a temperature past any float": (
        "completions",
        {"prompt": PROMPT, "temperature": 10**400},
        "temperature",
    ),
    "top_k not an integer": ("completions", {"prompt": PROMPT, "top_k": "many"}, "top_k"),
    "max_tokens over the limit": ("completions", {"prompt": PROMPT, "max_tokens": 5000}, "max_tokens"),
    "max_tokens 0": ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    "max_completion_tokens over the context": (
        "chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4000},
        "max_completion_tokens",
    ),
    "an empty stop sequence": ("completions", {"prompt": PROMPT, "stop": ["ok", ""]}, "stop[1]"),
    "too many stop sequences": ("completions", {"prompt": PROMPT, "stop": ["s"] * 17}, "stop"),
    "a negative seed": ("completions", {"prompt": PROMPT, "seed": -1}, "seed"),
    "priority not an integer": ("completions", {"prompt": PROMPT, "priority": 1.5}, "priority"),
    "no prompt": ("completions", {}, "prompt"),
    "an empty prompt": ("completions", {"prompt": ""}, "prompt"),
    "two prompts": ("completions", {"prompt": ["a", "b"]}, "prompt"),
    "a token id past the vocabulary": ("completions", {"prompt": [1, 10**6]}, "prompt[1]"),
    "an unknown parameter": ("completions", {"prompt": PROMPT, "suffix": "!"}, "suffix"),
    "stream_options without stream": (
        "completions",
        {"prompt": PROMPT, "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    "no messages": ("chat/completions", {"messages": []}, "messages"),
    "a message without a role": ("chat/completions", {"messages": [{"content": "Hi"}]}, "messages[0].role"),
    "an image part": (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    "a prompt over the context": ("completions", {"prompt": [7] * 2048}, "prompt"),
}


@pytest.mark.parametrize("path, body, param", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_an_invalid_body_is_400_naming_the_parameter(http_server, path, body, param):
    status, answer, _ = await post(f"{base_url(http_server)}/v1/{path}", body)

    assert status == 400
    too_long = body.get("prompt") == [7] * 2048
    assert_openai_error(answer, "prompt_too_long" if too_long else "invalid_argument", param)
    assert answer["error"]["type"] == "invalid_request_error"


async def test_every_invalid_parameter_is_reported_at_once(http_server):
    body = {"prompt": PROMPT, "temperature": -1, "top_p": 2, "stop": [""]}

    _, answer, _ = await post(f"{base_url(http_server)}/v1/completions", body)

    message = answer["error"]["message"]
    assert all(name in message for name in ("temperature", "top_p", "stop[0]"))


async def test_a_body_that_is_not_json_is_400_malformed(http_server):
    status, answer, _ = await post(f"{base_url(http_server)}/v1/completions", b"{not json")

    assert status == 400
    assert_openai_error(answer, "malformed_request")


async def test_an_unknown_model_is_404(http_server):
    status, answer, _ = await post(
        f"{base_url(http_server)}/v1/completions", {"model": "gpt-9", "prompt": "x"}
    )

    assert status == 404
    assert_openai_error(answer, "model_not_found", "model")


async def test_an_unknown_path_is_404_with_an_openai_error_body(http_server):
    status, answer = await get(f"{base_url(http_server)}/v1/embeddings")

    assert status == 404
    assert set(answer["error"]) == {"message", "type", "param", "code"}


async def test_a_raw_stream_ends_with_done(http_server):
    body = {"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "stream": True, "temperature": 0}

    events = await sse_events(f"{base_url(http_server)}/v1/completions", body)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


async def test_the_request_id_header_is_the_engine_request_id_and_is_echoed(http_server):
    headers = {"X-Request-Id": "my-request-1"}

    status, answer, answer_headers = await post(
        f"{base_url(http_server)}/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, headers
    )

    assert status == 200
    assert answer["id"] == "cmpl-my-request-1"
    assert answer_headers["x-request-id"] == "my-request-1"


async def test_a_request_id_in_flight_is_409(http_server):
    url, headers = f"{base_url(http_server)}/v1/completions", {"X-Request-Id": "twice"}
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as first:
        await first.content.readuntil(b"\n\n")
        status, answer, _ = await post(url, {"prompt": PROMPT}, headers)

    assert status == 409
    assert_openai_error(answer, "already_exists")


async def test_the_timeout_header_is_a_deadline_504_that_frees_the_kv_blocks(http_server, wait_until_idle):
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}

    status, answer, _ = await post(
        f"{base_url(http_server)}/v1/completions", body, {"X-Request-Timeout": "0.3"}
    )

    assert status == 504
    assert_openai_error(answer, "deadline_exceeded")
    assert answer["error"]["type"] == "timeout"
    await asyncio.to_thread(wait_until_idle, http_server.engine)


async def test_a_full_queue_is_429_with_retry_after(server_config):
    server = start_http_server(server_config, batch=BatchConfig(max_batch_size=1), max_queue_size=1)
    body = {"prompt": PROMPT, "max_tokens": 64, "ignore_eos": True}
    try:
        results = await asyncio.gather(*(post(f"{base_url(server)}/v1/completions", body) for _ in range(6)))
    finally:
        server.stop()

    refused = [(answer, headers) for status, answer, headers in results if status == 429]
    assert refused, "six requests on one slot and a queue of one: some must be refused"
    assert len(refused) < 6
    for answer, headers in refused:
        assert_openai_error(answer, "queue_full")
        assert answer["error"]["type"] == "rate_limit_error"
        assert int(headers["retry-after"]) >= 1
    assert all(a["usage"]["completion_tokens"] == 64 for s, a, _ in results if s == 200)


@pytest.fixture(scope="module")
def traced(server_config):
    """A server whose spans go to an in-memory exporter of its own: (the server, the exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = start_http_server(server_config, Telemetry(tracer_provider=provider))
    yield server, exporter
    server.stop()


def request_span(exporter: InMemorySpanExporter, request_id: str):
    """The `text_completion` span of the request `request_id`, once it has ended."""
    deadline = time.monotonic() + 10
    while True:
        spans = exporter.get_finished_spans()
        found = [s for s in spans if s.attributes.get("textgen.request.id") == request_id]
        if found or time.monotonic() > deadline:
            (span,) = found
            return span
        time.sleep(0.01)


async def test_a_client_that_disconnects_mid_stream_cancels_its_request_and_frees_its_kv_blocks(
    traced, wait_until_idle
):
    server, exporter = traced
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    url, headers = f"{base_url(server)}/v1/completions", {"X-Request-Id": "gone-mid-stream"}
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        for _ in range(3):
            await response.content.readuntil(b"\n\n")
        assert server.engine.load.num_free_kv_blocks < server.engine.load.num_kv_blocks
        response.close()  # drop the connection mid-stream
    await asyncio.to_thread(wait_until_idle, server.engine)

    request = await asyncio.to_thread(request_span, exporter, "gone-mid-stream")
    assert request.attributes["error.type"] == "cancelled"
    assert request.attributes["gen_ai.usage.output_tokens"] < LONG


async def test_a_client_that_gives_up_before_its_answer_cancels_its_request(traced, wait_until_idle):
    server, exporter = traced
    body = {"prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True}
    url, headers = f"{base_url(server)}/v1/completions", {"X-Request-Id": "gone-early"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        with pytest.raises(TimeoutError):
            await session.post(url, json=body, headers=headers)
    await asyncio.to_thread(wait_until_idle, server.engine)

    request = await asyncio.to_thread(request_span, exporter, "gone-early")
    assert request.attributes["error.type"] == "cancelled"
    assert request.attributes["gen_ai.usage.output_tokens"] < LONG


def broken_run(*args, **kwargs):
    raise RuntimeError("injected fault")


async def test_an_engine_fault_is_500_and_the_server_keeps_serving(server_config, monkeypatch):
    server = start_http_server(server_config)
    runner = server.engine.model_runner
    url, body = f"{base_url(server)}/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
    try:
        monkeypatch.setattr(runner, "run", broken_run)
        failed, answer, _ = await post(url, body)
        monkeypatch.undo()
        recovered, after, _ = await post(url, body)
    finally:
        server.stop()

    assert failed == 500
    assert_openai_error(answer, "engine_fault")
    assert answer["error"]["type"] == "server_error"
    assert recovered == 200 and after["usage"]["completion_tokens"] == 4


# ---- health, loading and draining ----------------------------------------------------------------


async def test_health_is_200_while_serving(http_server):
    status, answer = await get(f"{base_url(http_server)}/health")

    assert status == 200 and answer == {"status": "ok"}


async def test_health_and_generation_are_503_while_the_model_loads(server_config):
    config = dataclasses.replace(server_config(), http_port=0)
    server = ServerThread(config).start(load=False)
    try:
        health, health_answer = await get(f"{base_url(server)}/health")
        generation, answer, _ = await post(f"{base_url(server)}/v1/completions", {"prompt": PROMPT})
    finally:
        server.stop()

    assert health == generation == 503
    assert_openai_error(health_answer, "model_loading")
    assert_openai_error(answer, "model_loading")


async def test_health_and_generation_are_503_while_draining(server_config):
    server = start_http_server(server_config)
    try:
        server.server.generations.stop_accepting()  # what drain() does first
        health, health_answer = await get(f"{base_url(server)}/health")
        generation, answer, _ = await post(f"{base_url(server)}/v1/completions", {"prompt": PROMPT})
    finally:
        server.stop()

    assert health == generation == 503
    assert_openai_error(answer, "draining")
    assert health_answer["error"]["type"] == "service_unavailable"


async def test_a_drain_lets_a_stream_in_flight_finish(server_config):
    server = start_http_server(server_config, grace_period_s=60.0)
    body = {"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    url = f"{base_url(server)}/v1/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        first = await response.content.readuntil(b"\n\n")
        stopped = asyncio.create_task(asyncio.to_thread(server.stop))
        rest = (await response.read()).decode()
    await stopped

    events = [first.decode(), *rest.split("\n\n")]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 50
    assert rest.rstrip().endswith("data: [DONE]")


# ---- API keys and TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_http_server(server_config):
    server = start_http_server(server_config, api_keys=(KEY,))
    yield server
    server.stop()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-0123456789", f"Basic {KEY}"])
async def test_a_request_without_a_valid_key_is_401(keyed_http_server, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    status, answer, _ = await post(f"{base_url(keyed_http_server)}/v1/completions", {"prompt": "x"}, headers)

    assert status == 401
    assert_openai_error(answer, "unauthenticated")
    assert answer["error"]["type"] == "authentication_error"


def test_the_grpc_api_key_works_with_the_openai_client(keyed_http_server):
    url = base_url(keyed_http_server) + "/v1"
    with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
        model = keyed_http_server.engine.model_info.name
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=2)

    assert completion.usage.completion_tokens == 2


async def test_health_needs_no_key(keyed_http_server):
    status, _ = await get(f"{base_url(keyed_http_server)}/health")

    assert status == 200


async def test_with_tls_the_http_front_speaks_https_with_the_same_certificate(server_config, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    tls = TlsFiles(str(tmp_path / "server.pem"), str(tmp_path / "server.pem"))
    server = start_http_server(server_config, tls=tls)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url(server, 'https')}/health", ssl=context) as response:
                secure = response.status
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"{base_url(server)}/health") as response:
                    await response.read()
    finally:
        server.stop()

    assert secure == 200


async def test_with_mtls_the_http_front_refuses_a_client_without_a_certificate(server_config, tmp_path):
    ca, client_ca = trustme.CA(), trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    client_ca.cert_pem.write_to_path(tmp_path / "clients-ca.pem")
    pem = str(tmp_path / "server.pem")
    server = start_http_server(server_config, tls=TlsFiles(pem, pem, str(tmp_path / "clients-ca.pem")))
    anonymous = ssl.create_default_context()
    ca.configure_trust(anonymous)
    known = ssl.create_default_context()
    ca.configure_trust(known)
    client_ca.issue_cert("client@example.com").configure_cert(known)
    url = f"{base_url(server, 'https')}/health"
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url, ssl=anonymous) as response:
                    await response.read()
            async with session.get(url, ssl=known) as response:
                known_status = response.status
    finally:
        server.stop()

    assert known_status == 200


# ---- traces --------------------------------------------------------------------------------------


async def test_the_http_span_is_the_parent_of_the_request_spans(traced):
    server, exporter = traced
    with TracerProvider().get_tracer("test").start_as_current_span("caller") as caller:
        headers = {"X-Request-Id": "traced-1"}
        propagate.inject(headers)
        body = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
        status, _, _ = await post(f"{base_url(server)}/v1/completions", body, headers)
    request = await asyncio.to_thread(request_span, exporter, "traced-1")
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == request.context.trace_id]

    (http_span,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert status == 200
    assert http_span.name == "POST /v1/completions"
    assert http_span.parent.span_id == caller.get_span_context().span_id
    assert http_span.attributes["http.response.status_code"] == 200
    assert request.parent.span_id == http_span.context.span_id
    phases = [s for s in spans if s.parent and s.parent.span_id == request.context.span_id]
    phases.sort(key=lambda s: s.start_time)
    assert [s.name for s in phases] == ["queue", "prefill", "decode"]
    assert not any("authorization" in str(s.attributes).lower() for s in spans)


# ---- configuration -------------------------------------------------------------------------------


def test_the_http_port_flag_and_its_environment_variable(monkeypatch):
    assert parse_config([]).http_port is None
    assert parse_config(["--http-port", "8080"]).http_port == 8080
    monkeypatch.setenv("TEXTGEN_HTTP_PORT", "0")
    assert parse_config([]).http_port == 0


# ---- the load generator's HTTP client ------------------------------------------------------------------


async def test_the_load_generator_counts_every_token_over_http(http_server):
    specs = [RequestSpec(i, 0.0, 4, 5 + i, "") for i in range(3)]

    result = await run_load(
        OpenAIHttpClient(base_url(http_server)), specs, [[7, 8, 9, 10]] * 3, progress=False
    )

    assert all(t.ok for t in result.traces), [t.error for t in result.traces]
    assert [t.output_tokens for t in result.traces] == [5, 6, 7]

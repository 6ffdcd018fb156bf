"""Structured output: outputs match their JSON schema, regex or choice, greedy and sampled; constrained rows
leave the rest of the batch alone; grammars compile once, off the loops; bad formats are refused by field."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import grpc
import jsonschema
import pytest

from client import AsyncTextGenClient, TextGenClient
from client.cli import main as cli_main
from engine.errors import InvalidRequestError
from engine.request import FinishReason, ResponseFormat, SamplingParams, StoppingParams
from protos.textgen.v1 import textgen_pb2 as pb

# Bounded, so that even a random-weight model completes it well within the token budget.
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "ok", "kind"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{2,3}"
CHOICES = ("yes", "no", "maybe")
BUDGET = StoppingParams(max_new_tokens=160)  # far more than any of these outputs needs


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed)


def constrained(params: SamplingParams, **response_format) -> SamplingParams:
    params.response_format = ResponseFormat(**response_format)
    return params


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


ALL_SAMPLINGS = [SamplingParams(), sampled(1), sampled(2), SamplingParams(temperature=0.7, top_p=0.9, seed=3)]


def test_json_output_validates_against_its_schema_greedy_and_sampled(engine):
    schema = json.dumps(SMALL_SCHEMA)
    params = [constrained(p, json_schema=schema) for p in ALL_SAMPLINGS]

    results = engine.generate(["Describe a pet as JSON:"] * len(params), params, BUDGET)

    for result in results:
        assert result.finish_reason is FinishReason.EOS
        jsonschema.validate(json.loads(result.text), SMALL_SCHEMA)


def test_regex_output_matches_greedy_and_sampled(engine):
    params = [constrained(p, regex=REGEX) for p in ALL_SAMPLINGS]

    results = engine.generate(["A code:"] * len(params), params, BUDGET)

    assert all(re.fullmatch(REGEX, r.text) and r.finish_reason is FinishReason.EOS for r in results)


def test_choice_output_is_one_of_the_choices_then_ends(engine):
    params = [constrained(p, choice=CHOICES) for p in ALL_SAMPLINGS]

    results = engine.generate(["Is it raining?"] * len(params), params, BUDGET)

    assert all(r.text in CHOICES and r.finish_reason is FinishReason.EOS for r in results)
    assert all(r.token_ids[-1] in engine.eos_token_ids for r in results)  # EOS only once complete


def test_constrained_rows_leave_the_other_rows_output_unchanged(engine):
    plain = [SamplingParams(), sampled(5)]
    prompts = ["The weather today", "Once upon a time"]
    alone = [
        engine.generate([p], s, StoppingParams(max_new_tokens=12, ignore_eos=True))[0]
        for p, s in zip(prompts, plain, strict=True)
    ]
    rows = [
        *plain,
        constrained(SamplingParams(), json_schema=json.dumps(SMALL_SCHEMA)),
        constrained(sampled(6), regex=REGEX),
    ]
    stopping = [StoppingParams(max_new_tokens=12, ignore_eos=True)] * 2 + [BUDGET] * 2

    together = engine.generate([*prompts, "JSON:", "Code:"], rows, stopping)

    assert [r.token_ids for r in together[:2]] == [r.token_ids for r in alone]
    assert [r.tokens[0].logprob for r in together[:2]] == [r.tokens[0].logprob for r in alone]


def test_log_probabilities_stay_those_of_the_unconstrained_model(engine):
    prompt = "Is it raining?"
    free = engine.generate([prompt], SamplingParams(top_logprobs=5), StoppingParams(max_new_tokens=1))[0]
    params = constrained(SamplingParams(top_logprobs=5), choice=CHOICES)

    first = engine.generate([prompt], params, BUDGET)[0].tokens[0]

    assert first.top_logprobs == free.tokens[0].top_logprobs


def test_a_format_is_compiled_once_and_then_served_from_the_cache(engine):
    response_format = ResponseFormat(regex="[0-9]{4}")

    assert engine.grammars.compile(response_format) is engine.grammars.compile(
        ResponseFormat(regex="[0-9]{4}")
    )


BAD_FORMATS = {
    "schema not JSON": (dict(json_schema="{'type': "), "sampling.response_format.json_schema"),
    "schema not a schema": (dict(json_schema='{"type": "nonsense"}'), "sampling.response_format.json_schema"),
    "schema a list": (dict(json_schema="[1, 2]"), "sampling.response_format.json_schema"),
    "regex unbalanced": (dict(regex="a(b"), "sampling.response_format.regex"),
    "no choices": (dict(choice=()), "sampling.response_format.choice.choices"),
    "empty choice": (dict(choice=("a", "")), "sampling.response_format.choice.choices[1]"),
    "none set": ({}, "sampling.response_format"),
}


@pytest.mark.parametrize("response_format, field", BAD_FORMATS.values(), ids=BAD_FORMATS.keys())
def test_a_bad_format_is_refused_naming_its_field(engine, response_format, field):
    with pytest.raises(InvalidRequestError) as error:
        engine.generate(["x"], constrained(SamplingParams(), **response_format), BUDGET)

    assert [f for f, _ in error.value.violations] == [field]


def test_ignore_eos_is_refused_with_a_response_format(engine):
    stopping = StoppingParams(max_new_tokens=8, ignore_eos=True)

    with pytest.raises(InvalidRequestError) as error:
        engine.generate(["x"], constrained(SamplingParams(), regex="a+"), stopping)

    assert [f for f, _ in error.value.violations] == ["stopping.ignore_eos"]


# ---- over gRPC and through the clients --------------------------------------------------------------------


def json_request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="A pet as JSON:",
        stopping=pb.StoppingCriteria(max_new_tokens=160),
        response_format=pb.ResponseFormat(json_schema=json.dumps(SMALL_SCHEMA)),
        **fields,
    )


def test_generate_and_stream_return_schema_valid_json(stub):
    unary = stub.Generate(json_request(sampling=pb.SamplingParameters(temperature=1.0, seed=4)), timeout=30)
    streamed = "".join(m.text for m in stub.GenerateStream(json_request(), timeout=30))

    for text in (unary.text, streamed):
        jsonschema.validate(json.loads(text), SMALL_SCHEMA)
    assert unary.finish_reason == pb.FINISH_REASON_EOS


@pytest.mark.parametrize(
    "response_format, field",
    [
        (pb.ResponseFormat(json_schema='{"type": "nonsense"}'), "response_format.json_schema"),
        (pb.ResponseFormat(regex="a(b"), "response_format.regex"),
        (pb.ResponseFormat(choice=pb.ResponseFormat.Choice()), "response_format.choice.choices"),
        (pb.ResponseFormat(), "response_format"),
    ],
)
def test_a_bad_format_is_invalid_argument_naming_the_proto_field(stub, response_format, field):
    request = pb.GenerateRequest(prompt="x", response_format=response_format)

    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request, timeout=30)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_the_server_compiles_grammars_on_a_worker_thread(server, stub, monkeypatch):
    threads = []
    compile_response_format = server.engine.grammars.compile

    def record(response_format):
        threads.append(threading.current_thread().name)
        return compile_response_format(response_format)

    monkeypatch.setattr(server.engine.grammars, "compile", record)
    stub.Generate(json_request(), timeout=30)

    assert threads[0].startswith("tokenizer")  # the compile; the engine's matcher then finds it cached


def test_sync_and_async_clients_and_the_cli_constrain_the_output(server, capsys):
    with TextGenClient(server.target, timeout=30) as client:
        chosen = client.generate("Is it raining?", max_new_tokens=16, choice=list(CHOICES)).text
        matched = "".join(c.text for c in client.stream("A code:", max_new_tokens=32, regex=REGEX))

    async def generate_json() -> str:
        async with AsyncTextGenClient(server.target, timeout=30) as client:
            return (await client.generate("JSON:", max_new_tokens=160, json_schema=SMALL_SCHEMA)).text

    jsonschema.validate(json.loads(asyncio.run(generate_json())), SMALL_SCHEMA)
    assert chosen in CHOICES and re.fullmatch(REGEX, matched)
    assert cli_main(["Is it raining?", "--target", server.target, "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


def test_the_real_model_writes_schema_valid_json_greedy_and_sampled(smollm2_engine):
    ids = smollm2_engine.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    params = [
        constrained(p, json_schema=json.dumps(PERSON)) for p in (SamplingParams(), sampled(1), sampled(2))
    ]

    results = smollm2_engine.generate([ids] * len(params), params, StoppingParams(max_new_tokens=120))

    for result in results:
        assert result.finish_reason is FinishReason.EOS
        jsonschema.validate(json.loads(result.text), PERSON)

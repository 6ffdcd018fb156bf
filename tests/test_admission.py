"""The one admission path every front calls (engine/frontend/admission.py), on the tiny llama engine."""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.frontend import limits
from engine.frontend.admission import Admission, Prompt, admit, prompt_ids
from engine.request import GenerationRequest, ResponseFormat, SamplingParams, StoppingParams
from service.chat.tools import ChatTurn, Conversation
from service.grpc.translate import proto_field
from service.openai.request import CHAT, parse_request

EXECUTOR_PREFIX = "admission-test"
REJECTING_TEMPLATE = "{{ raise_exception('roles must alternate user/assistant') }}"


@pytest.fixture(scope="module")
def executor():
    threads = ThreadPoolExecutor(1, thread_name_prefix=EXECUTOR_PREFIX)
    yield threads
    threads.shutdown()


def request(**fields) -> GenerationRequest:
    return GenerationRequest([], stopping=StoppingParams(max_new_tokens=3, ignore_eos=True), **fields)


async def run(engine, admission: Admission, executor) -> tuple[GenerationRequest, list]:
    admitted = await admit(engine, admission, executor)
    return admitted.request, [event async for event in admitted.events]


async def test_the_grammar_is_compiled_on_an_executor_thread(tiny_engine, executor, monkeypatch):
    threads, compile_format = [], tiny_engine.grammars.compile

    def recorded(response_format):
        threads.append(threading.current_thread().name)
        return compile_format(response_format)

    monkeypatch.setattr(tiny_engine.grammars, "compile", recorded)
    sampling = SamplingParams(response_format=ResponseFormat(regex="[ab]{1,8}"))
    stopping = StoppingParams(max_new_tokens=3)

    await run(tiny_engine, Admission(Prompt(text="Hi"), GenerationRequest([], sampling, stopping)), executor)

    assert threads[0].startswith(EXECUTOR_PREFIX)  # the engine's matcher then finds it in the cache


async def test_an_empty_request_id_is_defaulted_and_a_given_one_kept(tiny_engine, executor):
    made, made_events = await run(tiny_engine, Admission(Prompt(text="Hi"), request()), executor)
    kept, kept_events = await run(
        tiny_engine, Admission(Prompt(text="Hi"), request(request_id="mine")), executor
    )

    assert len(made.request_id) == 32 and {e.request_id for e in made_events} == {made.request_id}
    assert kept.request_id == "mine" and {e.request_id for e in kept_events} == {"mine"}


async def test_each_rule_runs_once_for_an_admitted_request(tiny_engine, executor, monkeypatch):
    calls: dict[str, int] = {}
    for name in ("parameter_violations", "n_violations", "cache_salt_violations", "resolve_max_new_tokens"):
        monkeypatch.setattr(limits, name, _counted(getattr(limits, name), name, calls))
    monkeypatch.setattr(limits, "_prompt_violations", _counted(limits._prompt_violations, "prompt", calls))

    _, events = await run(tiny_engine, Admission(Prompt(text="Hello there"), request()), executor)

    assert events[-1].finished
    assert calls == {
        "parameter_violations": 1,
        "n_violations": 1,
        "cache_salt_violations": 1,
        "prompt": 1,
        "resolve_max_new_tokens": 1,
    }


async def test_an_input_over_its_size_is_refused_alone_before_it_is_tokenized(
    tiny_engine, executor, monkeypatch
):
    monkeypatch.setattr(tiny_engine, "tokenize", lambda *_: pytest.fail("tokenized an input over its limit"))
    text = "x" * (tiny_engine.limits.max_prompt_chars + 1)
    admission = Admission(Prompt(text=text), request(n=0), refusals=[("model", "is wrong")])

    with pytest.raises(PromptTooLongError) as error:
        await admit(tiny_engine, admission, executor)

    assert [field for field, _ in error.value.violations] == ["prompt"]


async def test_the_fronts_refusals_come_first_beside_the_rules_in_its_names(tiny_engine, executor):
    sampling = SamplingParams(top_p=2.0)
    admission = Admission(
        Prompt(text="Hi"),
        GenerationRequest([], sampling),
        refusals=[("chat.messages[0].role", "must not be empty")],
        field_name=functools.partial(proto_field, input_kind="prompt"),
    )

    with pytest.raises(InvalidRequestError) as error:
        await admit(tiny_engine, admission, executor)

    assert [field for field, _ in error.value.violations] == ["chat.messages[0].role", "sampling.top_p"]


def test_a_chat_template_rejection_is_worded_alike_for_every_front(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.tokenizer, "chat_template", REJECTING_TEMPLATE)
    chat = Prompt(chat=Conversation([ChatTurn("user", "Hi")]))
    body = parse_request(CHAT, {"messages": [{"role": "user", "content": "Hi"}]}, tiny_engine.limits)
    fronts = {"grpc": functools.partial(proto_field, input_kind="chat"), "http": body.param}

    with pytest.raises(InvalidRequestError) as error:
        prompt_ids(tiny_engine, chat)

    ((field, description),) = error.value.violations
    assert description == "the model's chat template rejected them: roles must alternate user/assistant"
    assert {front: rename(field) for front, rename in fronts.items()} == {
        "grpc": "chat.messages",
        "http": "messages",
    }


def test_a_model_without_a_chat_template_refuses_a_chat(tiny_engine, monkeypatch):
    monkeypatch.setattr(tiny_engine.tokenizer, "chat_template", None)

    with pytest.raises(InvalidRequestError) as error:
        prompt_ids(tiny_engine, Prompt(chat=Conversation([ChatTurn("user", "Hi")])))

    assert error.value.violations == [("chat", "this model has no chat template; send a prompt instead")]


def _counted(function, name: str, calls: dict[str, int]):
    @functools.wraps(function)
    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return function(*args, **kwargs)

    return counted

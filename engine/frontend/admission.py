"""The one way into the engine for every front (gRPC textgen.v1, OpenAI HTTP, SMG's worker protocol).

A front parses its request into an `Admission` (the input, the engine request, its own findings and how it
names the engine's fields) and awaits `admit`, which, for every front alike:
1. checks the rules that need no tokens (`engine/frontend/limits.py`): the input's size first, alone, then the
   parameters, together with what the front found;
2. tokenizes the prompt or renders the chat template, on the executor's threads (never the event loop);
3. compiles the response format's grammar there too;
4. defaults the request id, checks the rules that need the tokens, once;
5. returns the request and its events, which submit it when first awaited.
Every `InvalidRequestError` it raises, then or while the events flow, names the front's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.frontend.engine import Engine
from engine.frontend.limits import ChatMessage, RequestLimits, Violation, check_parameters, check_prompt
from engine.frontend.limits import input_size_violations as size_violations
from engine.request import GenerationEvent, GenerationRequest

T = TypeVar("T")


class Chat(Protocol):
    """A conversation as admission renders it: its messages (the size rules read their role and content)
    and the `messages` and `tools` the model's chat template takes (service/chat/tools.py)."""

    @property
    def messages(self) -> Sequence[ChatMessage]: ...

    def template_inputs(self, chat_template: str | None) -> tuple[list[dict], list[dict] | None]: ...


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's input: exactly one of `text`, `chat` or token `ids`. `add_special_tokens` applies to text
    (vLLM's `/tokenize` may ask for them; generation never does)."""

    text: str | None = None
    chat: Chat | None = None
    ids: Sequence[int] | None = None
    add_special_tokens: bool = False

    def __post_init__(self) -> None:
        assert (self.text, self.chat, self.ids).count(None) == 2, "exactly one input"


def _same_name(path: str) -> str:
    return path


@dataclass(slots=True)
class Admission:
    """What a front asks of the engine.

    `request` is complete but for its `prompt_ids` (admission fills them from `prompt`) and perhaps its
    `request_id` ("" is a new one). `refusals` are what the front found wrong in the request's shape, in
    its own names, reported with the rules' violations; `field_name` names an engine field path
    (`sampling.top_p`, `prompt_ids[3]`) as the front's client knows it.
    """

    prompt: Prompt
    request: GenerationRequest
    refusals: Sequence[Violation] = ()
    field_name: Callable[[str], str] = _same_name


@dataclass(slots=True)
class Admitted:
    """An admitted request (its prompt ids and id filled in) and its events: iterating submits it, and
    closing the iterator ends it, whether or not it has finished."""

    request: GenerationRequest
    events: AsyncIterator[GenerationEvent] = field(repr=False)


async def admit(engine: Engine, admission: Admission, executor: Executor) -> Admitted:
    """Admit `admission` (module docstring); raises `InvalidRequestError` naming the front's fields."""
    request, rename = admission.request, admission.field_name
    with renamed(rename):
        check_input_size(admission.prompt, engine.limits)
    violations = [*admission.refusals, *_named(check_parameters(request, engine.limits), rename)]
    if violations:
        raise InvalidRequestError.from_violations(violations)
    with renamed(rename):
        request.prompt_ids = await _off_loop(executor, prompt_ids, engine, admission.prompt)
        if (response_format := request.sampling.response_format) is not None:
            # Compiled (and cached) here, so that a big schema stalls neither the event loop nor the engine's.
            await _off_loop(executor, engine.grammars.compile, response_format)
        request.request_id = request.request_id or uuid.uuid4().hex
        max_new_tokens = check_prompt(request, engine.limits)
    request.arrival_time = time.monotonic()  # its time queued starts now, not while it was tokenized
    return Admitted(request, _submitted(engine, request, max_new_tokens, rename))


def check_input_size(prompt: Prompt, limits: RequestLimits) -> None:
    """Raise `PromptTooLongError` when the input is over the size limits; nothing of it is tokenized."""
    if prompt.text is not None:
        violations = size_violations(limits, prompt=prompt.text)
    elif prompt.chat is not None:
        violations = size_violations(limits, messages=prompt.chat.messages)
    else:
        violations = size_violations(limits, num_prompt_ids=len(prompt.ids))
    if violations:
        raise PromptTooLongError.from_violations(violations)


def prompt_ids(engine: Engine, prompt: Prompt) -> list[int]:
    """The token ids the model runs for `prompt`: text tokenized, a chat rendered with the model's template
    (`InvalidRequestError` when it has none or rejects the conversation). Blocking: call it off the loop."""
    if prompt.text is not None:
        return engine.tokenize(prompt.text, prompt.add_special_tokens)
    if prompt.ids is not None:
        return list(prompt.ids)
    messages, tools = prompt.chat.template_inputs(getattr(engine.tokenizer, "chat_template", None))
    try:
        return engine.apply_chat_template(messages, tools)
    except InvalidRequestError:
        raise  # the model has no chat template
    except Exception as e:  # the template rejects the conversation (roles, order): the client's to fix
        raise InvalidRequestError("messages", f"the model's chat template rejected them: {e}") from e


async def _submitted(
    engine: Engine, request: GenerationRequest, max_new_tokens: int, rename: Callable[[str], str]
) -> AsyncIterator[GenerationEvent]:
    with renamed(rename):  # a grammar may fail on the way
        events = engine.submit(request, max_new_tokens)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event


async def _off_loop(executor: Executor, function: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(function, *args))


def _named(violations: Sequence[Violation], rename: Callable[[str], str]) -> list[Violation]:
    return [(rename(path), description) for path, description in violations]


@contextlib.contextmanager
def renamed(rename: Callable[[str], str]) -> Iterator[None]:
    """Re-raise an `InvalidRequestError` of the engine's (of the same class) with the front's field names."""
    try:
        yield
    except InvalidRequestError as e:
        raise type(e).from_violations(_named(e.violations, rename)) from e

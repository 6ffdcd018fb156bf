"""Request building: `GenerateParams` and the inputs (prompt, chat messages or token ids) to protos."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protos.textgen.v1 import textgen_pb2 as pb

Messages = Sequence[Mapping[str, str]]


@dataclass(slots=True)
class GenerateParams:
    """Everything about a generation request but its input; each field means what it does in textgen.proto.

    None leaves an optional proto field unset (the server's default: greedy, top_p 1, min_p 0,
    repetition_penalty 1, a random seed); max_new_tokens 0 is the server's default. At most one of
    `json_schema` (a dict, or its JSON text), `regex` and `choice` sets the response format.
    """

    max_new_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = None  # token id -> bias in [-100, 100], added to its logit
    stop_sequences: Sequence[str] = ()
    ignore_eos: bool = False
    priority: int = 0
    request_id: str = ""
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    json_schema: Mapping[str, Any] | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    n: int = 1  # completions wanted: `GenerationResult.completions`, `StreamChunk.index`

    def sampling(self) -> pb.SamplingParameters:
        sampling = pb.SamplingParameters(
            top_k=self.top_k,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=self.logit_bias,
        )
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "seed"):
            if getattr(self, name) is not None:
                setattr(sampling, name, getattr(self, name))
        return sampling

    def response_format(self) -> pb.ResponseFormat | None:
        """The response format, or None for unconstrained output; raises ValueError when several are given."""
        given = [name for name in ("json_schema", "regex", "choice") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex or choice, got {given}")
        if self.json_schema is not None:
            schema = self.json_schema
            return pb.ResponseFormat(json_schema=schema if isinstance(schema, str) else json.dumps(schema))
        if self.regex is not None:
            return pb.ResponseFormat(regex=self.regex)
        if self.choice is not None:
            return pb.ResponseFormat(choice=pb.ResponseFormat.Choice(choices=list(self.choice)))
        return None

    def stopping(self) -> pb.StoppingCriteria:
        return pb.StoppingCriteria(
            max_new_tokens=self.max_new_tokens,
            stop_sequences=list(self.stop_sequences),
            ignore_eos=self.ignore_eos,
        )


def chat_input(messages: Messages) -> pb.ChatInput:
    """`[{"role": "user", "content": "Hi"}, ...]` as a ChatInput."""
    return pb.ChatInput(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def generate_request(
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    input_ids: Sequence[int] | None = None,
    **fields: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest with exactly one input (a prompt, chat `messages` or `input_ids`) and `fields`, which
    are `GenerateParams` fields; raises ValueError when zero or several inputs are given."""
    params = GenerateParams(**fields)
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("input_ids", input_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages or input_ids, got {given or 'none'}")
    request = pb.GenerateRequest(
        request_id=params.request_id,
        sampling=params.sampling(),
        stopping=params.stopping(),
        priority=params.priority,
        top_logprobs=params.top_logprobs,
        prompt_logprobs=params.prompt_logprobs,
        response_format=params.response_format(),
        n=params.n,
    )
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.CopyFrom(chat_input(messages))
    else:
        request.input_ids.ids.extend(input_ids)
    return request


def tokenize_request(text: str | None, messages: Messages | None) -> pb.TokenizeRequest:
    """A TokenizeRequest for `text` or chat `messages` (exactly one)."""
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text or messages")
    if text is not None:
        return pb.TokenizeRequest(text=text)
    return pb.TokenizeRequest(chat=chat_input(messages))

"""Proto to engine objects and back; no policy lives here."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import duration_pb2

from engine.frontend.admission import Prompt
from engine.frontend.results import GenerationResult
from engine.request import (
    FinishReason,
    GenerationEvent,
    ResponseFormat,
    SamplingParams,
    StoppingParams,
    Timing,
    TokenInfo,
)
from protos.textgen.v1 import textgen_pb2 as pb
from service.grpc import tool_protos

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
}


def sampling_params(sampling: pb.SamplingParameters) -> SamplingParams:
    """Engine sampling parameters; unset optional fields take the engine's defaults."""
    params = SamplingParams(
        top_k=sampling.top_k,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        logit_bias=dict(sampling.logit_bias),
    )
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "seed"):
        if sampling.HasField(name):
            setattr(params, name, getattr(sampling, name))
    return params


def request_sampling(request: pb.GenerateRequest) -> SamplingParams:
    """The engine's sampling parameters of `request`: its `sampling`, plus what to report (log-probabilities),
    which the proto keeps at the request's top level."""
    params = sampling_params(request.sampling)
    params.top_logprobs = request.top_logprobs
    params.prompt_logprobs = request.prompt_logprobs
    if request.HasField("response_format"):
        params.response_format = response_format(request.response_format)
    else:
        params.response_format = tool_protos.response_format(request)  # a chat's tool calls, if any
    return params


def prompt(request: pb.GenerateRequest | pb.TokenizeRequest) -> Prompt:
    """The request's input for admission; a request without one has no token ids (its shape is refused)."""
    kind = request.WhichOneof("input")
    if kind in ("prompt", "text"):
        return Prompt(text=getattr(request, kind))
    if kind == "chat":
        return Prompt(chat=tool_protos.ProtoChat(request.chat))
    return Prompt(ids=list(request.input_ids.ids) if kind == "input_ids" else [])


def response_format(fmt: pb.ResponseFormat) -> ResponseFormat:
    """The engine's response format; an unset oneof gives an empty one, which the engine's limits refuse."""
    kind = fmt.WhichOneof("format")
    if kind == "choice":
        return ResponseFormat(choice=tuple(fmt.choice.choices))
    return ResponseFormat(**({kind: getattr(fmt, kind)} if kind else {}))


def stopping_params(stopping: pb.StoppingCriteria) -> StoppingParams:
    """Engine stopping parameters; max_new_tokens 0 stays 0, the engine's default."""
    return StoppingParams(
        max_new_tokens=stopping.max_new_tokens,
        stop_sequences=tuple(stopping.stop_sequences),
        ignore_eos=stopping.ignore_eos,
    )


def num_completions(request: pb.GenerateRequest) -> int:
    """GenerateRequest.n, where 0 (unset) means 1."""
    return request.n or 1


# SamplingParams fields that are GenerateRequest fields in the proto.
_REQUEST_LEVEL = ("sampling.top_logprobs", "sampling.prompt_logprobs", "sampling.response_format")


def proto_field(engine_field: str, input_kind: str) -> str:
    """The proto field path for an engine field path (engine/frontend/limits.py);
    `input_kind` is the input oneof.

    `sampling.*`, `stopping.*` and `request_id` are spelled alike on both sides, but for the request-level
    fields that the engine keeps with the sampling parameters (`_REQUEST_LEVEL`); the prompt is the input
    the client sent (`prompt`, `text`, `chat` or `input_ids`), `prompt_ids[i]` is `input_ids.ids[i]` when
    the client sent token ids, and a chat's `messages` are `chat.messages`.
    """
    name, bracket, index = engine_field.partition("[")
    if name == "sampling.response_format.lark":  # only ever the grammar of a chat's tool calls
        return "chat.tools"
    if name.startswith(_REQUEST_LEVEL):
        return engine_field.removeprefix("sampling.")
    if name == "messages":
        return f"chat.{engine_field}"
    if name not in ("prompt_ids", "prompt", "chat"):
        return engine_field
    if bracket and input_kind == "input_ids":
        return f"input_ids.ids[{index}"
    return input_kind


def proto_violations(violations: Sequence[tuple[str, str]], input_kind: str) -> list[tuple[str, str]]:
    """Engine `violations` with their fields named for the proto."""
    return [(proto_field(field, input_kind), description) for field, description in violations]


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def timing(t: Timing) -> pb.Timing:
    return pb.Timing(
        queue_duration=duration(t.queue_s),
        time_to_first_token=duration(t.time_to_first_token_s),
        total_duration=duration(t.total_s),
    )


def tokens(infos: Sequence[TokenInfo]) -> list[pb.Token]:
    return [
        pb.Token(
            id=t.id,
            text=t.text,
            logprob=t.logprob,
            special=t.special,
            top_logprobs=[pb.TopLogprob(id=a.id, text=a.text, logprob=a.logprob) for a in t.top_logprobs],
        )
        for t in infos
    ]


def usage(event: GenerationEvent | GenerationResult) -> pb.Usage:
    """The token counts of a completion's last event, or of the completion."""
    return pb.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cached_prompt_tokens=event.cached_prompt_tokens,
    )


def stream_response(event: GenerationEvent) -> pb.GenerateStreamResponse:
    """One stream message per engine event; the last also carries finish reason, usage and timing."""
    response = pb.GenerateStreamResponse(
        request_id=event.request_id,
        text=event.text,
        tokens=tokens(event.tokens),
        index=event.index,
        prompt_tokens=tokens(event.prompt_logprobs),
    )
    if event.finished:
        response.finish_reason = FINISH_REASONS[event.finish_reason]
        response.usage.CopyFrom(usage(event))
        if event.timing is not None:
            response.timing.CopyFrom(timing(event.timing))
    return response


def response(results: Sequence[GenerationResult]) -> pb.GenerateResponse:
    """The whole output of a finished request (engine/frontend/results.py): completion 0 at the top level,
    every completion in `completions`, the usage of them all, and the scored prompt (once: only completion
    0 scores it)."""
    completions = [completion(result) for result in results]
    first = completions[0]
    total = pb.Usage()
    total.CopyFrom(first.usage)
    total.completion_tokens = sum(c.usage.completion_tokens for c in completions)
    return pb.GenerateResponse(
        request_id=results[0].request_id,
        text=first.text,
        tokens=first.tokens,
        finish_reason=first.finish_reason,
        usage=total,
        timing=first.timing if first.HasField("timing") else None,
        completions=completions,
        prompt_tokens=tokens(results[0].prompt_logprobs),
    )


def completion(result: GenerationResult) -> pb.Completion:
    """One completion of a request."""
    return pb.Completion(
        index=result.index,
        text=result.text,
        tokens=tokens(result.tokens),
        finish_reason=FINISH_REASONS[result.finish_reason],
        usage=usage(result),
        timing=timing(result.timing) if result.timing is not None else None,
    )

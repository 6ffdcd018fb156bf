"""SMG's vLLM worker protocol (`vllm.grpc.engine`) to engine objects and back; no policy lives here.

The gateway tokenizes, renders chat templates and detokenizes itself: requests arrive as token ids and
responses carry token ids. Field semantics follow vLLM's own servicer of this protocol (unset temperature
is 1, top_p and repetition_penalty 0 mean off), so a gateway sees the same behaviour from either engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from opentelemetry import context as otel_context
from smg_grpc_proto import vllm_engine_pb2 as pb

from engine.frontend.admission import Admission, Prompt
from engine.frontend.engine import ModelInfo
from engine.frontend.results import GenerationResult
from engine.request import (
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    StoppingParams,
    TokenInfo,
)
from service.status import InvalidArgument, Unimplemented
from service.validation import MAX_REQUEST_ID_LENGTH

# What the engine has no use for, or cannot do, and says so instead of silently ignoring.
_UNSERVED_FIELDS = {
    "mm_inputs": "multimodal input: this server serves text models only",
    "extra_mm_inputs": "multimodal input: this server serves text models only",
    "media_refs": "multimodal input: this server serves text models only",
    "kv_transfer_params": "prefill/decode disaggregation: this server does not transfer KV caches",
}
# Engine field paths (engine/frontend/limits.py) to this protocol's.
_FIELDS = {
    "prompt_ids": "tokenized.input_ids",
    "prompt": "text",
    "stopping.max_new_tokens": "sampling_params.max_tokens",
    "stopping.stop_sequences": "sampling_params.stop",
    "sampling.top_logprobs": "sampling_params.logprobs",
    "n": "sampling_params.n",
}
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop"}


def admission(request: pb.GenerateRequest, model: ModelInfo, deadline: float | None) -> Admission:
    """What `request` asks of the engine; raises `Unimplemented` or `InvalidArgument` for what it cannot."""
    unserved(request)
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument([("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")])
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise InvalidArgument([("data_parallel_rank", "this server has one data-parallel rank, 0")])
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument([("input", "one of tokenized or text is required")])
    params = request.sampling_params
    generation = GenerationRequest(
        prompt_ids=[],
        sampling=sampling_params(params, model.eos_token_ids),
        stopping=stopping_params(params),
        request_id=request.request_id,
        deadline=deadline,
        trace_context=otel_context.get_current(),
        n=params.n or 1,
    )
    prompt = Prompt(text=request.text) if kind == "text" else Prompt(ids=list(request.tokenized.input_ids))
    return Admission(prompt, generation, field_name=proto_field)


def unserved(request: pb.GenerateRequest) -> None:
    """Raise `Unimplemented` for a request that needs what this server does not do (images, PD transfer)."""
    for name, why in _UNSERVED_FIELDS.items():
        if len(request.extra_mm_inputs) if name == "extra_mm_inputs" else request.HasField(name):
            raise Unimplemented(f"{name}: {why}")
    if request.HasField("kv_transfer_params_json"):
        raise Unimplemented(f"kv_transfer_params_json: {_UNSERVED_FIELDS['kv_transfer_params']}")


def sampling_params(params: pb.SamplingParams, eos_token_ids: Sequence[int]) -> SamplingParams:
    """The engine's sampling parameters; raises `InvalidArgument` for what the engine cannot honour."""
    violations = _unsupported(params, eos_token_ids)
    if violations:
        raise InvalidArgument(violations)
    sampling = SamplingParams(
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_k=params.top_k,
        top_p=params.top_p or 1.0,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty or 1.0,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        seed=params.seed if params.HasField("seed") else None,
        top_logprobs=max(params.logprobs, 0) if params.HasField("logprobs") else 0,
        prompt_logprobs=params.HasField("prompt_logprobs"),
        response_format=response_format(params),
    )
    return sampling


def _unsupported(params: pb.SamplingParams, eos_token_ids: Sequence[int]) -> list[tuple[str, str]]:
    """The fields set to something the engine does not do, each with why."""
    violations = []
    extra_stops = set(params.stop_token_ids) - set(eos_token_ids)
    if extra_stops or (params.stop_token_ids and params.ignore_eos):
        violations.append(("sampling_params.stop_token_ids", "only the model's EOS tokens stop here"))
    if params.min_tokens:
        violations.append(("sampling_params.min_tokens", "not supported; leave it 0"))
    if params.logit_bias:
        violations.append(("sampling_params.logit_bias", "not supported"))
    if params.HasField("truncate_prompt_tokens"):
        violations.append(("sampling_params.truncate_prompt_tokens", "not supported: send what to keep"))
    if params.HasField("seed") and params.seed < 0:
        violations.append(("sampling_params.seed", f"must be >= 0, got {params.seed}"))
    if params.HasField("logprobs") and params.logprobs < 0:
        violations.append(("sampling_params.logprobs", "must be >= 0 (all log-probabilities: not supported)"))
    if params.HasField("prompt_logprobs") and params.prompt_logprobs != 0:
        violations.append(("sampling_params.prompt_logprobs", "only 0 (each token's own) is supported"))
    if params.WhichOneof("constraint") in ("grammar", "structural_tag"):
        kind = params.WhichOneof("constraint")
        violations.append((f"sampling_params.{kind}", "not supported: use json_schema, regex or choice"))
    return violations


def response_format(params: pb.SamplingParams) -> ResponseFormat | None:
    kind = params.WhichOneof("constraint")
    if kind == "json_schema":
        return ResponseFormat(json_schema=params.json_schema)
    if kind == "json_object":
        return ResponseFormat(json_schema=json.dumps({"type": "object"}))
    if kind == "regex":
        return ResponseFormat(regex=params.regex)
    if kind == "choice":
        return ResponseFormat(choice=tuple(params.choice.choices))
    return None


def stopping_params(params: pb.SamplingParams) -> StoppingParams:
    """Unset max_tokens is the engine's default (0)."""
    return StoppingParams(
        max_new_tokens=params.max_tokens if params.HasField("max_tokens") else 0,
        stop_sequences=tuple(params.stop),
        ignore_eos=params.ignore_eos,
    )


def proto_field(engine_field: str) -> str:
    name, bracket, index = engine_field.partition("[")
    if name in _FIELDS:
        return _FIELDS[name] + bracket + index
    if name.startswith("sampling.response_format"):
        return "sampling_params.constraint"
    return "sampling_params." + name.split(".", 1)[-1] if "." in name else name


def chunk(
    event: GenerationEvent, prompt_ids: Sequence[int], params: pb.SamplingParams
) -> pb.GenerateResponse:
    """A streamed message: the event's new tokens (the gateway accumulates them)."""
    return pb.GenerateResponse(
        chunk=pb.GenerateStreamChunk(
            token_ids=[t.id for t in event.tokens],
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(event.tokens),
            cached_tokens=event.cached_prompt_tokens,
            output_logprobs=output_logprobs(event.tokens, params),
            input_logprobs=input_logprobs(event.prompt_logprobs, prompt_ids),
            index=event.index,
        )
    )


def complete(
    result: GenerationResult, prompt_ids: Sequence[int], params: pb.SamplingParams
) -> pb.GenerateResponse:
    """The last message of one completion: `result` is the fold of all of its events (unary) or of its last
    (streamed, as vLLM's servicer sends it)."""
    tokens = result.token_ids
    message = pb.GenerateComplete(
        output_ids=tokens,
        finish_reason=FINISH_REASONS[result.finish_reason],
        prompt_tokens=result.prompt_tokens or len(prompt_ids),
        completion_tokens=len(tokens),
        cached_tokens=result.cached_prompt_tokens,
        output_logprobs=output_logprobs(result.tokens, params),
        input_logprobs=input_logprobs(result.prompt_logprobs, prompt_ids),
        index=result.index,
    )
    if result.finish_reason is FinishReason.EOS and tokens:
        message.matched_token_id = tokens[-1]
    return pb.GenerateResponse(complete=message)


def output_logprobs(tokens: Sequence[TokenInfo], params: pb.SamplingParams) -> pb.OutputLogProbs | None:
    """The log-probabilities of `tokens`, when the request asked for them."""
    if not params.HasField("logprobs"):
        return None
    proto = pb.OutputLogProbs(token_logprobs=[t.logprob for t in tokens], token_ids=[t.id for t in tokens])
    if params.logprobs > 0:
        for t in tokens:
            proto.top_logprobs.append(top_logprobs(t.top_logprobs))
    return proto


def input_logprobs(scored: Sequence[TokenInfo], prompt_ids: Sequence[int]) -> pb.InputLogProbs | None:
    """The scored prompt (the first token has no log-probability), carried by a completion's first event."""
    if not scored:
        return None
    proto = pb.InputLogProbs(token_ids=list(prompt_ids[:1]), token_logprobs=[pb.InputTokenLogProb()])
    proto.top_logprobs.append(pb.TopLogProbs())
    for t in scored:
        proto.token_ids.append(t.id)
        proto.token_logprobs.append(pb.InputTokenLogProb(value=t.logprob))
        proto.top_logprobs.append(top_logprobs(t.top_logprobs))
    return proto


def top_logprobs(alternatives) -> pb.TopLogProbs:
    return pb.TopLogProbs(values=[a.logprob for a in alternatives], token_ids=[a.id for a in alternatives])

"""The textgen.v1 servicer: proto requests in, engine requests out, engine events back as protos."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context

from engine.frontend.admission import Admission, Prompt, prompt_ids, renamed
from engine.frontend.engine import Engine
from engine.frontend.results import fold
from engine.request import GenerationEvent, GenerationRequest
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from service.config import MIN_CLIENT_PING_INTERVAL_S, ServerConfig
from service.generations import Generations
from service.grpc import tool_protos, translate
from service.handlers import call_deadline
from service.security.auth import bearer_token
from service.security.tenancy import cache_tenant
from service.status import NotReady, abort
from service.validation import check_tokenize_request, generate_request_violations

log = logging.getLogger(__name__)


class TextGenerationServicer(pb_grpc.TextGenerationServiceServicer):
    """Serves textgen.v1 from the shared engine; until it is attached calls get UNAVAILABLE."""

    def __init__(self, config: ServerConfig, generations: Generations) -> None:
        self._config = config
        self._generations = generations

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        try:
            async with contextlib.aclosing(self._events(request, context, whole_answer=True)) as events:
                collected = [event async for event in events]
            response = await self._generations.off_loop(translate.response, fold(collected))  # stalls no call
            return self._chat_output(request).response(response)
        except Exception as e:
            await abort(context, e)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async with contextlib.aclosing(self._events(request, context)) as events:
                output = self._chat_output(request)
                async for event in events:
                    message = translate.stream_response(event)
                    output.stream_response(event, message)
                    yield message
        except Exception as e:
            await abort(context, e)

    def _chat_output(self, request: pb.GenerateRequest) -> tool_protos.ProtoChatOutput:
        return tool_protos.ProtoChatOutput(request, self._config.reasoning_parser == "think")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            engine, limits = self._generations.ready()
        except NotReady as e:
            await abort(context, e)
        info = engine.model_info
        return pb.GetModelInfoResponse(
            model_name=info.name,
            max_context_length=info.max_context_len,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            device=info.device,
            dtype=info.dtype,
            kv_block_size=info.kv_block_size,
            num_kv_blocks=info.num_kv_blocks,
            default_max_new_tokens=limits.default_max_new_tokens,
            max_new_tokens_limit=limits.max_new_tokens_limit,
            max_stop_sequences=limits.max_stop_sequences,
            max_stop_sequence_length=limits.max_stop_sequence_chars,
            max_prompt_chars=limits.max_prompt_chars,
            max_chat_messages=limits.max_chat_messages,
            max_request_bytes=self._config.max_request_bytes,
            max_metadata_bytes=self._config.max_metadata_bytes,
            min_keepalive_time=translate.duration(MIN_CLIENT_PING_INTERVAL_S),
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        try:
            engine, limits = self._generations.ready()
            with renamed(functools.partial(translate.proto_field, input_kind=request.WhichOneof("input"))):
                prompt = check_tokenize_request(request, limits)
                return await self._generations.off_loop(self._tokenize, engine, prompt)
        except Exception as e:
            await abort(context, e)

    @staticmethod
    def _tokenize(engine: Engine, prompt: Prompt) -> pb.TokenizeResponse:
        ids = prompt_ids(engine, prompt)
        return pb.TokenizeResponse(ids=ids, pieces=[engine.decode([i]) for i in ids])

    async def _events(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, whole_answer: bool = False
    ) -> AsyncIterator[GenerationEvent]:
        """Admit `request` and yield its engine events; however the call ends, the engine request ends."""
        admitted = await self._generations.admit(self._admission(request, context, whole_answer))
        async with contextlib.aclosing(admitted.events) as events:
            async for event in events:
                yield event

    def _admission(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, whole_answer: bool
    ) -> Admission:
        """What `request` asks of the engine, its shape's faults (service/validation.py) beside it."""
        kind = request.WhichOneof("input")
        generation = GenerationRequest(
            prompt_ids=[],
            sampling=translate.request_sampling(request),
            stopping=translate.stopping_params(request.stopping),
            priority=request.priority,
            request_id=request.request_id,
            deadline=call_deadline(context),
            trace_context=otel_context.get_current(),  # holds the server span: the engine's spans go under it
            n=translate.num_completions(request),
            cache_salt=request.cache_salt,
            cache_tenant=cache_tenant(self._config, bearer_token(context.invocation_metadata())),
            whole_answer=whole_answer,
        )
        return Admission(
            translate.prompt(request),
            generation,
            refusals=generate_request_violations(request),
            field_name=functools.partial(translate.proto_field, input_kind=kind),
        )

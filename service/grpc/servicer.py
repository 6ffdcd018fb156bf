"""The textgen.v1 servicer: proto requests in, engine requests out, engine events back as protos."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context

from engine.errors import InvalidRequestError
from engine.frontend.engine import Engine
from engine.frontend.limits import RequestLimits
from engine.request import GenerationEvent, GenerationRequest
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from service.chat.tools import chat_prompt_ids
from service.config import MIN_CLIENT_PING_INTERVAL_S, ServerConfig
from service.generations import Generations
from service.grpc import tool_protos, translate
from service.security.auth import bearer_token
from service.security.tenancy import cache_tenant
from service.status import InvalidArgument, NotReady, abort
from service.validation import check_generate_request, check_tokenize_request

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
            response = await self._generations.off_loop(translate.response, collected)  # stalls no call
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
            check_tokenize_request(request, limits)
            return await self._generations.off_loop(self._tokenize, engine, request)
        except Exception as e:
            await abort(context, e)

    @classmethod
    def _tokenize(cls, engine: Engine, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        if request.WhichOneof("input") == "text":
            ids = engine.tokenize(request.text)
        else:
            ids = cls._apply_chat_template(engine, request.chat)
        return pb.TokenizeResponse(ids=ids, pieces=[engine.decode([i]) for i in ids])

    async def _events(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, whole_answer: bool = False
    ) -> AsyncIterator[GenerationEvent]:
        """Submit `request` and yield its engine events; however the call ends, the engine request ends."""
        engine, limits = self._generations.ready()
        generation_request = await self._generation_request(engine, limits, request, context)
        generation_request.whole_answer = whole_answer
        try:
            if (response_format := generation_request.sampling.response_format) is not None:
                # Compiled (and cached) on a worker thread, so a big schema stalls neither loop.
                await self._generations.off_loop(engine.compile_response_format, response_format)
            async with contextlib.aclosing(self._generations.events(generation_request)) as events:
                async for event in events:
                    yield event
        except InvalidRequestError as e:
            raise translate.invalid_argument(e, request.WhichOneof("input")) from e

    async def _generation_request(
        self,
        engine: Engine,
        limits: RequestLimits,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> GenerationRequest:
        """The engine request for `request`; raises naming each field that can never be served."""
        check_generate_request(request, limits)
        kind = request.WhichOneof("input")
        if kind == "prompt":
            prompt_ids = await self._generations.off_loop(engine.tokenize, request.prompt)
        elif kind == "chat":
            prompt_ids = await self._generations.off_loop(self._apply_chat_template, engine, request.chat)
        else:
            prompt_ids = list(request.input_ids.ids)
        remaining = context.time_remaining()
        return GenerationRequest(
            prompt_ids=prompt_ids,
            sampling=translate.request_sampling(request),
            stopping=translate.stopping_params(request.stopping),
            priority=request.priority,
            request_id=request.request_id or uuid.uuid4().hex,
            deadline=None if remaining is None else time.monotonic() + remaining,
            trace_context=otel_context.get_current(),  # holds the server span: the engine's spans go under it
            n=translate.num_completions(request),
            cache_salt=request.cache_salt,
            cache_tenant=cache_tenant(self._config, bearer_token(context.invocation_metadata())),
        )

    @staticmethod
    def _apply_chat_template(engine: Engine, chat: pb.ChatInput) -> list[int]:
        try:
            return chat_prompt_ids(engine, tool_protos.turns(chat), tool_protos.tool_request(chat))
        except Exception as e:  # the template rejects the conversation (roles, order): the client's to fix
            raise InvalidArgument([("chat.messages", f"the model's chat template rejected them: {e}")]) from e

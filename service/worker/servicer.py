"""SMG's vLLM worker protocol (`vllm.grpc.engine.VllmEngine`, from the pinned `smg-grpc-proto`) on the
gRPC port beside textgen.v1: the Shepherd Model Gateway drives textgen replicas as it drives vLLM's.

The gateway tokenizes and renders chat templates itself (its tokenizer comes from `GetTokenizer`), sends
token ids and reads token ids back, polls `GetLoads` and mirrors each replica's prefix cache from
`SubscribeKvEvents` to route a prompt to the replica that holds its prefix. Multimodal input, KV
transfer between prefill and decode workers, embeddings and profiling have no meaning here: they answer
UNIMPLEMENTED (README: SMG).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from engine.core import kv_events
from engine.frontend.engine import Engine
from engine.frontend.limits import RequestLimits
from engine.frontend.results import fold
from service.generations import Generations
from service.status import InvalidArgument, NotReady, Unimplemented, abort
from service.worker import translate

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["VllmEngine"]
TOKENIZER_CHUNK_BYTES = 64 * 1024  # what SMG's own servicers send per GetTokenizer message
SERVER_TYPE = "textgen-grpc"  # vLLM's servicer says "vllm-grpc"
VERSION = "textgen 0.1.0"  # GetLoads' and HTTP /version's (vLLM's give its release)
FLUSH_TIMEOUT_S = 10.0  # the loop thread takes a flush at its next iteration: never this long while it runs


class VllmWorkerServicer(pb_grpc.VllmEngineServicer):
    """Serves `vllm.grpc.engine.VllmEngine` from the shared engine; until it is attached: UNAVAILABLE."""

    def __init__(self, generations: Generations) -> None:
        self._generations = generations
        self._started = time.monotonic()
        self._last_receive = 0.0
        self._tokenizer_bundle: tuple[bytes, str] | None = None

    # ---- generation -------------------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Streamed: one chunk per engine event and, when a completion ends, its complete message (with its
        last tokens again, as vLLM's servicer does). Unary: each completion's complete message at the end."""
        self._last_receive = time.time()
        try:
            engine, _ = self._generations.ready()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            admitted = await self._generations.admit(
                translate.admission(request, engine.model_info, deadline)
            )
            prompt_ids, params, collected = admitted.request.prompt_ids, request.sampling_params, []
            async with contextlib.aclosing(admitted.events) as events:
                async for event in events:
                    if request.stream:
                        yield translate.chunk(event, prompt_ids, params)
                        if event.finished:
                            yield translate.complete(fold([event])[0], prompt_ids, params)
                    else:
                        collected.append(event)
            for result in fold(collected):
                yield translate.complete(result, prompt_ids, params)
        except Exception as e:
            await abort(context, e)

    async def _ready(self, context: grpc.aio.ServicerContext) -> tuple[Engine, RequestLimits]:
        """The engine and its limits; the call ends with the status of `NotReady` while there is none."""
        try:
            return self._generations.ready()
        except Exception as e:
            await abort(context, e)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        """Cancel requests by id (unknown or finished ones are ignored); KV is freed at the next step."""
        engine, _ = await self._ready(context)
        for request_id in request.request_ids:
            engine.cancel(request_id)
        return pb.AbortResponse()

    # ---- what the gateway learns about the worker --------------------------------------------------------

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        """Healthy while serving; not while the model loads or the server drains."""
        try:
            self._generations.ready()
        except NotReady as e:
            return pb.HealthCheckResponse(healthy=False, message=str(e))
        if not self._generations.serving:
            return pb.HealthCheckResponse(healthy=False, message="the server is draining")
        return pb.HealthCheckResponse(healthy=True, message="serving")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        engine, limits = await self._ready(context)
        info = engine.model_info
        hf_config = getattr(engine.model_runner.model, "config", None)
        tokenizer = engine.tokenizer
        return pb.GetModelInfoResponse(
            model_path=info.name,
            is_generation=True,
            max_context_length=info.max_context_len,
            vocab_size=info.vocab_size,
            supports_vision=False,
            served_model_name=info.name,
            model_type=getattr(hf_config, "model_type", "") or "",
            architectures=getattr(hf_config, "architectures", None) or [],
            eos_token_ids=info.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id or 0,
            bos_token_id=tokenizer.bos_token_id or 0,
            max_req_input_len=limits.max_context_len - 1,  # room for at least one new token
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        engine, _ = await self._ready(context)
        info = engine.model_info
        return pb.GetServerInfoResponse(
            active_requests=self._generations.num_in_flight,
            is_paused=not self._generations.serving,
            last_receive_timestamp=self._last_receive,
            uptime_seconds=time.monotonic() - self._started,
            server_type=SERVER_TYPE,
            data_parallel_size=1,
            kv_cache_dtype=info.dtype,
            block_size=info.kv_block_size,
            attention_backend=engine.config.attention_backend,
            model_dtype=info.dtype,
            max_num_seqs=engine.config.batch.max_batch_size,
        )

    async def GetLoads(
        self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLoadsResponse:
        """The engine's load as its metrics gauges read it (textgen_queue_size, textgen_batch_size,
        textgen_kv_cache_usage_ratio), for its one data-parallel rank."""
        try:
            engine, _ = self._generations.ready()
            if request.HasField("dp_rank") and request.dp_rank != 0:
                raise InvalidArgument([("dp_rank", "this server has one data-parallel rank, 0")])
        except Exception as e:
            await abort(context, e)
        return pb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version=VERSION,
            dp_rank_count=1,
            loads=[scheduler_load(engine)],
        )

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        """The served tokenizer as a zip of its Hugging Face files (the chat template with them), in chunks;
        the last carries the SHA-256 of the whole zip."""
        try:
            engine, _ = self._generations.ready()
            if self._tokenizer_bundle is None:
                self._tokenizer_bundle = await self._generations.off_loop(tokenizer_bundle, engine)
        except Exception as e:
            await abort(context, e)
        data, sha256 = self._tokenizer_bundle
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = start + TOKENIZER_CHUNK_BYTES
            yield common_pb2.GetTokenizerChunk(
                data=data[start:end], sha256=sha256 if end >= len(data) else ""
            )

    # ---- the prefix cache --------------------------------------------------------------------------------

    async def SubscribeKvEvents(
        self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        """The prefix cache's events as numbered batches, after `start_sequence_number` (0: from the first
        batch while the history holds it, else from a snapshot of the index numbered as the last batch: one
        `KvSnapshotChunk`, as SMG's relay serves one). A cursor this process cannot serve (from an earlier
        process, or older than the history) is refused OUT_OF_RANGE before the stream opens, and a
        subscriber that falls behind the history mid-stream ends DATA_LOSS: on either, SMG drops what it
        knew of this worker and subscribes from 0 (its kv_event_monitor.rs treats OUT_OF_RANGE only as the
        call's answer; as a stream error it would retry the same cursor forever)."""
        try:
            engine, _ = self._generations.ready()
            if not engine.config.prefix_caching:
                raise Unimplemented("prefix caching is off on this server (--no-prefix-caching)")
        except Exception as e:
            await abort(context, e)
        events, cursor = engine.kv_events, request.start_sequence_number
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: the server is stopping
                loop.call_soon_threadsafe(wake.set)

        events.subscribe(notify)  # before the first read: a batch published after it wakes the loop below
        try:
            batches = await first_batches(events, cursor, context)
            await context.send_initial_metadata(())  # the subscriber's call resolves before the first batch
            while True:
                for batch in batches:
                    message = kv_event_batch(batch, events.block_size)
                    message.load.CopyFrom(engine_load(scheduler_load(engine), sample=batch.sequence_number))
                    yield message
                    cursor = batch.sequence_number
                await wake.wait()
                wake.clear()
                batches = events.since(cursor)
                if batches is None:
                    await context.abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"KV event {cursor + 1} is no longer held (last: {events.last_sequence_number}); "
                        "subscribe from 0",
                    )
        finally:
            events.unsubscribe(notify)

    async def FlushCache(
        self, request: common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.FlushCacheResponse:
        """Drop the prefix cache's index at the loop's next iteration; requests keep their blocks."""
        engine, _ = await self._ready(context)
        try:
            num_blocks = await asyncio.wait_for(
                asyncio.wrap_future(engine.clear_prefix_cache()), FLUSH_TIMEOUT_S
            )
        except TimeoutError:
            return common_pb2.FlushCacheResponse(success=False, message="the engine loop did not answer")
        return common_pb2.FlushCacheResponse(success=True, message=f"dropped {num_blocks} cached blocks")

    # ---- no meaning here ---------------------------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        await abort(context, Unimplemented("Embed: this server serves generation only"))

    async def StartProfile(
        self, request: common_pb2.StartProfileRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ProfileResponse:
        await abort(context, Unimplemented("StartProfile: no profiler here; use OpenTelemetry traces"))

    async def StopProfile(
        self, request: common_pb2.StopProfileRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ProfileResponse:
        await abort(context, Unimplemented("StopProfile: no profiler here; use OpenTelemetry traces"))


def scheduler_load(engine: Engine) -> pb.SchedulerLoad:
    """The engine's load now, read as the metrics gauges read it: from the loop's last snapshot."""
    load, block_size = engine.load, engine.model_info.kv_block_size
    used_blocks, num_blocks = load.num_used_kv_blocks, load.num_kv_blocks
    running, waiting = load.num_running, load.num_waiting
    return pb.SchedulerLoad(
        dp_rank=0,
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_total_reqs=running + waiting,
        num_used_tokens=used_blocks * block_size,
        max_total_num_tokens=num_blocks * block_size,
        token_usage=load.kv_usage,
        max_running_requests=engine.config.batch.max_batch_size,
    )


def engine_load(load: pb.SchedulerLoad, sample: int) -> common_pb2.EngineLoad:
    """The load record SMG takes with each KV-event batch (then it need not poll `GetLoads` while events
    flow): `GetLoads`' numbers, read when the batch is sent."""
    return common_pb2.EngineLoad(
        running_requests=load.num_running_reqs,
        waiting_requests=load.num_waiting_reqs,
        token_usage=load.token_usage,
        max_running_requests=load.max_running_requests,
        sample=sample,
        num_used_tokens=load.num_used_tokens,
        max_total_num_tokens=load.max_total_num_tokens,
    )


async def first_batches(
    events: kv_events.KvEventLog, cursor: int, context: grpc.aio.ServicerContext
) -> list[kv_events.KvEventBatch]:
    """What a subscription after `cursor` starts with: the batches after it, or from 0 once the history lost
    the first batch, a snapshot of the index. A cursor this process cannot serve ends the call OUT_OF_RANGE
    before the stream opens (the answer SMG takes as "start over")."""
    batches = events.since(cursor)
    if batches is not None:
        return batches
    if cursor != 0:
        await context.abort(
            grpc.StatusCode.OUT_OF_RANGE,
            f"KV event {cursor} is not in this server's history (it holds up to "
            f"{events.last_sequence_number}); subscribe from 0",
        )
    return [events.snapshot()]


def kv_event_batch(batch: kv_events.KvEventBatch, block_size: int) -> common_pb2.KvEventBatch:
    """SMG's message for one batch: block hashes as signed 64-bit ids (the first 8 bytes of the engine's
    SHA-256 prefix hash), each stored block with its tokens, which SMG's index hashes itself."""
    proto = common_pb2.KvEventBatch(
        sequence_number=batch.sequence_number, timestamp=batch.timestamp, dp_rank=0
    )
    if batch.snapshot:  # one chunk: a clear, then every cached block; live batches follow its number
        num_blocks = sum(len(e.block_hashes) for e in batch.events if isinstance(e, kv_events.BlocksStored))
        proto.snapshot.CopyFrom(common_pb2.KvSnapshotChunk(index=0, count=1, blocks=num_blocks))
    for event in batch.events:
        message = proto.events.add(event_id=0)
        if isinstance(event, kv_events.BlocksStored):
            stored = message.stored
            if event.parent_hash is not None:
                stored.parent_block_hash = block_id(event.parent_hash)
            for i, block_hash in enumerate(event.block_hashes):
                tokens = event.token_ids[i * block_size : (i + 1) * block_size]
                stored.blocks.add(block_hash=block_id(block_hash), token_ids=tokens, block_size=block_size)
            stored.tier = common_pb2.KV_CACHE_TIER_DEVICE
            stored.locality = common_pb2.KV_CACHE_LOCALITY_LOCAL
        elif isinstance(event, kv_events.BlocksRemoved):
            message.removed.block_hashes.extend(block_id(h) for h in event.block_hashes)
            message.removed.tier = common_pb2.KV_CACHE_TIER_DEVICE
            message.removed.locality = common_pb2.KV_CACHE_LOCALITY_LOCAL
        else:
            message.cleared.SetInParent()
    return proto


def block_id(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "big", signed=True)


def tokenizer_bundle(engine: Engine) -> tuple[bytes, str]:
    """The tokenizer's files (and the model's config files, which SMG reads special tokens from) as a zip,
    and its SHA-256 in hex; written by transformers, so a GGUF model's tokenizer is served too."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        engine.tokenizer.save_pretrained(tmp)
        model = engine.model_runner.model
        for part in ("config", "generation_config"):
            with contextlib.suppress(AttributeError, TypeError, ValueError):  # lean models may lack one
                getattr(model, part).save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            bundle.write(path, path.name)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()

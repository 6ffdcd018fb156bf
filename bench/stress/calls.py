"""Client calls for the stress scenarios: every call's outcome as a value, whatever status it ended with."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

GREEDY_CHECK = pb.GenerateRequest(
    prompt="The quick brown fox", stopping=pb.StoppingCriteria(max_new_tokens=16, ignore_eos=True)
)


@dataclass(slots=True)
class Outcome:
    """How one call ended: its status code's name, when, and what it returned."""

    code: str
    latency_s: float
    token_ids: list[int] = field(default_factory=list)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    retry_delay_s: float | None = None  # the RetryInfo delay the server attached, if any
    reason: str = ""  # the ErrorInfo reason the server attached, if any
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def request(ids: list[int], max_new_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    """Greedy, EOS ignored: exactly `max_new_tokens` new tokens when it succeeds."""
    return pb.GenerateRequest(
        request_id=request_id,
        input_ids=pb.TokenIds(ids=ids),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


async def stream(
    stub: pb_grpc.TextGenerationServiceStub,
    message: pb.GenerateRequest,
    timeout_s: float | None,
    cancel_after_messages: int | None = None,
    cancel_after_s: float | None = None,
    cancel_on: asyncio.Event | None = None,
    on_first_message: Callable[[], object] | None = None,
) -> Outcome:
    """Run a GenerateStream call to its end, cancelling it after so many messages or seconds, or once
    `cancel_on` is set, if asked; `on_first_message` is called when the first message arrives."""
    start = time.monotonic()
    outcome = Outcome("", 0.0)
    call = stub.GenerateStream(message, timeout=timeout_s)
    timer = None
    if cancel_after_s is not None:
        timer = asyncio.get_running_loop().call_later(cancel_after_s, call.cancel)
    if cancel_on is not None:
        timer = asyncio.ensure_future(cancel_on.wait())
        timer.add_done_callback(lambda _: call.cancel())
    try:
        received = 0
        async for response in call:
            outcome.token_ids += [t.id for t in response.tokens]
            outcome.finish_reason = response.finish_reason
            received += 1
            if received == 1 and on_first_message is not None:
                on_first_message()
            if received == cancel_after_messages:
                call.cancel()
    except grpc.aio.AioRpcError as error:
        _fill_error(outcome, error)
    except asyncio.CancelledError:
        if not call.cancelled():  # this task was cancelled, not the call
            raise
    finally:
        if timer is not None:
            timer.cancel()
    outcome.code = outcome.code or (await call.code()).name
    outcome.latency_s = time.monotonic() - start
    return outcome


async def unary(
    stub: pb_grpc.TextGenerationServiceStub, message: pb.GenerateRequest, timeout_s: float | None
) -> Outcome:
    """Run a Generate call."""
    start = time.monotonic()
    outcome = Outcome("OK", 0.0)
    try:
        response = await stub.Generate(message, timeout=timeout_s)
        outcome.token_ids = [t.id for t in response.tokens]
        outcome.finish_reason = response.finish_reason
    except grpc.aio.AioRpcError as error:
        _fill_error(outcome, error)
    outcome.latency_s = time.monotonic() - start
    return outcome


def _fill_error(outcome: Outcome, error: grpc.aio.AioRpcError) -> None:
    outcome.code = error.code().name
    outcome.details = error.details() or ""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else []:
        retry_info, error_info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
        if detail.Unpack(retry_info):
            outcome.retry_delay_s = retry_info.retry_delay.ToNanoseconds() / 1e9
        elif detail.Unpack(error_info):
            outcome.reason = error_info.reason


async def serving(target: str) -> tuple[str, str, list[int]]:
    """The health status, and the code and tokens of a short greedy Generate: is the server answering?"""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            health = health_pb2.HealthCheckResponse.ServingStatus.Name((await check).status)
        except grpc.aio.AioRpcError as error:
            health = error.code().name
        outcome = await unary(pb_grpc.TextGenerationServiceStub(channel), GREEDY_CHECK, timeout_s=60)
    return health, outcome.code, outcome.token_ids


def prompt_ids(rng: random.Random, length: int) -> list[int]:
    """`length` random token ids of ordinary (not special) tokens."""
    return [rng.randrange(100, 10_000) for _ in range(length)]

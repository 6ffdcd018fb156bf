"""Stress scenarios that load an in-process server: overload, cancellations, deadlines, memory pressure.

Each starts its own server (`bench.stress.inprocess`), sends its traffic over gRPC on loopback, then checks
what every call ended with and what the engine holds afterwards.
"""

from __future__ import annotations

import asyncio
import math
import random

import grpc

from bench.stress.calls import Outcome, prompt_ids, request, serving, stream, unary
from bench.stress.inprocess import InProcessServer
from bench.stress.report import ScenarioResult, by_count, p99
from engine.batching import BatchConfig
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

IDLE = "afterwards queue 0, batch 0, KV blocks all free"
SERVING = "then SERVING and answering"


async def check_after(result: ScenarioResult, server: InProcessServer) -> None:
    """The checks every scenario ends with: the engine idle with its KV blocks back, health, an answer."""
    state, settle_s = await server.settle()
    result.check(IDLE, state.idle, state)
    health, code, _ = await serving(server.target)
    result.check(SERVING, health == "SERVING" and code == "OK", f"health {health}, Generate {code}")
    result.figures["idle after"] = f"{settle_s:.2f} s"


async def overload(
    model: str, num_streams: int = 200, max_new_tokens: int = 32, timeout_s: float = 300.0
) -> ScenarioResult:
    """`num_streams` streams at once against `--max-queue-size 8 --max-batch-size 4`."""
    result = ScenarioResult(f"overload: {num_streams} streams at once, --max-queue-size 8 --max-batch-size 4")
    rng = random.Random(0)
    async with InProcessServer(model, max_queue_size=8, batch=BatchConfig(max_batch_size=4)) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            messages = [
                request(prompt_ids(rng, rng.randint(8, 64)), max_new_tokens) for _ in range(num_streams)
            ]
            outcomes = await asyncio.gather(*(stream(stub, m, timeout_s) for m in messages))
        codes = [o.code for o in outcomes]
        served = [o for o in outcomes if o.ok]
        refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
        result.check(
            "every call OK or RESOURCE_EXHAUSTED", set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, by_count(codes)
        )
        result.check(
            "the queue overflowed: some calls served, some refused", served and refused, by_count(codes)
        )
        result.check(
            "every RESOURCE_EXHAUSTED is QUEUE_FULL with RetryInfo",
            all(o.retry_delay_s and o.reason == "QUEUE_FULL" for o in refused),
            by_count(
                f"{o.reason or 'no reason'}, {'with' if o.retry_delay_s else 'no'} RetryInfo" for o in refused
            ),
        )
        short = [len(o.token_ids) for o in served if len(o.token_ids) != max_new_tokens]
        result.check("every OK stream got all its tokens", not short, f"token counts {short[:10]}")
        await check_after(result, server)
    result.figures = {
        "calls": by_count(codes),
        "p99 OK": p99(o.latency_s for o in served),
        "p99 refusal": p99(o.latency_s for o in refused),
        **result.figures,
    }
    return result


async def cancellation_storm(
    model: str, num_streams: int = 1000, concurrency: int = 100, seed: int = 0
) -> ScenarioResult:
    """`num_streams` streams cancelled at random points: while queued, part-way through a chunked prefill
    (prompts of 600-1500 tokens, `--max-batch-tokens 256`), or after 1-30 streamed messages."""
    result = ScenarioResult(f"cancellation storm: {num_streams} streams, {concurrency} at a time")
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    batch = BatchConfig(max_batch_size=16, max_batch_tokens=256)
    async with InProcessServer(model, batch=batch) as server:
        _, code_before, greedy_before = await serving(server.target)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)

            async def one(
                i: int, plan: str, message: pb.GenerateRequest, cancel: dict[str, float]
            ) -> Outcome:
                async with limit:
                    if plan != "prefill":
                        return await stream(stub, message, 600, **cancel)
                    message.request_id = f"prefill-{i}"
                    admitted, cancel_on = server.observer.admission(message.request_id), asyncio.Event()

                    async def cancel_after_admission() -> None:
                        await admitted.wait()
                        await asyncio.sleep(cancel["after_admission_s"])
                        cancel_on.set()

                    watch = asyncio.ensure_future(cancel_after_admission())
                    try:
                        return await stream(stub, message, 600, cancel_on=cancel_on)
                    finally:
                        watch.cancel()

            calls = [_storm_call(rng) for _ in range(num_streams)]
            outcomes = await asyncio.gather(*(one(i, *call) for i, call in enumerate(calls)))
        codes = [o.code for o in outcomes]
        result.check(
            "every call CANCELLED (or OK, done first)", set(codes) <= {"CANCELLED", "OK"}, by_count(codes)
        )
        phases = {
            phase: n
            for (error, phase), n in server.observer.failed_in_phase.items()
            if error == "RequestCancelledError"
        }
        result.check(
            "cancels landed while queued, mid-prefill and mid-decode",
            all(phases.get(p) for p in ("queued", "prefill", "decode")),
            phases,
        )
        await check_after(result, server)
        _, code_after, greedy_after = await serving(server.target)
        result.check(
            "a greedy request returns the same tokens as before",
            code_before == code_after == "OK" and greedy_before == greedy_after,
            f"before {code_before} {greedy_before}, after {code_after} {greedy_after}",
        )
    cancels = ", ".join(f"{phase} {phases.get(phase, 0)}" for phase in ("queued", "prefill", "decode"))
    result.figures = {"calls": by_count(codes), "cancels applied by phase": cancels, **result.figures}
    return result


def _storm_call(rng: random.Random) -> tuple[str, pb.GenerateRequest, dict[str, float]]:
    """One stream of the storm, its plan, and when to cancel it: soon after sending (it is queued
    behind the others), shortly after the server admits it (a long prompt is still being prefilled in
    chunks), or after some streamed messages (decoding)."""
    plan = rng.choice(["queued", "prefill", "decode"])
    if plan == "queued":
        return (
            plan,
            request(prompt_ids(rng, rng.randint(8, 64)), 64),
            {"cancel_after_s": rng.uniform(0, 0.02)},
        )
    if plan == "prefill":
        message = request(prompt_ids(rng, rng.randint(600, 1500)), 64)
        return plan, message, {"after_admission_s": rng.uniform(0, 0.02)}
    message = request(prompt_ids(rng, rng.randint(8, 64)), 256)
    return plan, message, {"cancel_after_messages": rng.randint(1, 30)}


def _deadline_band(deadline_s: float) -> str:
    return (
        "<10ms"
        if deadline_s < 0.01
        else "<100ms"
        if deadline_s < 0.1
        else "<1s"
        if deadline_s < 1
        else ">=1s"
    )


async def deadlines(model: str, num_calls: int = 300, max_deadline_s: float = 5.0) -> ScenarioResult:
    """`num_calls` calls at once (half streams), deadlines log-uniform from 1 ms to `max_deadline_s`."""
    result = ScenarioResult(f"deadlines: {num_calls} calls at once, deadlines 1 ms to {max_deadline_s:g} s")
    rng = random.Random(0)
    async with InProcessServer(model, batch=BatchConfig(max_batch_size=16)) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            calls, deadlines_s, lengths = [], [], []
            for _ in range(num_calls):
                deadlines_s.append(10 ** rng.uniform(-3, math.log10(max_deadline_s)))
                lengths.append(rng.randint(8, 128))
                message = request(prompt_ids(rng, rng.randint(8, 256)), lengths[-1])
                send = stream if rng.random() < 0.5 else unary
                calls.append(send(stub, message, deadlines_s[-1]))
            outcomes = await asyncio.gather(*calls)
        codes = [o.code for o in outcomes]
        result.check(
            "every call OK or DEADLINE_EXCEEDED", set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, by_count(codes)
        )
        early = [
            f"{o.latency_s * 1000:.1f} ms of {d * 1000:.1f} ms"
            for o, d in zip(outcomes, deadlines_s, strict=True)
            if o.code == "DEADLINE_EXCEEDED" and o.latency_s < d - 0.01
        ]
        result.check("DEADLINE_EXCEEDED never before the deadline", not early, early[:5])
        short = [
            len(o.token_ids) for o, n in zip(outcomes, lengths, strict=True) if o.ok and len(o.token_ids) != n
        ]
        result.check("every OK call got all its tokens", not short, short[:10])
        await check_after(result, server)
    bands: dict[str, list[Outcome]] = {}
    for o, d in zip(outcomes, deadlines_s, strict=True):
        bands.setdefault(_deadline_band(d), []).append(o)
    ok_by_band = ", ".join(
        f"{band} {sum(o.ok for o in bands.get(band, []))}/{len(bands.get(band, []))}"
        for band in ("<10ms", "<100ms", "<1s", ">=1s")
    )
    result.figures = {
        "calls": by_count(codes),
        "OK by deadline": ok_by_band,
        "p99 OK": p99(o.latency_s for o in outcomes if o.ok),
        **result.figures,
    }
    return result


async def memory_pressure(
    model: str,
    num_requests: int = 16,
    prompt_len: int = 100,
    max_new_tokens: int = 80,
    num_kv_blocks: int = 24,
    deadlock_timeout_s: float = 300.0,
) -> ScenarioResult:
    """`num_requests` requests at once whose prompts and outputs together need many times the KV pool
    (`--num-kv-blocks`, 16 tokens each); each alone fits."""
    pool_tokens = num_kv_blocks * 16
    need = num_requests * (prompt_len + max_new_tokens)
    result = ScenarioResult(
        f"memory pressure: {num_requests} requests needing {need} KV tokens, pool {pool_tokens} "
        f"(--num-kv-blocks {num_kv_blocks})"
    )
    rng = random.Random(0)
    messages = [request(prompt_ids(rng, prompt_len), max_new_tokens) for _ in range(num_requests)]
    async with InProcessServer(
        model, num_kv_blocks=num_kv_blocks, batch=BatchConfig(max_batch_size=8)
    ) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            alone = [await unary(stub, m, deadlock_timeout_s) for m in messages]
            tasks = [asyncio.ensure_future(stream(stub, m, deadlock_timeout_s)) for m in messages]
            done, pending = await asyncio.wait(tasks, timeout=deadlock_timeout_s)
            result.check(
                f"no deadlock: all done within {deadlock_timeout_s:g} s",
                not pending,
                f"{len(pending)} pending; {server.state()}",
            )
            for task in pending:
                task.cancel()
            together = [t.result() for t in tasks if t in done]
        codes = [o.code for o in together]
        complete = [o for o in together if o.ok and len(o.token_ids) == max_new_tokens]
        result.check(
            "every request completes with all its tokens", len(complete) == num_requests, by_count(codes)
        )
        same = [a.token_ids == t.token_ids for a, t in zip(alone, together, strict=False)]
        result.check(
            "greedy outputs as when run alone",
            all(same) and all(a.ok for a in alone),
            f"{same.count(False)} differ",
        )
        result.check(
            "preemption happened", server.observer.num_preemptions > 0, "no preemption: the test is too small"
        )
        await check_after(result, server)
    result.figures = {
        "preemptions": str(server.observer.num_preemptions),
        "calls": by_count(codes),
        "p99": p99(o.latency_s for o in together),
        **result.figures,
    }
    return result

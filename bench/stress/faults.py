"""Engine fault injection in an in-process server: a step that raises, a row that cannot be sampled.

The hooks are test hooks on the objects of this process, not server flags: `FaultyRunner` stands in for the
engine core's runner and makes one chosen step raise; a row whose logits are NaN is injected the way the
engine's own tests do it, through `ModelRunner.run`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import torch

from bench.stress.calls import Outcome, prompt_ids, request, serving, stream
from bench.stress.inprocess import InProcessServer
from bench.stress.load import IDLE, SERVING
from bench.stress.report import ScenarioResult, by_count
from engine.batching import BatchConfig
from engine.core.scheduler import Scheduler
from engine.core.step import Step, StepOutput
from engine.execution.model_runner import ModelRunner
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

POISON = [900, 901, 902, 903]  # a prompt starting with these gets NaN logits


class FaultyRunner:
    """The engine's runner, except that the first step `fail_when` picks raises; remembers its request ids."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.fail_when: Callable[[Step], bool] | None = None
        self.failed_request_ids: set[str] = set()

    def execute(self, step: Step) -> StepOutput:
        if self.fail_when is not None and self.fail_when(step):
            self.fail_when = None
            sequences = self.scheduler.sequences
            self.failed_request_ids = {sequences[row.seq_id].id for row in step.rows}
            raise RuntimeError("injected fault")
        return self.runner.execute(step)

    def close(self) -> None:
        self.runner.close()


def _poisoned(run: Callable) -> Callable:
    """`ModelRunner.run` giving NaN logits to every input whose tokens start with `POISON`."""

    def poisoned_run(inputs, is_prefill: bool) -> torch.Tensor:
        logits = run(inputs, is_prefill)
        sampled = [item for item in inputs if item.sample]
        for i, item in enumerate(sampled):
            if item.token_ids[: len(POISON)] == POISON:
                logits[i] = float("nan")
        return logits

    return poisoned_run


async def _started(tasks: dict[str, asyncio.Task], first: dict[str, asyncio.Event], ids: list[str]) -> None:
    """Wait until each of `ids` has streamed its first message (or ended)."""
    while not all(first[i].is_set() or tasks[i].done() for i in ids):
        await asyncio.sleep(0.01)


def _exactly(outcomes: dict[str, Outcome], failed: set[str], max_new_tokens: int) -> tuple[bool, str]:
    """Whether the calls in `failed` ended INTERNAL / ENGINE_FAULT and every other one completed; the
    evidence."""
    code, reason = "INTERNAL", "ENGINE_FAULT"
    wrong = {i: f"{o.code} {o.reason}" for i, o in outcomes.items() if (o.code == code) != (i in failed)}
    wrong |= {i: f"{o.code} {o.reason}" for i, o in outcomes.items() if o.code == code and o.reason != reason}
    short = {i: len(o.token_ids) for i, o in outcomes.items() if o.ok and len(o.token_ids) != max_new_tokens}
    evidence = f"step rows {sorted(failed)}; wrong {wrong}; short {short}"
    return bool(failed) and not wrong and not short, evidence


async def engine_faults(model: str, max_new_tokens: int = 48) -> ScenarioResult:
    """Three faults in turn on one server (`--max-batch-size 4`): a decode step raises while 4 more requests
    wait; a prefill step raises while 3 requests decode; one row of a batch of 4 gets NaN logits."""
    result = ScenarioResult("engine faults: a decode step raises, a prefill step raises, a NaN row")
    rng = random.Random(0)
    all_outcomes: list[Outcome] = []
    async with InProcessServer(model, batch=BatchConfig(max_batch_size=4)) as server:
        engine = server.engine
        faulty = FaultyRunner(engine.model_runner, engine.core.scheduler)
        engine.core.runner = faulty
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            first: dict[str, asyncio.Event] = {}
            tasks: dict[str, asyncio.Task] = {}

            def start(request_id: str, ids: list[int]) -> None:
                first[request_id] = asyncio.Event()
                message = request(ids, max_new_tokens, request_id)
                call = stream(stub, message, 300, on_first_message=first[request_id].set)
                tasks[request_id] = asyncio.ensure_future(call)

            async def outcomes(ids: list[str]) -> dict[str, Outcome]:
                done = dict(zip(ids, await asyncio.gather(*(tasks[i] for i in ids)), strict=True))
                all_outcomes.extend(done.values())
                return done

            # 1. Eight requests, four running: the next decode step raises.
            faulty.fail_when = lambda step: not step.is_prefill
            batch = [f"decode-{i}" for i in range(8)]
            for request_id in batch:
                start(request_id, prompt_ids(rng, 16))
            passed, evidence = _exactly(await outcomes(batch), faulty.failed_request_ids, max_new_tokens)
            result.check(
                "a raising decode step: its rows INTERNAL (ENGINE_FAULT), the rest complete",
                passed,
                evidence,
            )

            # 2. Three requests decoding: the next prefill step, a newcomer's, raises.
            bystanders = [f"bystander-{i}" for i in range(3)]
            for request_id in bystanders:
                start(request_id, prompt_ids(rng, 16))
            await _started(tasks, first, bystanders)
            faulty.fail_when = lambda step: step.is_prefill
            start("newcomer", prompt_ids(rng, 16))
            done = await outcomes([*bystanders, "newcomer"])
            passed, evidence = _exactly(done, faulty.failed_request_ids, max_new_tokens)
            result.check(
                "a raising prefill step: its rows INTERNAL (ENGINE_FAULT), the rest complete",
                passed,
                evidence,
            )

            # 3. Four requests in one batch, one of them poisoned: its row gets NaN logits.
            runner = engine.model_runner
            runner.run = _poisoned(ModelRunner.run.__get__(runner))
            try:
                batch = [f"healthy-{i}" for i in range(3)]
                for request_id in batch:
                    start(request_id, prompt_ids(rng, 16))
                start("poisoned", POISON + prompt_ids(rng, 12))
                done = await outcomes([*batch, "poisoned"])
            finally:
                del runner.run
            passed, evidence = _exactly(done, {"poisoned"}, max_new_tokens)
            result.check("a row that cannot be sampled: it alone INTERNAL (ENGINE_FAULT)", passed, evidence)

        state, settle_s = await server.settle()
        result.check(IDLE, state.idle, state)
        health, code, _ = await serving(server.target)
        result.check(SERVING, health == "SERVING" and code == "OK", f"health {health}, Generate {code}")
    result.figures = {"calls": by_count(o.code for o in all_outcomes), "idle after": f"{settle_s:.2f} s"}
    return result

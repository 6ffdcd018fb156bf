"""Bystanders under adversarial grammars: plain greedy streams alone, then beside a steady flood of
structured-output requests whose grammars go over the grammar engine's limits while generating.

The plain streams must get the same tokens both times, every adversarial call must end INVALID_ARGUMENT
(GRAMMAR_TOO_COMPLEX) on its own, and the plain streams' time per output token is reported both times.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import grpc

from bench.stress.calls import Outcome, prompt_ids, request, stream
from bench.stress.inprocess import InProcessServer
from bench.stress.load import check_after
from bench.stress.report import ScenarioResult, by_count
from engine.batching import BatchConfig
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

ADVERSARIAL_REGEX = "(a|aa){300,3000}b"  # compiles; its first "a" needs more lexer than the limits allow
ADVERSARIAL_FORMATS = (
    pb.ResponseFormat(regex=ADVERSARIAL_REGEX),
    pb.ResponseFormat(
        json_schema=json.dumps(
            {
                "type": "object",
                "properties": {"s": {"type": "string", "pattern": f"^{ADVERSARIAL_REGEX}$"}},
                "required": ["s"],
            }
        )
    ),
)
MAX_SLOWDOWN = 1.5  # the bound on a bystander's time per token beside adversarial neighbours
SLOWDOWN_CHECK = f"bystanders' time per token within {MAX_SLOWDOWN:g}x of alone"  # a timing: make stress only


async def _timed_stream(
    stub: pb_grpc.TextGenerationServiceStub, message: pb.GenerateRequest
) -> tuple[Outcome, float]:
    """A stream's outcome and its time per output token after the first."""
    first: list[float] = []
    outcome = await stream(stub, message, 600, on_first_message=lambda: first.append(time.monotonic()))
    end = time.monotonic()
    tokens = len(outcome.token_ids)
    return outcome, (end - first[0]) / (tokens - 1) if first and tokens > 1 else float("nan")


async def bystanders_under_adversarial_grammars(
    model: str, num_plain: int = 4, max_new_tokens: int = 96, num_neighbours: int = 2
) -> ScenarioResult:
    """`num_plain` greedy streams alone, then beside `num_neighbours` adversarial requests at all times
    (each one that fails is replaced at once), on one server (`--max-batch-size 8`)."""
    result = ScenarioResult(
        f"bystanders under adversarial grammars: {num_plain} greedy streams, {num_neighbours} adversarial "
        "neighbours at all times"
    )
    rng = random.Random(0)
    messages = [request(prompt_ids(rng, 32), max_new_tokens) for _ in range(num_plain)]
    async with InProcessServer(model, batch=BatchConfig(max_batch_size=8)) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            alone = await asyncio.gather(*(_timed_stream(stub, m) for m in messages))

            neighbours: list[Outcome] = []
            plain_done = asyncio.Event()

            async def neighbour(i: int) -> None:
                while not plain_done.is_set():
                    message = pb.GenerateRequest(
                        input_ids=pb.TokenIds(ids=prompt_ids(rng, 16)),
                        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens),
                        response_format=ADVERSARIAL_FORMATS[(i + len(neighbours)) % len(ADVERSARIAL_FORMATS)],
                    )
                    neighbours.append(await stream(stub, message, 600))

            flood = [asyncio.ensure_future(neighbour(i)) for i in range(num_neighbours)]
            try:
                beside = await asyncio.gather(*(_timed_stream(stub, m) for m in messages))
            finally:
                plain_done.set()
                await asyncio.gather(*flood)

        plain = [o for o, _ in alone + beside]
        result.check("every plain stream OK", all(o.ok for o in plain), by_count(o.code for o in plain))
        same = [a.token_ids == b.token_ids for (a, _), (b, _) in zip(alone, beside, strict=True)]
        result.check("the plain streams' tokens are the same beside the neighbours", all(same), same)
        reasons = [f"{o.code} {o.reason}" for o in neighbours]
        result.check(
            "every adversarial call INVALID_ARGUMENT GRAMMAR_TOO_COMPLEX",
            neighbours and set(reasons) == {"INVALID_ARGUMENT GRAMMAR_TOO_COMPLEX"},
            by_count(reasons),
        )
        before = statistics.median(t for _, t in alone)
        after = statistics.median(t for _, t in beside)
        result.check(
            SLOWDOWN_CHECK,
            after <= MAX_SLOWDOWN * before,
            f"{after * 1000:.1f} ms vs {before * 1000:.1f} ms",
        )
        await check_after(result, server)
    result.figures = {
        "time per token alone": f"{before * 1000:.1f} ms",
        "beside adversarial neighbours": f"{after * 1000:.1f} ms ({after / before:.2f}x)",
        "adversarial calls": by_count(reasons),
        **result.figures,
    }
    return result

"""Bystanders under adversarial grammars: plain greedy streams alone, beside a steady flow of plain short
requests, then beside a steady flow of structured-output requests of the same size whose grammars go over the
grammar engine's limits while generating.

Every adversarial request carries a grammar of its own (an attacker varies it: a format that already failed
is refused at admission, before it costs anything), so each one is admitted, prefilled and sits in the batch
beside the bystanders until its grammar fails. The plain neighbours are the same requests without the grammar
(one output token): what the adversarial ones may cost the bystanders is what a request of their size costs,
and the bound is on the difference. The plain streams must get the same tokens in all three phases, and every
adversarial call must end INVALID_ARGUMENT (GRAMMAR_TOO_COMPLEX) on its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable

import grpc

from bench.stress.calls import Outcome, prompt_ids, request, stream
from bench.stress.inprocess import InProcessServer
from bench.stress.load import check_after
from bench.stress.report import ScenarioResult, by_count
from engine.batching import BatchConfig
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc

ADVERSARIAL_REGEX = "(a|aa){%d,3000}b"  # compiles; its first "a" needs more lexer than the limits allow


def adversarial_format(k: int) -> pb.ResponseFormat:
    """The `k`-th adversarial format: a regex or a JSON schema whose leaf string carries one, each `k` a new
    grammar."""
    regex = ADVERSARIAL_REGEX % (300 + k // 2)
    if k % 2 == 0:
        return pb.ResponseFormat(regex=regex)
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": f"^{regex}$"}},
        "required": ["s"],
    }
    return pb.ResponseFormat(json_schema=json.dumps(schema))


MAX_SLOWDOWN = 1.5  # the bound on a bystander's time per token beside adversarial neighbours
# A timing: make stress only. The reference is the same flow of neighbours without their grammars.
SLOWDOWN_CHECK = (
    f"bystanders' time per token beside adversarial neighbours within {MAX_SLOWDOWN:g}x of plain ones"
)


async def _timed_stream(
    stub: pb_grpc.TextGenerationServiceStub, message: pb.GenerateRequest
) -> tuple[Outcome, float]:
    """A stream's outcome and its time per output token after the first."""
    first: list[float] = []
    outcome = await stream(stub, message, 600, on_first_message=lambda: first.append(time.monotonic()))
    end = time.monotonic()
    tokens = len(outcome.token_ids)
    return outcome, (end - first[0]) / (tokens - 1) if first and tokens > 1 else float("nan")


async def _beside(
    stub: pb_grpc.TextGenerationServiceStub,
    messages: list[pb.GenerateRequest],
    num_neighbours: int,
    neighbour_message: Callable[[], pb.GenerateRequest],
) -> tuple[list[tuple[Outcome, float]], list[Outcome]]:
    """The plain streams of `messages`, with `num_neighbours` requests from `neighbour_message` in flight
    at all times (each one that ends is replaced at once); the streams' outcomes and times, and the
    neighbours' outcomes."""
    neighbours: list[Outcome] = []
    plain_done = asyncio.Event()

    async def neighbour() -> None:
        while not plain_done.is_set():
            neighbours.append(await stream(stub, neighbour_message(), 600))

    flood = [asyncio.ensure_future(neighbour()) for _ in range(num_neighbours)]
    try:
        streams = await asyncio.gather(*(_timed_stream(stub, m) for m in messages))
    finally:
        plain_done.set()
        await asyncio.gather(*flood)
    return streams, neighbours


async def bystanders_under_adversarial_grammars(
    model: str, num_plain: int = 4, max_new_tokens: int = 96, num_neighbours: int = 2
) -> ScenarioResult:
    """`num_plain` greedy streams alone, then beside `num_neighbours` plain one-token requests at all times,
    then beside as many adversarial ones of the same size, on one server (`--max-batch-size 8`)."""
    result = ScenarioResult(
        f"bystanders under adversarial grammars: {num_plain} greedy streams, {num_neighbours} adversarial "
        "neighbours at all times"
    )
    rng = random.Random(0)
    messages = [request(prompt_ids(rng, 32), max_new_tokens) for _ in range(num_plain)]
    formats = itertools.count()

    def plain_neighbour() -> pb.GenerateRequest:
        return request(prompt_ids(rng, 16), 1)

    def adversarial_neighbour() -> pb.GenerateRequest:
        return pb.GenerateRequest(
            input_ids=pb.TokenIds(ids=prompt_ids(rng, 16)),
            stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens),
            response_format=adversarial_format(next(formats)),
        )

    async with InProcessServer(model, batch=BatchConfig(max_batch_size=8)) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            alone = await asyncio.gather(*(_timed_stream(stub, m) for m in messages))
            beside_plain, plain_neighbours = await _beside(stub, messages, num_neighbours, plain_neighbour)
            beside, neighbours = await _beside(stub, messages, num_neighbours, adversarial_neighbour)

        phases = (alone, beside_plain, beside)
        plain = [o for phase in phases for o, _ in phase] + plain_neighbours
        result.check(
            "every plain stream and plain neighbour OK",
            all(o.ok for o in plain),
            by_count(o.code for o in plain),
        )
        same = [
            a.token_ids == b.token_ids == c.token_ids for (a, _), (b, _), (c, _) in zip(*phases, strict=True)
        ]
        result.check("the plain streams' tokens are the same in every phase", all(same), same)
        reasons = [f"{o.code} {o.reason}" for o in neighbours]
        result.check(
            "every adversarial call INVALID_ARGUMENT GRAMMAR_TOO_COMPLEX",
            neighbours and set(reasons) == {"INVALID_ARGUMENT GRAMMAR_TOO_COMPLEX"},
            by_count(reasons),
        )
        before, reference, after = (statistics.median(t for _, t in phase) for phase in phases)
        result.check(
            SLOWDOWN_CHECK,
            after <= MAX_SLOWDOWN * reference,
            f"{after * 1000:.1f} ms vs {reference * 1000:.1f} ms",
        )
        await check_after(result, server)
    result.figures = {
        "time per token alone": f"{before * 1000:.1f} ms",
        "beside plain neighbours": f"{reference * 1000:.1f} ms ({reference / before:.2f}x; "
        f"{len(plain_neighbours)} calls)",
        "beside adversarial neighbours": f"{after * 1000:.1f} ms ({after / reference:.2f}x of beside plain)",
        "adversarial calls": by_count(reasons),
        **result.figures,
    }
    return result

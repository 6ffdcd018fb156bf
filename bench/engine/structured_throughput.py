"""Structured output's speed on the engine, offline: one JSON-schema stream alone, then 4 constrained and 4
plain streams at once (tok/s of each kind), SmolLM2 with its defaults; each repeat's numbers as JSON.

`python -m bench.engine.structured_throughput [--repeats N]`. Run it in two trees one after the other for a
before/after: each number is a whole generation's output tokens over its time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from engine.frontend.engine import Engine, EngineConfig
from engine.request import ResponseFormat, SamplingParams, StoppingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "bio": {"type": "string"},
    },
    "required": ["name", "age", "email", "tags", "bio"],
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine.structured_throughput", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = Engine(EngineConfig())
    engine.start()
    constrained = SamplingParams(response_format=ResponseFormat(json_schema=json.dumps(SCHEMA)))
    stop, plain_stop = StoppingParams(max_new_tokens=96), StoppingParams(max_new_tokens=96, ignore_eos=True)
    prompts = [engine.tokenize(f"Write a JSON profile of person number {i}:") for i in range(8)]
    engine.generate([prompts[0]], constrained, stop)  # the grammar compiled, the kernels warm
    out: dict[str, list[float]] = {"alone": [], "together_constrained": [], "together_plain": []}
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = engine.generate([prompts[1]], constrained, stop)
            out["alone"].append(result[0].completion_tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            samplings = [constrained] * 4 + [SamplingParams()] * 4
            results = engine.generate(prompts, samplings, [stop] * 4 + [plain_stop] * 4)
            elapsed = time.perf_counter() - start
            out["together_constrained"].append(sum(r.completion_tokens for r in results[:4]) / elapsed)
            out["together_plain"].append(sum(r.completion_tokens for r in results[4:]) / elapsed)
    finally:
        engine.shutdown()
    print(json.dumps({**out, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()

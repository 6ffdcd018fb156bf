"""Stress scenario for tool calls: N streamed `tool_choice: required` (or named) chats over varied schemas,
each call's streamed arguments parsed and validated against its function's schema.

    python -m bench.stress.tool_calls --count 1000                 # starts a server on the default model
    python -m bench.stress.tool_calls --count 1000 --model DIR     # another model
    python -m bench.stress.tool_calls --count 1000 --random-weights  # 2 random layers, SmolLM2's tokenizer
    python -m bench.stress.tool_calls --base-url http://host:8000/v1 --count 1000   # a running server

It counts correctness, not speed: requests, calls, arguments that fail to parse or to validate (the
grammar should make that 0), and calls cut short by max_tokens (the last of an answer that ran out of
tokens: incomplete, not invalid). The schemas are drawn from a seeded generator: strings (bounded, enums,
integers and numbers with ranges, booleans, arrays, nested objects, optional fields. A random-weight model
is the harshest case: it goes wherever the grammar lets it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import jsonschema
import openai

from bench.server import ServerProcess, free_port
from engine.execution.loader import default_model_dir

WORDS = ("city", "date", "count", "query", "unit", "limit", "tags", "filter", "user", "price", "open", "when")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of one value, drawn from the kinds tools use."""
    kinds = ["string", "enum", "integer", "number", "boolean", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([4, 8, 16, 32])}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b", "north", "south", "celsius", "fahrenheit", 1, 2, True], 3)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 1000}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 4)}
    return object_schema(rng, depth + 1)


def object_schema(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {name: random_schema(rng, depth) for name in names},
        "required": [name for name in names if rng.random() < 0.7],
        "additionalProperties": False,
    }


def random_tools(rng: random.Random) -> list[dict]:
    names = rng.sample(["search", "get_weather", "book", "lookup", "convert", "send_mail"], rng.randint(1, 3))
    return [
        {
            "type": "function",
            "function": {"name": n, "description": f"{n} something", "parameters": object_schema(rng)},
        }
        for n in names
    ]


@dataclass(slots=True)
class Counts:
    """What the run found."""

    requests: int = 0
    failed_requests: int = 0
    calls: int = 0
    cut_short: int = 0  # the last call of an answer that ran out of max_tokens
    unparsable: int = 0
    invalid: int = 0
    unknown_name: int = 0


async def one_call(
    client: openai.AsyncOpenAI, model: str, index: int, seed: int, max_tokens: int, counts: Counts
):
    rng = random.Random(seed * 1_000_003 + index)
    tools = random_tools(rng)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    named = rng.random() < 0.3
    tool_choice = (
        {"type": "function", "function": {"name": rng.choice(list(schemas))}} if named else "required"
    )
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Use the tools for request {index}."}],
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=rng.random() < 0.5,
            stream=True,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=index,
        )
        calls: dict[int, dict] = {}
        finish_reason = None
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            finish_reason = choice.finish_reason or finish_reason
            for call in choice.delta.tool_calls or []:
                if call.id is not None:
                    calls[call.index] = {"name": call.function.name, "arguments": ""}
                calls[call.index]["arguments"] += call.function.arguments or ""
    except openai.APIError as e:
        counts.requests += 1
        counts.failed_requests += 1
        print(f"request {index} failed: {e}")
        return
    counts.requests += 1
    for position, call in enumerate(calls.values()):
        if finish_reason == "length" and position == len(calls) - 1:
            counts.cut_short += 1
            continue
        counts.calls += 1
        if call["name"] not in schemas:
            counts.unknown_name += 1
            continue
        try:
            arguments = json.loads(call["arguments"])
        except json.JSONDecodeError:
            counts.unparsable += 1
            print(f"request {index}: unparsable arguments {call['arguments']!r}")
            continue
        if not jsonschema.Draft202012Validator(schemas[call["name"]]).is_valid(arguments):
            counts.invalid += 1
            print(f"request {index}: arguments {arguments!r} do not validate against {schemas[call['name']]}")


async def run(base_url: str, count: int, concurrency: int, seed: int, max_tokens: int) -> Counts:
    counts = Counts()
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(index: int) -> None:
            async with semaphore:
                await one_call(client, model, index, seed, max_tokens, counts)

        await asyncio.gather(*(bounded(i) for i in range(count)))
    return counts


def random_weights_model(directory: Path) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer (as the tests'), saved in `directory`."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000, help="streamed requests to send")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schema generator")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--base-url", help="a running server's /v1 URL; unset: start one")
    parser.add_argument("--model", help="the model of the server this starts (default: the server's)")
    parser.add_argument("--random-weights", action="store_true", help="serve a tiny random-weight model")
    args = parser.parse_args()
    if args.base_url:
        counts = asyncio.run(run(args.base_url, args.count, args.concurrency, args.seed, args.max_tokens))
    else:
        http_port = free_port()
        server_args = ["--http-port", str(http_port), "--metrics-port", "0"]
        work = Path(tempfile.mkdtemp(prefix="textgen-tool-calls-"))
        model = str(random_weights_model(work / "model")) if args.random_weights else args.model
        server_args += ["--model", model] if model else []
        log = work / "server.log"
        with ServerProcess(server_args, log):
            url = f"http://127.0.0.1:{http_port}/v1"
            counts = asyncio.run(run(url, args.count, args.concurrency, args.seed, args.max_tokens))
    print(json.dumps(asdict(counts), indent=2))


if __name__ == "__main__":
    main()

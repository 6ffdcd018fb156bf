"""How long structured output's grammars take: compiling a big JSON schema, a cached compile, and masks.

`python -m bench.engine.grammar_compile [--properties N]` compiles a schema of N properties (strings, numbers,
enums, arrays of objects: the shape of a large tool or form schema) for the default model's tokenizer,
the way the server does on its worker threads, then walks a valid output token by token, timing each
next-token mask (the work the engine's loop thread does per constrained row and step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from transformers import AutoTokenizer

from engine.core.structured import GrammarCompiler
from engine.execution.loader import default_model_dir
from engine.request import ResponseFormat


def big_schema(num_properties: int) -> dict:
    """An object schema of `num_properties` properties of assorted types, half of them required."""
    item = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "tag": {"enum": ["a", "b", "c"]},
            "score": {"type": "number"},
        },
        "required": ["id"],
    }
    kinds = [
        {"type": "string", "maxLength": 40},
        {"type": "number"},
        {"enum": ["x", "y", "z"]},
        {"type": "array", "items": item},
    ]
    properties = {f"field_{i}": kinds[i % len(kinds)] for i in range(num_properties)}
    return {"type": "object", "properties": properties, "required": list(properties)[::2]}


def sample_output(schema: dict) -> str:
    """A compact JSON value that validates against `big_schema`'s output: its required fields only."""
    values = {"string": "hello", "number": 1.5}
    out = {}
    for name in schema["required"]:
        kind = schema["properties"][name]
        out[name] = (
            kind["enum"][0]
            if "enum" in kind
            else [{"id": 1}]
            if kind["type"] == "array"
            else values[kind["type"]]
        )
    return json.dumps(out, separators=(",", ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--properties", type=int, default=200, help="properties in the schema (default 200)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    schema = big_schema(args.properties)
    text = json.dumps(schema)
    print(f"schema: {args.properties} properties, {len(text)} characters")

    start = time.perf_counter()
    compiler.compile(ResponseFormat(regex="warm"))  # builds the tokenizer's token trie (once per server)
    print(f"tokenizer set-up (once): {1000 * (time.perf_counter() - start):.0f} ms")
    start = time.perf_counter()
    compiler.compile(ResponseFormat(json_schema=text))
    print(f"compile: {1000 * (time.perf_counter() - start):.1f} ms")
    start = time.perf_counter()
    matcher = compiler.matcher(ResponseFormat(json_schema=text))
    print(f"cached compile + per-request matcher: {1000 * (time.perf_counter() - start):.3f} ms")

    masks = []
    for token_id in tokenizer(sample_output(schema), add_special_tokens=False).input_ids:
        start = time.perf_counter()
        allowed = matcher.allowed()
        masks.append(time.perf_counter() - start)
        assert allowed is not None and allowed[token_id]
        matcher.accept(token_id)
    print(
        f"next-token mask over {len(masks)} tokens: median {1000 * statistics.median(masks):.3f} ms, "
        f"max {1000 * max(masks):.3f} ms"
    )


if __name__ == "__main__":
    main()

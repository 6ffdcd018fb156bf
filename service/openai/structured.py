"""A body's structured-output parameters: OpenAI's `response_format` or vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `structured_outputs`, as the engine's `ResponseFormat`."""

from __future__ import annotations

import json

from engine.request import ResponseFormat
from service.openai.json_body import BodyFields

# vLLM's structured-output parameters: `guided_*` at the top level, or the keys of `structured_outputs`.
_GUIDED = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice"}


def response_format(fields: BodyFields, params: dict[str, str]) -> ResponseFormat | None:
    """OpenAI's `response_format` (`json_schema`, `json_object`, `text`) or vLLM's guided fields: at most one.

    Each engine field of the format is named as the parameter it came from, so that a schema or regex that
    does not compile is a 400 naming it.
    """
    given: list[tuple[str, str, object]] = []  # (parameter, kind: json | regex | choice, value)
    response_format = fields.get("response_format", dict, "an object")
    if response_format is not None:
        given += _openai_response_format(fields, response_format)
    for kind, name in _GUIDED.items():
        if fields.body.get(name) is not None:
            given.append((name, kind, fields.body[name]))
    structured = fields.get("structured_outputs", dict, "an object")
    for name in sorted(structured or ()):
        if name in _GUIDED:
            given.append((f"structured_outputs.{name}", name, structured[name]))
        else:
            fields.violations.append((f"structured_outputs.{name}", "is not supported"))
    if len(given) > 1:
        names = ", ".join(name for name, _, _ in given)
        fields.violations.append((given[1][0], f"only one structured output is allowed, got {names}"))
        return None
    if not given:
        return None
    name, kind, value = given[0]
    engine_field = {"json": "json_schema", "regex": "regex", "choice": "choice.choices"}[kind]
    params["sampling.response_format"] = name
    params[f"sampling.response_format.{engine_field}"] = name
    if kind == "json":
        if isinstance(value, str):  # vLLM's guided_json may be the schema's JSON text
            return ResponseFormat(json_schema=value)
        if not isinstance(value, dict | bool):
            fields.violations.append((name, "must be a JSON schema (an object)"))
            return None
        return ResponseFormat(json_schema=json.dumps(value))
    if kind == "regex":
        if not isinstance(value, str):
            fields.violations.append((name, "must be a string"))
            return None
        return ResponseFormat(regex=value)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        fields.violations.append((name, "must be a list of strings"))
        return None
    return ResponseFormat(choice=tuple(value))


def _openai_response_format(fields: BodyFields, value: dict) -> list[tuple[str, str, object]]:
    """`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; `{"type": "json_object"}`: any
    JSON object; `{"type": "text"}`: no constraint."""
    kind = value.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json", {"type": "object"})]
    if kind != "json_schema":
        fields.violations.append(("response_format.type", "must be one of json_schema, json_object or text"))
        return []
    json_schema = value.get("json_schema")
    if not isinstance(json_schema, dict):
        fields.violations.append(("response_format.json_schema", "must be an object with a schema"))
        return []
    unknown = sorted(set(json_schema) - {"name", "description", "schema", "strict"})
    fields.violations += [(f"response_format.json_schema.{name}", "is not supported") for name in unknown]
    schema = json_schema.get("schema")
    if schema is None:  # OpenAI's schema is optional: none is any JSON
        schema = {}
    return [("response_format.json_schema.schema", "json", schema)]

"""A request body read as strict JSON (UTF-8, no NaN or Infinity, text that is Unicode, bounded nesting),
and its parameters read by type (`BodyFields`).

Whatever a client sends, reading it ends in a body or in a 400 error (`MalformedRequest`, or
`InvalidArgument` naming the parameter where there is one), never in an exception that the server would
report as its own fault: a string with a lone surrogate (`"\\ud800"` is valid JSON, but no tokenizer or
encoder takes it) or a body nested thousands deep (Python's JSON decoder recurses) are refused here, once,
before any other code sees them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

from aiohttp import web

from engine.frontend.limits import Violation
from service.status import InvalidArgument, MalformedRequest

MAX_JSON_DEPTH = 64  # nested arrays and objects: far more than any request or JSON schema needs
MAX_REPORTED = 10  # violations listed (the status shows 10 at most anyway)
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded str: only from a \\uXXXX escape of half a pair


async def read_json_body(request: web.Request, timeout_s: float) -> object:
    """The body as strict JSON (`parse_json_body`); 408 when it takes over `timeout_s` to arrive (a
    connection held by a trickle)."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="the request body took too long to arrive") from None
    return parse_json_body(raw)


def parse_json_body(data: bytes) -> object:
    """The JSON value of `data`; raises `MalformedRequest` when it is not JSON, `InvalidArgument` when a
    string in it is not Unicode text or it nests deeper than `MAX_JSON_DEPTH`."""
    try:
        body = json.loads(data.decode(), parse_constant=_refuse_constant)
    except RecursionError as e:
        raise MalformedRequest(f"the body nests deeper than {MAX_JSON_DEPTH} arrays and objects") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise MalformedRequest(f"the body is not JSON: {e}") from e
    violations = _violations(body)
    if violations:
        raise InvalidArgument(violations)
    return body


class BodyFields:
    """Typed reads of a body's parameters; a wrong type is recorded in `violations`, the default returned.

    JSON null is the same as leaving a parameter out.
    """

    def __init__(self, body: dict, max_tokens_name: str = "max_tokens") -> None:
        self.body = body
        self.violations: list[Violation] = []
        self.max_tokens_name = max_tokens_name  # the parameter that bounds the new tokens

    def get(self, name: str, kinds: type | tuple[type, ...], rule: str) -> object | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            value = None  # JSON true is not a number
        if not isinstance(value, kinds):
            self.violations.append((name, f"must be {rule}"))
            return None
        return value

    def number(self, name: str, default: float) -> float:
        value = self.get(name, (int, float), "a number")
        if isinstance(value, int) and abs(value) > 2**53:  # JSON integers have no bound; floats do
            value = math.inf  # out of every range: the engine's rule names it
        return default if value is None else float(value)

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.get(name, int, "an integer")
        if value is not None and not minimum <= value <= maximum:
            self.violations.append((name, f"must be in [{minimum}, {maximum}], got {value}"))
            return default
        return default if value is None else value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, bool, "true or false")
        return default if value is None else value

    def string(self, name: str) -> str | None:
        return self.get(name, str, "a string")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _violations(body: object) -> list[Violation]:
    """Strings that are not Unicode text, and values nested too deep, by parameter path
    (`messages[0].content`); iterative, so that no body can exhaust the stack."""
    violations: list[Violation] = []
    stack: list[tuple[object, str, int]] = [(body, "", 0)]
    while stack and len(violations) < MAX_REPORTED:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                violations.append((path or "body", "is not valid Unicode text (a lone surrogate)"))
            continue
        if not isinstance(value, dict | list):
            continue
        if depth == MAX_JSON_DEPTH:
            violations.append((path or "body", f"nests deeper than {MAX_JSON_DEPTH} arrays and objects"))
            continue
        if isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in reversed(list(enumerate(value))))
            continue
        for key, item in reversed(value.items()):
            name = f"{path}.{_printable(key)}" if path else _printable(key)
            if _SURROGATE.search(key):
                violations.append((name, "is not valid Unicode text (a lone surrogate in a name)"))
                continue
            stack.append((item, name, depth + 1))
    return violations


def _printable(text: str) -> str:
    """`text` with lone surrogates written as `\\udXXX` escapes, so that it can be encoded and shown."""
    return text.encode("utf-8", "backslashreplace").decode()

"""A request body read as strict JSON: UTF-8, no NaN or Infinity, text that is Unicode, bounded nesting.

Whatever a client sends, reading it ends in a body or in a 400 error (`MalformedRequest`, or
`InvalidArgument` naming the parameter where there is one), never in an exception that the server would
report as its own fault: a string with a lone surrogate (`"\\ud800"` is valid JSON, but no tokenizer or
encoder takes it) or a body nested thousands deep (Python's JSON decoder recurses) are refused here, once,
before any other code sees them.
"""

from __future__ import annotations

import json
import re

from engine.frontend.limits import Violation
from service.status import InvalidArgument, MalformedRequest

MAX_JSON_DEPTH = 64  # nested arrays and objects: far more than any request or JSON schema needs
MAX_REPORTED = 10  # violations listed (the status shows 10 at most anyway)
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded str: only from a \\uXXXX escape of half a pair


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

"""Benchmark output: markdown tables, number formatting, and strict JSON."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence


def fmt(value: float | str | None, digits: int = 2) -> str:
    """A table cell: `-` for missing values, fixed `digits` decimals for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table with columns padded to line up in a terminal."""
    cells = [list(map(str, headers)), *([fmt(v) if not isinstance(v, str) else v for v in r] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _finite(value: object) -> object:
    """`value` with every infinite float (an all-at-once request rate) replaced by the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(value: object) -> str:
    """Strict JSON (no Infinity), indented for reading."""
    return json.dumps(_finite(value), indent=1, allow_nan=False)


def environment(load_before: float) -> dict:
    """Versions and the machine's load: a benchmark on a busy machine measures the other work too."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def load_note(env: dict) -> str:
    """One line on the machine's 1-minute load average, with a warning when other work competed."""
    busy = env["load_average_before"] > 0.5 * (env["cpu_count"] or 1)  # after includes this benchmark itself
    return (
        f"load average {env['load_average_before']:.1f} before, {env['load_average_after']:.1f} after, on "
        f"{env['cpu_count']} CPUs"
        + ("; other processes were busy: numbers are not comparable" if busy else "")
    )

"""The sweep's figure: throughput and TTFT / TPOT percentiles against offered load, one line per server."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter


def _log_label(value: float, _position: int) -> str:
    """Plain numbers (0.2, not 2 x 10^-1) on log axes, only at 1, 2 and 5 times a power of ten."""
    lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if lead in (1, 2, 5) else ""


PLAIN = FuncFormatter(_log_label)

# (rate in req/s, summary as `Summary.to_dict()`) for each point of one server's sweep.
SweepPoints = Sequence[tuple[float, Mapping]]


def x_positions(rates: Sequence[float]) -> tuple[list[float], list[str]]:
    """Where each rate goes on the x axis; an infinite rate (all at once) sits one step past the largest."""
    finite = sorted(r for r in rates if not math.isinf(r))
    beyond = finite[-1] * 2 if finite else 1.0
    return [beyond if math.isinf(r) else r for r in rates], [
        "all" if math.isinf(r) else f"{r:g}" for r in rates
    ]


def plot_sweep(results: Mapping[str, SweepPoints], path: Path, title: str = "") -> None:
    """Write a PNG with three panels: output throughput, TTFT p50/p99, TPOT p50/p99, against request rate."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [
        (axes[0], "output throughput (tok/s)", [("output_throughput", None, "-")]),
        (axes[1], "TTFT (s)", [("ttft_s", "p50", "-"), ("ttft_s", "p99", "--")]),
        (axes[2], "TPOT (s)", [("tpot_s", "p50", "-"), ("tpot_s", "p99", "--")]),
    ]
    all_rates = sorted({rate for points in results.values() for rate, _ in points})
    ticks, labels = x_positions(all_rates)
    for i, (name, points) in enumerate(results.items()):
        color = f"C{i}"
        xs, _ = x_positions([rate for rate, _ in points])
        for ax, _, series in panels:
            for key, pct, style in series:
                ys = [s[key] if pct is None else s[key][pct] for _, s in points]
                ys = [math.nan if y is None else y for y in ys]
                label = name if pct is None else f"{name} {pct}"
                ax.plot(xs, ys, style, color=color, marker="o", label=label)
    for ax, ylabel, _ in panels:
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlabel("offered load (req/s; all = all at once)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1:]:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(PLAIN)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

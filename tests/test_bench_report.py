"""Tests for the benchmark's output: markdown tables, strict JSON, the sweep's rates and its plot."""

from __future__ import annotations

import json
import math

import pytest

from bench.metrics import RequestTrace, summarize
from bench.report import load_note, markdown_table, to_json
from bench.serving.plot import plot_sweep, x_positions
from bench.serving.sweep import parse_rates


def test_markdown_table_aligns_columns_and_formats_numbers():
    table = markdown_table(["name", "tok/s"], [["continuous", 123.456], ["static", None]])
    assert table.splitlines() == [
        "| name       | tok/s  |",
        "|------------|--------|",
        "| continuous | 123.46 |",
        "| static     | -      |",
    ]


def test_json_writes_infinite_rates_as_strings():
    assert json.loads(to_json({"rate": math.inf, "rates": [1.0, math.inf]})) == {
        "rate": "inf",
        "rates": [1.0, "inf"],
    }


def test_rates_parse_with_inf_for_all_at_once():
    assert parse_rates("0.5,2, inf") == [0.5, 2.0, math.inf]
    with pytest.raises(AssertionError):
        parse_rates("0,1")


def test_all_at_once_is_plotted_one_step_past_the_largest_rate():
    assert x_positions([1.0, 4.0, math.inf]) == ([1.0, 4.0, 8.0], ["1", "4", "all"])


def test_sweep_plot_is_written_as_png(tmp_path):
    trace = RequestTrace(0, 0.0, 2.0, token_times_s=[1.0, 1.5, 2.0])
    summary = summarize([trace], duration_s=2.0).to_dict()
    path = tmp_path / "sweep.png"
    plot_sweep({"continuous": [(1.0, summary), (math.inf, summary)], "static": [(1.0, summary)]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_note_warns_when_the_machine_was_busy_before_the_run():
    quiet = {"load_average_before": 0.2, "load_average_after": 2.5, "cpu_count": 2}
    busy = {"load_average_before": 3.0, "load_average_after": 4.0, "cpu_count": 2}
    assert load_note(quiet) == "load average 0.2 before, 2.5 after, on 2 CPUs"
    assert load_note(busy).endswith("other processes were busy: numbers are not comparable")

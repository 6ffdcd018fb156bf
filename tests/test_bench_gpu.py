"""`make bench-gpu`'s script runs end to end with tiny shapes on the CPU (`--smoke`)."""

from __future__ import annotations

import json

from bench import gpu

MODES = ("torch eager", "triton eager", "triton padded")  # without CUDA, "padded" stands in for "graphs"


def test_bench_gpu_smoke_measures_every_mode_and_system_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    report = gpu.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["decode"] == report["decode"]
    modes = {(row["mode"], row["batch"]) for row in report["decode"]}
    assert modes == {(mode, batch) for mode in MODES for batch in (1, 2)}
    assert all(row["step_ms"] > 0 and row["copy_fraction"] > 0 for row in report["decode"])
    throughput = report["throughput"]
    assert [row["system"] for row in throughput] == [
        "textgen engine, torch decode, eager",
        "transformers generate (static batch 4)",
    ]
    assert throughput[0]["output_tokens"] == throughput[1]["output_tokens"] > 0
    assert "| tiny  | triton padded | 2" in capsys.readouterr().out

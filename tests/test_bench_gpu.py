"""`make bench-gpu`'s script runs end to end with tiny shapes on the CPU (`--smoke`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.gpu import check as gpu

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


# ---- the gate: a run that cannot pass silently --------------------------------------------------------

FAKE_TESTS = {
    "failing": "def test_fails():\n    assert 1 == 2\n",
    "skipped": "@pytest.mark.skip(reason='needs a unicorn')\ndef test_skipped():\n    pass\n",
    "empty": "",  # pytest exits 5: no tests ran
    "blocking": "import threading\n\n\ndef test_blocks():\n    threading.Event().wait()\n",
    "passing": "def test_passes():\n    assert 1 + 1 == 2\n",
}
MARKED = "import pytest\n\npytestmark = pytest.mark.cuda\n\n"


def run_gate(tmp_path, fake: str, *flags: str) -> tuple[object, dict]:
    """`bench.gpu.check --smoke --steps tests` on one fake test file: (its exit code or None, its JSON)."""
    test_file = tmp_path / f"test_{fake}.py"
    test_file.write_text(MARKED + FAKE_TESTS[fake])
    out = tmp_path / "gpu.json"
    argv = ["--smoke", "--steps", "tests", "--tests", str(test_file), "--out", str(out), *flags]
    try:
        gpu.main(argv)
        code = None
    except SystemExit as exit:
        code = exit.code
    return code, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("fake", "reason"),
    [
        ("failing", "pytest exit code 1: 1 failed"),
        ("skipped", "1 of 1 tests skipped, and every one must run here: needs a unicorn"),
        ("empty", "no tests ran (pytest exit code 5)"),
    ],
)
def test_a_failed_skipped_or_empty_test_run_fails_the_bench_with_the_reason_in_its_json(
    tmp_path, fake, reason
):
    code, report = run_gate(tmp_path, fake)
    assert code == "failed: tests"
    assert report["errors"]["tests"].startswith(reason)


def test_a_test_run_that_times_out_fails_the_bench(tmp_path):
    code, report = run_gate(tmp_path, "blocking", "--tests-timeout-s", "5")
    assert code == "failed: tests"
    assert report["errors"] == {"tests": "timed out after 5 s"}
    assert report["tests"]["returncode"] is None


def test_a_passing_test_run_passes_and_runs_on_the_device_asked_for(tmp_path):
    code, report = run_gate(tmp_path, "passing")
    assert code is None and report["errors"] == {}
    assert report["tests"]["tests"] == 1 and report["tests"]["failures"] == report["tests"]["skipped"] == 0


def test_no_c_compiler_for_tritons_launcher_fails_the_bench(tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no clang, gcc or cc on it
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit, match="failed: toolchain"):
        gpu.main(["--smoke", "--steps", "toolchain", "--out", str(out)])
    assert json.loads(out.read_text())["errors"]["toolchain"].startswith("no compiler for Triton's launcher")


def test_a_lost_cuda_context_stops_the_run_and_fails_it(tmp_path, monkeypatch):
    def lost(device: str) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu, "check_device", lost)
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit, match="failed: cuda"):
        gpu.main(["--smoke", "--steps", "toolchain,copy", "--out", str(out)])
    report = json.loads(out.read_text())
    assert "illegal memory access" in report["errors"]["cuda"]
    assert "copy_rate_bytes_per_s" not in report  # nothing ran after the context was lost


def test_the_json_is_written_as_each_step_ends(tmp_path, monkeypatch):
    def killed(plan) -> float:
        raise KeyboardInterrupt  # as a run stopped from outside: nothing after this step runs

    monkeypatch.setattr(gpu, "copy_rate", killed)
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--smoke", "--steps", "toolchain,copy", "--out", str(out)])
    assert json.loads(out.read_text())["toolchain"]["compiler"]


# The server's dependencies, absent from a GPU image that holds torch, triton and transformers.
SERVER_ONLY = ("gguf", "grpc", "grpc_tools", "google", "aiohttp", "openai", "opentelemetry",
               "prometheus_client", "matplotlib", "jsonschema", "service", "client", "telemetry",
               "protos")  # fmt: skip


def test_the_bench_and_the_cuda_tests_import_nothing_of_the_servers():
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in SERVER_ONLY)  # as if not installed
    script = blocked + (
        "sys.path.insert(0, 'tests')\n"
        "import bench.gpu.check, bench.engine.throughput, bench.peers.hf_generate, bench.random_model\n"
        "import test_cuda\n"
        "print('imported')\n"
    )
    command = [sys.executable, "-c", "import sys\n" + script]
    result = subprocess.run(command, cwd=gpu.ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "imported", result.stderr[-2000:]

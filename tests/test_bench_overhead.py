"""`make bench-overhead` (bench/serving/overhead.py) on the tiny model: its table; a failed step's exit."""

from __future__ import annotations

from bench.serving.overhead import ENGINE, GRPC, HTTP, main


def tiny_server_args(model_dir) -> list[str]:
    # no Prometheus endpoint: its fixed port may be another server's on a shared machine
    flags = [
        f"--model={model_dir}",
        "--device=cpu",
        "--dtype=float32",
        "--num-kv-blocks=256",
        "--metrics-port=0",
    ]
    return [f"--server-arg={flag}" for flag in flags]


def test_a_quick_run_reports_every_path_at_every_concurrency(tiny_model_dir, tmp_path, capsys):
    argv = [
        "--quick",
        "--no-progress",
        f"--output-dir={tmp_path}",
        *tiny_server_args(tiny_model_dir("llama")),
    ]

    code, printed = main(argv), capsys.readouterr()

    assert code == 0, printed.err
    rows = [line.split("|")[1:-1] for line in printed.out.splitlines() if line.startswith("| ")]
    table = {(cells[0].strip(), cells[1].strip()): float(cells[-1]) for cells in rows[1:]}
    assert set(table) == {(n, path) for n in ("1", "4") for path in (ENGINE, GRPC, HTTP)}, printed.out
    assert table["1", ENGINE] == table["4", ENGINE] == 1.0  # the engine's own is what the fronts are over
    assert all(ratio > 0 for ratio in table.values()), printed.out


def test_a_failed_request_fails_the_run_naming_its_step(tiny_model_dir, tmp_path, capsys):
    limit = ["--server-arg=--max-new-tokens-limit=4", "--server-arg=--default-max-new-tokens=4"]
    argv = ["--quick", "--no-progress", "--len-sigma=0", f"--output-dir={tmp_path}", *limit]

    assert main(argv + tiny_server_args(tiny_model_dir("llama"))) == 1  # 8 new tokens asked: over the limit

    error = capsys.readouterr().err
    assert f"bench-overhead failed: {ENGINE} at 1 streams: 4 of 4 requests failed" in error
    assert "max_new_tokens" in error

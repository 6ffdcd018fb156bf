"""bench.serving.start_time: seconds from `python -m service` to SERVING, one fresh server a run."""

from __future__ import annotations

from bench.serving import start_time


def test_each_run_starts_a_server_until_serving_and_reports_its_seconds(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    seconds = start_time.main(["--model", model, "--runs", "2", "--server-arg=--metrics-port=0"])
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    out = capsys.readouterr().out
    assert "run 1: SERVING after" in out and "run 2: SERVING after" in out and "load average" in out

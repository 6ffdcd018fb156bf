"""Tests for bench.metrics on a hand-made trace whose every number can be checked by hand."""

from __future__ import annotations

import pytest

from bench.metrics import RequestTrace, e2e, itl, meets_slo, percentiles, summarize, tpot, ttft


def trace(index: int, start: float, token_times: list[float], end: float | None = None, **kw) -> RequestTrace:
    end_s = end if end is not None else (token_times[-1] if token_times else start)
    return RequestTrace(index=index, start_s=start, end_s=end_s, token_times_s=token_times, **kw)


# Request 0: sent at 0, tokens at 1, 2, 4 (TTFT 1, TPOT 1.5, gaps 1 and 2, e2e 4).
# Request 1: sent at 1, tokens at 1.5, 1.5 (two in one message), 2.5 (TTFT 0.5, TPOT 0.5, gaps 0 and 1).
# Request 2: sent at 2, one token at 5 (TTFT 3, no TPOT, e2e 3).
# Request 3: sent at 3, failed at 6 after one token.
TRACES = [
    trace(0, 0.0, [1.0, 2.0, 4.0], prompt_tokens=10),
    trace(1, 1.0, [1.5, 1.5, 2.5], prompt_tokens=20),
    trace(2, 2.0, [5.0], prompt_tokens=30),
    trace(3, 3.0, [4.0], end=6.0, prompt_tokens=40, error="INTERNAL"),
]


def test_ttft_is_first_token_minus_send_time():
    assert [ttft(t) for t in TRACES[:3]] == [1.0, 0.5, 3.0]


def test_ttft_is_none_without_tokens():
    assert ttft(trace(0, 0.0, [], end=1.0)) is None


def test_tpot_averages_the_gaps_after_the_first_token():
    assert [tpot(t) for t in TRACES[:3]] == [1.5, 0.5, None]


def test_itl_lists_every_gap_including_same_message_tokens():
    assert itl(TRACES[0]) == [1.0, 2.0]
    assert itl(TRACES[1]) == [0.0, 1.0]
    assert itl(TRACES[2]) == []


def test_e2e_is_end_minus_send_time():
    assert [e2e(t) for t in TRACES] == [4.0, 1.5, 3.0, 3.0]


def test_percentiles_interpolate_linearly():
    assert percentiles([1.0, 2.0, 3.0, 4.0, 5.0]) == {"p50": 3.0, "p90": 4.6, "p99": pytest.approx(4.96)}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert percentiles([0.0, 10.0], ps=(25, 75)) == {"p25": 2.5, "p75": 7.5}


def test_percentiles_of_nothing_are_none():
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_summary_counts_only_successes_in_throughput():
    summary = summarize(TRACES, duration_s=8.0)
    assert (summary.num_requests, summary.num_ok, summary.num_errors) == (4, 3, 1)
    assert summary.prompt_tokens == 60
    assert summary.output_tokens == 7
    assert summary.request_throughput == 3 / 8
    assert summary.output_throughput == 7 / 8
    assert summary.total_token_throughput == 67 / 8


def test_summary_latency_statistics():
    summary = summarize(TRACES, duration_s=8.0)
    assert summary.mean_ttft_s == pytest.approx(1.5)
    assert summary.mean_tpot_s == pytest.approx(1.0)
    assert summary.ttft_s["p50"] == 1.0
    assert summary.tpot_s["p50"] == 1.0
    assert summary.itl_s["p50"] == 1.0  # gaps 0, 1, 1, 2
    assert summary.e2e_s["p50"] == 3.0  # 1.5, 3, 4


def test_without_slos_every_success_is_good():
    summary = summarize(TRACES, duration_s=8.0)
    assert summary.num_good == 3
    assert summary.goodput == 3 / 8


def test_goodput_counts_requests_meeting_every_slo():
    # TTFT <= 1 keeps requests 0 and 1; TPOT <= 1 then drops request 0 (TPOT 1.5).
    assert summarize(TRACES, 8.0, slo_ttft_s=1.0).num_good == 2
    assert summarize(TRACES, 8.0, slo_tpot_s=1.0).num_good == 2  # request 2 has no TPOT: it passes
    summary = summarize(TRACES, 8.0, slo_ttft_s=1.0, slo_tpot_s=1.0)
    assert summary.num_good == 1
    assert summary.goodput == 1 / 8


def test_slo_bounds_are_inclusive():
    assert meets_slo(TRACES[0], slo_ttft_s=1.0, slo_tpot_s=1.5)
    assert not meets_slo(TRACES[0], slo_ttft_s=0.999, slo_tpot_s=None)


def test_failed_request_never_meets_an_slo():
    assert not meets_slo(TRACES[3], slo_ttft_s=None, slo_tpot_s=None)


def test_summary_is_json_ready():
    as_dict = summarize(TRACES, duration_s=8.0, slo_ttft_s=1.0).to_dict()
    assert as_dict["ttft_s"]["p50"] == 1.0
    assert as_dict["slo_ttft_s"] == 1.0

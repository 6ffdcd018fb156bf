"""Serving metrics over per-request traces: TTFT, TPOT, inter-token gaps, end-to-end latency,
throughput, goodput under SLOs, and their percentiles. Pure functions, so tests can check exact values.

Definitions (the ones vLLM's and TGI's serving benchmarks use):
- TTFT: first output token's arrival minus the request's send time.
- TPOT: (last token - first token) / (output tokens - 1); undefined for a one-token output.
- ITL: every gap between consecutive output tokens (0 for tokens that arrived in the same message).
- Goodput: requests per second that succeeded and met every given SLO.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestTrace:
    """What the client saw of one request, in seconds on one monotonic clock.

    `token_times_s` holds one arrival time per output token; `error` is empty for a success.
    """

    index: int
    start_s: float
    end_s: float
    token_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    expected_output_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)


def ttft(trace: RequestTrace) -> float | None:
    """Time to first token, or None when no token arrived."""
    return trace.token_times_s[0] - trace.start_s if trace.token_times_s else None


def e2e(trace: RequestTrace) -> float:
    """End-to-end latency: send to last message."""
    return trace.end_s - trace.start_s


def tpot(trace: RequestTrace) -> float | None:
    """Time per output token after the first, or None for fewer than two tokens."""
    if trace.output_tokens < 2:
        return None
    return (trace.token_times_s[-1] - trace.token_times_s[0]) / (trace.output_tokens - 1)


def itl(trace: RequestTrace) -> list[float]:
    """Every inter-token gap of one request."""
    times = trace.token_times_s
    return [b - a for a, b in itertools.pairwise(times)]


def percentiles(values: Sequence[float], ps: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """`{"p50": ..., ...}` with linear interpolation between order statistics; None when empty."""
    if not values:
        return {f"p{p:g}": None for p in ps}
    result = np.percentile(np.asarray(values, dtype=float), list(ps))
    return {f"p{p:g}": float(v) for p, v in zip(ps, result, strict=True)}


def meets_slo(trace: RequestTrace, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """True when the request succeeded and met each SLO that is set (a one-token output has no TPOT)."""
    if not trace.ok:
        return False
    first = ttft(trace)
    if slo_ttft_s is not None and (first is None or first > slo_ttft_s):
        return False
    per_token = tpot(trace)
    return slo_tpot_s is None or per_token is None or per_token <= slo_tpot_s


@dataclass(slots=True)
class Summary:
    """Aggregate results of one benchmark run; latencies in seconds, throughputs per second."""

    duration_s: float
    num_requests: int
    num_ok: int
    num_errors: int
    prompt_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    num_good: int
    goodput: float
    slo_ttft_s: float | None
    slo_tpot_s: float | None
    mean_ttft_s: float | None
    mean_tpot_s: float | None
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(
    traces: Sequence[RequestTrace],
    duration_s: float,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
) -> Summary:
    """Aggregate `traces` of a run that took `duration_s`; latency statistics cover successes only."""
    assert duration_s > 0, "duration_s must be positive"
    ok = [t for t in traces if t.ok]
    ttfts = [v for v in map(ttft, ok) if v is not None]
    tpots = [v for v in map(tpot, ok) if v is not None]
    gaps = [gap for t in ok for gap in itl(t)]
    prompt_tokens = sum(t.prompt_tokens for t in ok)
    output_tokens = sum(t.output_tokens for t in ok)
    num_good = sum(meets_slo(t, slo_ttft_s, slo_tpot_s) for t in traces)
    return Summary(
        duration_s=duration_s,
        num_requests=len(traces),
        num_ok=len(ok),
        num_errors=len(traces) - len(ok),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(prompt_tokens + output_tokens) / duration_s,
        num_good=num_good,
        goodput=num_good / duration_s,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        mean_ttft_s=_mean(ttfts),
        mean_tpot_s=_mean(tpots),
        ttft_s=percentiles(ttfts),
        tpot_s=percentiles(tpots),
        itl_s=percentiles(gaps),
        e2e_s=percentiles([e2e(t) for t in ok]),
    )

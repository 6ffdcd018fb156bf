"""What a replica's Prometheus endpoint counts that a fleet benchmark reads: requests finished OK, and the
prefix cache's prompt tokens looked up and found (`textgen_prefix_cache_{queries,hits}_total`, summed over
`cache_scope`)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(slots=True, frozen=True)
class ReplicaCounters:
    """One scrape of one replica's counters, or the difference of two."""

    requests_ok: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0

    def __sub__(self, earlier: ReplicaCounters) -> ReplicaCounters:
        return ReplicaCounters(
            self.requests_ok - earlier.requests_ok,
            self.prefix_queries - earlier.prefix_queries,
            self.prefix_hits - earlier.prefix_hits,
        )


def parse_counters(text: str) -> ReplicaCounters:
    """The counters in a Prometheus text exposition (missing ones are 0: nothing has happened yet)."""
    totals = {"requests_ok": 0.0, "prefix_queries": 0.0, "prefix_hits": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "textgen_requests_total" and sample.labels.get("outcome") == "ok":
                totals["requests_ok"] += sample.value
            elif sample.name == "textgen_prefix_cache_queries_total":
                totals["prefix_queries"] += sample.value
            elif sample.name == "textgen_prefix_cache_hits_total":
                totals["prefix_hits"] += sample.value
    return ReplicaCounters(**totals)


def scrape(metrics_port: int) -> ReplicaCounters:
    """The counters of the replica whose Prometheus endpoint listens on `metrics_port` (loopback)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        return parse_counters(response.read().decode())


def hit_ratio(counters: list[ReplicaCounters]) -> float | None:
    """The fleet's prefix-cache hit ratio: prompt tokens found over prompt tokens looked up, all replicas."""
    queries = sum(c.prefix_queries for c in counters)
    return sum(c.prefix_hits for c in counters) / queries if queries else None

"""`make bench-fleet` (bench/fleet/gateway.py): its gate fails on a failed or missing step, its workload and
KV budgets, reading the replicas' counters, and a smoke run of the whole command on tiny random-weight
replicas behind the pinned SMG."""

from __future__ import annotations

import json

import pytest

from bench.fleet import gateway
from bench.fleet.gateway import RESTART, StepResult, gate, planned_steps
from bench.fleet.replica_counters import ReplicaCounters, hit_ratio, parse_counters
from bench.fleet.smg import smg_binary
from bench.fleet.tenants import TenantWorkloadConfig, kv_blocks, kv_budgets, system_prompts, tenant_workload

RUNS = ["round_robin/http", "cache_aware/grpc"]


def test_the_gate_names_a_failed_step():
    planned = planned_steps(["tight"], RUNS, restart=True)
    results = [
        StepResult("tight · round_robin/http"),
        StepResult("tight · cache_aware/grpc", "2 of 8 requests failed: HTTP 503"),
        StepResult(RESTART),
    ]

    assert gate(planned, results) == ["tight · cache_aware/grpc: 2 of 8 requests failed: HTTP 503"]


def test_the_gate_names_a_step_that_did_not_run():
    planned = planned_steps(["room", "tight"], RUNS, restart=True)
    results = [StepResult(name) for name in planned if not name.startswith("tight")]

    assert gate(planned, results) == [
        "tight · round_robin/http: did not run",
        "tight · cache_aware/grpc: did not run",
    ]


def test_the_gate_passes_when_every_planned_step_ran_and_passed():
    planned = planned_steps(["room"], RUNS, restart=True)

    assert gate(planned, [StepResult(name) for name in planned]) == []


def test_the_command_exits_nonzero_and_writes_its_results_when_a_run_failed(monkeypatch, tmp_path):
    async def fake_bench(args, server_args, log_dir, save):
        results = [StepResult("tight · round_robin/http", row={"requests ok": "4/4"})]
        save(results, {})
        results.append(StepResult("tight · cache_aware/grpc", "1 of 4 requests failed: HTTP 500"))
        save(results, {})
        return results, {}

    monkeypatch.setattr(gateway, "bench_fleet", fake_bench)
    argv = ["--kv-budgets", "tight", "--runs", ",".join(RUNS), "--no-restart", "--output-dir", str(tmp_path)]

    assert gateway.main(argv) == 1
    (record_path,) = tmp_path.glob("fleet-*.json")
    record = json.loads(record_path.read_text())
    assert record["failures"] == ["tight · cache_aware/grpc: 1 of 4 requests failed: HTTP 500"]
    assert "FAILED" in next(tmp_path.glob("fleet-*.md")).read_text()


def test_replicas_that_outnumber_the_cores_run_one_openmp_thread_each(monkeypatch):
    monkeypatch.setattr(gateway.os, "sched_getaffinity", lambda pid: {0, 1})
    parse = gateway.build_parser().parse_args

    assert gateway.replica_env(parse(["--replicas", "3"])) == {"OMP_NUM_THREADS": "1"}
    assert gateway.replica_env(parse(["--replicas", "2"])) == {}  # as many cores as replicas: the default
    assert gateway.replica_env(parse(["--replicas", "2", "--threads-per-replica", "1"])) == {
        "OMP_NUM_THREADS": "1"
    }
    assert gateway.replica_env(parse(["--replicas", "3", "--threads-per-replica", "2"])) == {
        "OMP_NUM_THREADS": "2"
    }


def test_every_request_of_a_tenant_carries_the_same_system_prompt():
    config = TenantWorkloadConfig(num_tenants=3, system_len=20, num_requests=30, request_rate=5.0)
    specs = tenant_workload(config)
    systems = system_prompts(config)

    assert specs == tenant_workload(config)  # seeded
    assert all(spec.messages[0]["content"] == systems[spec.tenant] for spec in specs)
    assert len({spec.messages[1]["content"] for spec in specs}) == len(specs)  # each user asks their own
    assert {spec.tenant for spec in specs} == {0, 1, 2}
    assert [spec.arrival_s for spec in specs] == sorted(spec.arrival_s for spec in specs)


def test_a_tight_kv_budget_holds_a_replicas_share_of_the_prefixes_and_not_all_of_them():
    config = TenantWorkloadConfig(num_tenants=16, system_len=500, question_len=24, output_len=32)
    budgets = kv_budgets(config, block_size=16, num_replicas=3, in_flight=4)
    one_prefix = kv_blocks(config, 16, cached_tenants=1, in_flight=0)

    assert budgets["room"] >= 16 * one_prefix
    assert 6 * one_prefix <= budgets["tight"] < 16 * one_prefix  # 6 = ceil(16 / 3)


EXPOSITION = """\
# TYPE textgen_requests_total counter
textgen_requests_total{outcome="ok"} 7.0
textgen_requests_total{outcome="cancelled"} 2.0
# TYPE textgen_prefix_cache_queries_total counter
textgen_prefix_cache_queries_total{cache_scope="shared"} 900.0
textgen_prefix_cache_queries_total{cache_scope="key"} 100.0
# TYPE textgen_prefix_cache_hits_total counter
textgen_prefix_cache_hits_total{cache_scope="shared"} 600.0
"""


def test_replica_counters_sum_the_prefix_cache_scopes_and_count_only_requests_that_finished_ok():
    counters = parse_counters(EXPOSITION)

    assert counters == ReplicaCounters(requests_ok=7.0, prefix_queries=1000.0, prefix_hits=600.0)
    assert counters - ReplicaCounters(2.0, 500.0, 100.0) == ReplicaCounters(5.0, 500.0, 500.0)


def test_the_fleet_hit_ratio_weighs_each_replica_by_its_prompt_tokens():
    assert (
        hit_ratio([ReplicaCounters(1, 1000, 900), ReplicaCounters(1, 0, 0), ReplicaCounters(1, 1000, 100)])
        == 0.5
    )
    assert hit_ratio([ReplicaCounters(), ReplicaCounters()]) is None


@pytest.mark.skipif(smg_binary() is None, reason="smg (the pinned gateway wheel) is not installed")
def test_a_smoke_run_of_the_whole_command_passes_its_gate(tiny_model_dir, tmp_path):
    argv = [
        "--model", str(tiny_model_dir("llama")), "--replicas", "2", "--kv-budgets", "tight",
        "--runs", "cache_aware/grpc", "--restart-run", "round_robin/http",
        "--tenants", "2", "--system-len", "40", "--question-len", "6", "--output-len", "3",
        "--num-requests", "4", "--request-rate", "inf", "--temperature", "1",
        "--restart-concurrency", "2", "--restart-min-requests", "2", "--restart-timeout-s", "60",
        "--grace-period-s", "10", "--output-dir", str(tmp_path),
    ]  # fmt: skip

    assert gateway.main(argv) == 0
    record = json.loads(next(tmp_path.glob("fleet-*.json")).read_text())
    steps = {step["name"]: step for step in record["steps"]}
    assert list(steps) == ["tight · cache_aware/grpc", RESTART]
    row = steps["tight · cache_aware/grpc"]["row"]
    assert row["requests ok"] == "4/4"
    assert sum(map(int, row["requests per replica"].split("/"))) == 4
    assert 0 <= float(row["hit ratio"]) <= 1
    branches = dict(part.rsplit(" ", 1) for part in row["smg routing"].split(", "))
    assert sum(map(int, branches.values())) == 4  # SMG's policy recorded one placement per request
    done, sent = map(int, steps[RESTART]["row"]["requests ok"].split("/"))
    assert done == sent >= 4  # 2 before the SIGTERM, 2 after the restart, and those in flight
    assert record["failures"] == []

"""Replicas that lose nothing: three `python -m service` processes (tiny random-weight models) behind one
round_robin channel under steady load; one is sent SIGTERM and started again (bench/replicas.py)."""

from __future__ import annotations

import pytest

from bench.replicas import ReplicaChange, replica_change
from bench.stress_process import server_args

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
async def change(tiny_model_dir, tmp_path_factory) -> ReplicaChange:
    model_args = server_args(str(tiny_model_dir("llama")))
    model_args = model_args[: model_args.index("--host")] + ["--num-kv-blocks", "256"]
    return await replica_change(
        model_args,
        tmp_path_factory.mktemp("replicas"),
        concurrency=4,
        max_new_tokens=MAX_NEW_TOKENS,
        steady_s=1,
        down_s=1,
        back_s=1,
        min_served=2,
    )


def test_every_request_completes_while_a_replica_leaves_and_returns(change):
    failed = [call for call in change.calls if call.code != "OK" or call.tokens != MAX_NEW_TOKENS]

    assert change.exit_code == 0
    assert all(change.in_phase(phase) for phase in ("steady", "down", "back"))
    assert failed == []


def test_every_replica_serves_under_steady_load(change):
    assert all(served > 0 for served in change.served["steady"]), change.served


def test_the_other_replicas_take_the_stopped_ones_share(change):
    others = [s for i, s in enumerate(change.served["down"]) if i != change.stopped]

    assert change.served["down"][change.stopped] == 0
    assert all(served > 0 for served in others), change.served


def test_the_restarted_replica_gets_traffic_once_serving(change):
    assert change.served["back"][change.stopped] > 0, change.served

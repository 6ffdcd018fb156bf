"""Replicas that lose nothing: three `python -m service` processes (tiny random-weight models) behind one
round_robin channel per client, the Python client's and Node.js's (where node is installed), under steady
load; one replica is sent SIGTERM and started again (bench/fleet/replicas.py)."""

from __future__ import annotations

import shutil
import time

import pytest

from bench.fleet.replicas import NODE_EXAMPLE, NodeLoad, PythonLoad, ReplicaChange, replica_change
from bench.stress.process import server_args
from client import TextGenClient, replica_options
from service.server import NOT_SERVING, SERVICE_NAME, SERVING

MAX_NEW_TOKENS = 8
HAS_NODE = shutil.which("node") is not None and (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists()


@pytest.fixture(scope="module")
async def change(tiny_model_dir, tmp_path_factory) -> ReplicaChange:
    model_args = server_args(str(tiny_model_dir("llama")))
    model_args = model_args[: model_args.index("--host")] + ["--num-kv-blocks", "256"]
    loads = [PythonLoad(2, MAX_NEW_TOKENS)] + ([NodeLoad(2, MAX_NEW_TOKENS)] if HAS_NODE else [])
    return await replica_change(
        model_args,
        tmp_path_factory.mktemp("replicas"),
        loads,
        steady_s=1,
        down_s=1,
        back_s=1,
        min_served=2,
    )


def failed(calls) -> list:
    return [call for call in calls if call.code != "OK" or call.tokens != MAX_NEW_TOKENS]


def test_every_python_request_completes_while_a_replica_leaves_and_returns(change):
    calls = change.of_client("python")

    assert change.exit_code == 0
    assert {call.phase for call in calls} >= {"steady", "back"}  # a short `down` may see none start
    assert failed(calls) == []


@pytest.mark.skipif(not HAS_NODE, reason="node or examples/node's dependencies (make node-deps) are missing")
def test_every_node_request_completes_while_a_replica_leaves_and_returns(change):
    calls = change.of_client("node")

    assert {call.phase for call in calls} >= {"steady", "back"}  # a short `down` may see none start
    assert failed(calls) == []


def test_every_replica_serves_under_steady_load(change):
    assert all(served > 0 for served in change.served["steady"]), change.served


def test_the_other_replicas_take_the_stopped_ones_share(change):
    others = [s for i, s in enumerate(change.served["down"]) if i != change.stopped]

    assert change.served["down"][change.stopped] == 0
    assert all(served > 0 for served in others), change.served


def test_the_restarted_replica_gets_traffic_once_serving(change):
    assert change.served["back"][change.stopped] > 0, change.served


def test_replica_options_send_no_calls_to_a_replica_whose_health_is_not_serving(start_server):
    # Which replica answered shows in the tokens of a request that leaves max_new_tokens to the server.
    serving, leaving = start_server(default_max_new_tokens=3), start_server(default_max_new_tokens=5)
    target = f"ipv4:{serving.target},{leaving.target}"

    with TextGenClient(target, timeout=30, options=replica_options()) as client:

        def answered_by(num_calls: int) -> set[int]:
            calls = (client.generate("Hi", ignore_eos=True) for _ in range(num_calls))
            return {result.usage.completion_tokens for result in calls}

        before = answered_by(8)
        leaving.run(leaving.server.health.set(SERVICE_NAME, NOT_SERVING))
        try:
            time.sleep(0.5)  # the client's health watch hears it
            after = answered_by(8)
        finally:
            leaving.run(leaving.server.health.set(SERVICE_NAME, SERVING))

    assert before == {3, 5}
    assert after == {3}

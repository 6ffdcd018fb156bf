"""What a stranger without a key can make the server hold: health watchers only for the served names and
only so many, idle connections closed after the idle timeout on every port, no thread per connection; and
what a web page can make a browser send to a development server (foreign Host and Origin refused)."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request

import grpc
import prometheus_client
import pytest
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ServerConfig, grpc_server_options, parse_config
from service.security.host_check import allowed_hosts
from service.server import SERVICE_NAME
from telemetry.metrics_endpoint import MetricsEndpoint

IDLE_TIMEOUT_S = 1.0  # shortened for the tests; the default is 30 s
# A socket the server has not closed after this long fails the test: a generous bound, far above the timeout.
CLOSED_WITHIN_S = 30.0
NUM_IDLE = 50
MAX_WATCHERS = 2


@pytest.fixture(scope="module")
def server(server_config):
    """A server that listens (gRPC and HTTP) without loading a model: none of these tests needs one."""
    config = dataclasses.replace(
        server_config(), http_port=0, idle_timeout_s=IDLE_TIMEOUT_S, max_health_watchers=MAX_WATCHERS
    )
    server = ServerThread(config).start(load=False)
    yield server
    server.stop()


def watch(target: str, service: str) -> tuple[grpc.Channel, grpc.Future]:
    channel = grpc.insecure_channel(target)
    request = health_pb2.HealthCheckRequest(service=service)
    stream = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=30)
    return channel, stream


def watch_code(target: str, service: str) -> grpc.StatusCode | int:
    """The status a Watch of `service` ends with at once, or the first status it streams."""
    channel, stream = watch(target, service)
    with channel:
        try:
            return next(stream).status
        except grpc.RpcError as error:
            return error.code()


def open_idle(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(first_bytes)
        sock.settimeout(CLOSED_WITHIN_S)
        sockets.append(sock)
    return sockets


def assert_closed_by_the_server(sockets: list[socket.socket]) -> None:
    """Each socket reads end-of-file (or a reset): the server closed it without being asked."""
    for sock in sockets:
        with sock:
            try:
                data = sock.recv(65536)
                while data:  # an HTTP server may answer the partial request before closing
                    data = sock.recv(65536)
            except ConnectionResetError:
                pass


# ---- health ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_watch_streams_the_status_of_a_served_name(server, service):
    assert watch_code(server.target, service) == health_pb2.HealthCheckResponse.NOT_SERVING  # not loaded


def test_watch_of_a_name_the_server_does_not_serve_is_refused_at_once(server):
    assert watch_code(server.target, "no.such.Service") == grpc.StatusCode.NOT_FOUND


def test_a_health_request_too_large_for_a_name_is_refused_unparsed(server):
    huge = "x" * (1024 * 1024)
    assert watch_code(server.target, huge) == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=huge), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watchers_past_the_cap_are_refused_until_one_closes(server):
    open_watches = [watch(server.target, "") for _ in range(MAX_WATCHERS)]
    for _, stream in open_watches:
        next(stream)  # the stream is open on the server
    assert watch_code(server.target, "") == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel, stream = open_watches.pop()
    stream.cancel()
    channel.close()
    health = server.server.health
    server.run(_wait_for(lambda: health.num_watchers < MAX_WATCHERS))
    assert watch_code(server.target, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    for channel, stream in open_watches:
        stream.cancel()
        channel.close()


async def _wait_for(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_check_needs_no_watch_slot(server):
    open_watches = [watch(server.target, "") for _ in range(MAX_WATCHERS)]
    for _, stream in open_watches:
        next(stream)
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    for channel, stream in open_watches:
        stream.cancel()
        channel.close()


# ---- idle connections --------------------------------------------------------------------------------------


def test_the_http_port_closes_silent_and_slow_connections(server):
    threads = threading.active_count()
    silent = open_idle(server.server.http.port, NUM_IDLE)
    slow = open_idle(server.server.http.port, NUM_IDLE, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    assert threading.active_count() == threads
    assert_closed_by_the_server(silent + slow)


def test_the_grpc_port_closes_connections_that_never_handshake(server):
    assert_closed_by_the_server(open_idle(server.server.port, NUM_IDLE))


@pytest.fixture
def metrics_endpoint():
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("textgen_test_scrapes", "a counter to scrape", registry=registry).inc()
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0, IDLE_TIMEOUT_S, max_connections=NUM_IDLE)
    yield endpoint
    endpoint.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


def test_the_metrics_port_serves_idle_connections_without_a_thread_each_and_closes_them(metrics_endpoint):
    threads = threading.active_count()
    idle = open_idle(metrics_endpoint.port, NUM_IDLE - 1)
    assert threading.active_count() == threads
    assert "textgen_test_scrapes_total 1.0" in scrape(metrics_endpoint.port)
    assert_closed_by_the_server(idle)


def test_the_metrics_port_closes_connections_past_its_cap(metrics_endpoint):
    idle = open_idle(metrics_endpoint.port, NUM_IDLE)
    for sock in idle:  # a whole request line on each: held until their heads end or the timeout
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    [over] = open_idle(metrics_endpoint.port, 1, b"GET /metrics HTTP/1.1\r\n\r\n")
    with over:
        try:
            answer = over.recv(1)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
    assert answer == b""  # a whole request, closed unanswered
    assert_closed_by_the_server(idle)


async def test_the_metrics_endpoint_starts_inside_a_running_event_loop():  # as `python -m service` starts it
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("textgen_test_scrapes", "a counter to scrape", registry=registry).inc()
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0)
    try:
        assert "textgen_test_scrapes_total 1.0" in await asyncio.to_thread(scrape, endpoint.port)
    finally:
        endpoint.close()


def test_the_metrics_port_answers_only_get_metrics(metrics_endpoint):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_endpoint.port}/other", timeout=30)
    assert error.value.code == 404


# ---- settings ----------------------------------------------------------------------------------------------


def test_connection_limits_are_flags_with_environment_variables(monkeypatch):
    monkeypatch.setenv("TEXTGEN_IDLE_TIMEOUT_S", "7")
    monkeypatch.setenv("TEXTGEN_MAX_HEALTH_WATCHERS", "3")
    config = parse_config(["--max-concurrent-streams", "5", "--max-connections", "9"])
    assert (config.idle_timeout_s, config.max_health_watchers) == (7.0, 3)
    options = dict(grpc_server_options(config))
    assert options["grpc.max_concurrent_streams"] == 5
    assert options["grpc.max_allowed_incoming_connections"] == 9
    assert options["grpc.max_connection_idle_ms"] == options["grpc.server_handshake_timeout_ms"] == 7000


# ---- Host and Origin (DNS rebinding) -----------------------------------------------------------------------


def http_status(server: ServerThread, headers: dict[str, str]) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http.port, timeout=30)
    try:
        connection.putrequest("GET", "/health", skip_host="Host" in headers)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "[::1]:8000", "LOCALHOST"])
def test_without_keys_on_loopback_the_http_front_answers_its_own_names(server, host):
    status, _ = http_status(server, {"Host": host})
    assert status == 503  # /health while the model is not loaded: past the host check


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "attacker.example"},
        {"Host": "attacker.example:8000"},
        {"Host": "[::1"},
        {"Host": "127.0.0.1", "Origin": "http://attacker.example"},
        {"Host": "127.0.0.1", "Origin": "null"},
    ],
)
def test_without_keys_on_loopback_the_http_front_refuses_foreign_hosts_and_origins(server, headers):
    status, body = http_status(server, headers)
    assert status == 403
    assert "--allowed-hosts" in body["error"]["message"]


def test_a_same_host_origin_is_answered(server):
    status, _ = http_status(server, {"Host": "127.0.0.1", "Origin": "http://localhost:3000"})
    assert status == 503


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, frozenset({"localhost", "127.0.0.1", "::1"})),
        ({"host": "[::1]"}, frozenset({"localhost", "127.0.0.1", "::1"})),
        ({"api_keys": ("k" * 16,)}, None),  # keys guard the port
        ({"host": "0.0.0.0"}, None),  # reachable from the network anyway (and warned about)
        ({"allowed_hosts": ("textgen.internal",)}, frozenset({"textgen.internal"})),
        ({"allowed_hosts": ("*",)}, None),
    ],
)
def test_which_hosts_are_allowed(overrides, expected):
    config = dataclasses.replace(ServerConfig(host="127.0.0.1"), **overrides)
    assert allowed_hosts(config) == expected


def test_allowed_hosts_flag(monkeypatch):
    assert parse_config([]).allowed_hosts is None
    monkeypatch.setenv("TEXTGEN_ALLOWED_HOSTS", "Textgen.Internal, [::1] ,")
    assert parse_config([]).allowed_hosts == ("textgen.internal", "::1")

"""Security: TLS and mTLS with certificates made at test time (trustme), API keys on every call but health
checks, their reload (SIGHUP) without dropping calls in flight, the clients' options, and the start-up
warnings."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import trustme
from conftest import ServerThread, TelemetryServerThread
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from client import AsyncTextGenClient, TextGenClient, tls_credentials
from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc
from service.config import ServerConfig, parse_config
from service.security.auth import ApiKeys, bearer_token, read_key_file
from service.security.tls import TlsFiles
from service.server import Server, exposure_warnings
from telemetry.server import Telemetry

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
ENV_KEY = "env-key-0123456789"
FILE_KEY = "file-key-abcdefghij"
NEW_KEY = "new-key-klmnopqrst"
WRONG_KEY = "wrong-key-uvwxyz012"
# A fresh connection for every channel: a test about handshakes must not reuse another channel's.
FRESH = [("grpc.use_local_subchannel_pool", 1)]

REQUESTS = {
    "Generate": pb.GenerateRequest(prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=2)),
    "GenerateStream": pb.GenerateRequest(prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=2)),
    "Tokenize": pb.TokenizeRequest(text=PROMPT),
    "GetModelInfo": pb.GetModelInfoRequest(),
}


@dataclasses.dataclass
class Identity:
    """A certificate chain and its private key, as PEM files."""

    cert_file: str
    key_file: str


@dataclasses.dataclass
class Pki:
    """Two CAs for servers (the second for rotations), one for clients and one that nobody trusts."""

    server_ca: str
    server: Identity
    rotated_ca: str
    rotated: Identity
    client_ca: str
    client: Identity
    stranger: Identity  # a client certificate from a CA the server does not trust


def write_identity(ca: trustme.CA, folder: Path, name: str, *identities: str) -> Identity:
    leaf = ca.issue_cert(*identities)
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    return Identity(str(cert_file), str(key_file))


def write_ca(ca: trustme.CA, folder: Path, name: str) -> str:
    ca.cert_pem.write_to_path(str(folder / f"{name}.pem"))
    return str(folder / f"{name}.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    server_ca, rotated_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA(), trustme.CA()
    return Pki(
        server_ca=write_ca(server_ca, folder, "server-ca"),
        server=write_identity(server_ca, folder, "server", "127.0.0.1", "localhost"),
        rotated_ca=write_ca(rotated_ca, folder, "rotated-ca"),
        rotated=write_identity(rotated_ca, folder, "rotated", "127.0.0.1", "localhost"),
        client_ca=write_ca(client_ca, folder, "client-ca"),
        client=write_identity(client_ca, folder, "client", "client@example.com"),
        stranger=write_identity(stranger_ca, folder, "stranger", "client@example.com"),
    )


@pytest.fixture(scope="module")
def serve(server_config):
    """Factory: ServerConfig overrides -> a running tiny-model `ServerThread`; all stop with the module."""
    servers: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        servers.append(ServerThread(dataclasses.replace(server_config(), **overrides)).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def key_file(folder: Path, *keys: str) -> str:
    path = folder / "api-keys"
    path.write_text("# one key per line\n\n" + "".join(f"  {key}  \n" for key in keys))
    return str(path)


@pytest.fixture(scope="module")
def tls_server(serve, pki) -> ServerThread:
    return serve(tls=TlsFiles(pki.server.cert_file, pki.server.key_file))


@pytest.fixture(scope="module")
def keyed_server(serve, tmp_path_factory) -> ServerThread:
    """Plaintext on 127.0.0.1, with one key from the environment and one from a key file."""
    return serve(api_keys=(ENV_KEY,), api_key_file=key_file(tmp_path_factory.mktemp("keys"), FILE_KEY))


@pytest.fixture(scope="module")
def secure_server(serve, pki, tmp_path_factory) -> ServerThread:
    """TLS, client certificates from the client CA (mTLS), and an API key."""
    files = TlsFiles(pki.server.cert_file, pki.server.key_file, pki.client_ca)
    return serve(tls=files, api_key_file=key_file(tmp_path_factory.mktemp("keys"), FILE_KEY))


def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, FRESH)
    return grpc.secure_channel(target, credentials, FRESH)


def call(target: str, method: str, metadata=(), credentials=None) -> grpc.StatusCode:
    """Call textgen.v1's `method` on a new connection; the status code it ends with."""
    with channel(target, credentials) as open_channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(open_channel)
        try:
            response = getattr(stub, method)(REQUESTS[method], metadata=metadata, timeout=30)
            if method == "GenerateStream":
                list(response)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def health_check(target: str, credentials=None) -> grpc.StatusCode:
    """A health check on a new connection: whether the TLS handshake and the call went through."""
    with channel(target, credentials) as open_channel:
        try:
            health_pb2_grpc.HealthStub(open_channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def reload(server: ServerThread) -> None:
    """What SIGHUP does, on the server's own event loop."""

    async def on_loop() -> None:
        server.server.reload()

    server.run(on_loop())


# ---- TLS and mTLS ------------------------------------------------------------------------------------------


def test_tls_client_that_trusts_the_ca_generates(tls_server, pki):
    with TextGenClient(
        tls_server.target, credentials=tls_credentials(pki.server_ca), options=FRESH
    ) as client:
        result = client.generate(PROMPT, max_new_tokens=3)

    assert result.usage.completion_tokens == 3


def test_tls_server_refuses_a_plaintext_client(tls_server):
    assert health_check(tls_server.target) == grpc.StatusCode.UNAVAILABLE


def test_tls_client_refuses_a_server_whose_ca_it_does_not_trust(tls_server, pki):
    assert health_check(tls_server.target, tls_credentials(pki.rotated_ca)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_certificate_from_the_client_ca(secure_server, pki):
    credentials = tls_credentials(pki.server_ca, pki.client.cert_file, pki.client.key_file)

    assert call(secure_server.target, "Generate", bearer(FILE_KEY), credentials) == grpc.StatusCode.OK


def test_mtls_refuses_a_client_without_a_certificate(secure_server, pki):
    credentials = tls_credentials(pki.server_ca)

    assert (
        call(secure_server.target, "Generate", bearer(FILE_KEY), credentials) == grpc.StatusCode.UNAVAILABLE
    )


def test_mtls_refuses_a_client_certificate_from_another_ca(secure_server, pki):
    credentials = tls_credentials(pki.server_ca, pki.stranger.cert_file, pki.stranger.key_file)

    assert (
        call(secure_server.target, "Generate", bearer(FILE_KEY), credentials) == grpc.StatusCode.UNAVAILABLE
    )


# ---- API keys ----------------------------------------------------------------------------------------------

METHODS = list(REQUESTS)


@pytest.mark.parametrize("method", METHODS)
def test_a_call_without_a_key_is_unauthenticated(keyed_server, method):
    assert call(keyed_server.target, method) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "authorization", [f"Bearer {WRONG_KEY}", "Bearer ", f"Basic {FILE_KEY}", FILE_KEY, f"Bearer {FILE_KEY}x"]
)
def test_a_call_with_a_wrong_key_is_unauthenticated(keyed_server, method, authorization):
    metadata = (("authorization", authorization),)

    assert call(keyed_server.target, method, metadata) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", [ENV_KEY, FILE_KEY])
def test_a_call_with_a_right_key_is_answered(keyed_server, method, key):
    assert call(keyed_server.target, method, bearer(key)) == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("metadata", "message"), [((), "needs an API key"), (bearer(WRONG_KEY), "not valid")]
)
def test_a_refusal_says_why_with_an_error_info(keyed_server, metadata, message):
    with channel(keyed_server.target) as open_channel:
        stub = textgen_pb2_grpc.TextGenerationServiceStub(open_channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Tokenize(REQUESTS["Tokenize"], metadata=metadata, timeout=10)

    (detail,) = rpc_status.from_call(refused.value).details
    error_info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(error_info)
    assert (error_info.domain, error_info.reason) == ("textgen.v1", "UNAUTHENTICATED")
    assert message in refused.value.details()


def test_the_bearer_scheme_is_case_insensitive(keyed_server):
    metadata = (("authorization", f"bearer {FILE_KEY}"),)

    assert call(keyed_server.target, "Tokenize", metadata) == grpc.StatusCode.OK


def test_health_needs_no_key(keyed_server):
    assert health_check(keyed_server.target) == grpc.StatusCode.OK


def reflection_services(target: str, metadata=()) -> list[str] | grpc.StatusCode:
    with channel(target) as open_channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(open_channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            responses = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
        except grpc.RpcError as error:
            return error.code()
    return [service.name for service in responses[0].list_services_response.service]


def test_reflection_needs_the_key(keyed_server):
    assert reflection_services(keyed_server.target) == grpc.StatusCode.UNAUTHENTICATED
    assert "textgen.v1.TextGenerationService" in reflection_services(keyed_server.target, bearer(FILE_KEY))


def test_the_clients_send_their_api_key(keyed_server):
    with TextGenClient(keyed_server.target, api_key=FILE_KEY) as client:
        text = client.generate(PROMPT, max_new_tokens=2).text
        streamed = "".join(chunk.text for chunk in client.stream(PROMPT, max_new_tokens=2))
        assert client.tokenize(PROMPT).ids and client.model_info().model_name

    async def use_async() -> str:
        async with AsyncTextGenClient(keyed_server.target, api_key=ENV_KEY) as client:
            assert (await client.tokenize(PROMPT)).ids and (await client.model_info()).model_name
            return "".join([chunk.text async for chunk in client.stream(PROMPT, max_new_tokens=2)])

    assert streamed == text == asyncio.run(use_async())


def test_the_clients_take_the_key_from_textgen_api_key(keyed_server, monkeypatch):
    monkeypatch.setenv("TEXTGEN_API_KEY", ENV_KEY)
    with TextGenClient(keyed_server.target) as client:
        assert client.tokenize(PROMPT).ids

    monkeypatch.setenv("TEXTGEN_API_KEY", WRONG_KEY)
    with TextGenClient(keyed_server.target) as client, pytest.raises(grpc.RpcError) as refused:
        client.tokenize(PROMPT)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_key_is_in_no_span_and_no_log(server_config, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = dataclasses.replace(server_config(), api_keys=(ENV_KEY,))
    server = TelemetryServerThread(config, Telemetry(tracer_provider=provider))
    with caplog.at_level(logging.DEBUG):
        server.start()
        try:
            for method in METHODS:
                assert call(server.target, method, bearer(ENV_KEY)) == grpc.StatusCode.OK
                assert call(server.target, method, bearer(WRONG_KEY)) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            server.stop()

    spans = exporter.get_finished_spans()
    refused = [span for span in spans if span.attributes.get("rpc.grpc.status_code") == 16]
    assert len(refused) == len(METHODS)  # refused calls are traced, with their status code
    for text in [caplog.text, repr(config), *(span.to_json() for span in spans)]:
        assert ENV_KEY not in text and WRONG_KEY not in text


# ---- reload ------------------------------------------------------------------------------------------------


def test_reload_accepts_the_new_key_and_refuses_the_old(serve, tmp_path):
    path = key_file(tmp_path, FILE_KEY)
    server = serve(api_keys=(ENV_KEY,), api_key_file=path)
    assert call(server.target, "Tokenize", bearer(FILE_KEY)) == grpc.StatusCode.OK

    key_file(tmp_path, NEW_KEY)
    reload(server)

    assert call(server.target, "Tokenize", bearer(NEW_KEY)) == grpc.StatusCode.OK
    assert call(server.target, "Tokenize", bearer(FILE_KEY)) == grpc.StatusCode.UNAUTHENTICATED
    assert call(server.target, "Tokenize", bearer(ENV_KEY)) == grpc.StatusCode.OK


def test_a_changed_key_file_is_reloaded_without_a_signal(serve, tmp_path):
    keys = key_file(tmp_path, FILE_KEY)
    server = serve(api_key_file=keys, reload_check_s=0.05)  # shortened for the test; the default is 10 s
    assert call(server.target, "Tokenize", bearer(FILE_KEY)) == grpc.StatusCode.OK

    key_file(tmp_path, NEW_KEY)  # rewritten in place, as a Secret volume update does
    deadline = time.monotonic() + 30
    while not server.server.api_keys.accepts(NEW_KEY):
        assert time.monotonic() < deadline, "the changed key file was not reloaded"
        time.sleep(0.02)

    assert call(server.target, "Tokenize", bearer(NEW_KEY)) == grpc.StatusCode.OK
    assert call(server.target, "Tokenize", bearer(FILE_KEY)) == grpc.StatusCode.UNAUTHENTICATED


def test_reload_serves_the_new_certificate_to_new_connections_and_keeps_the_stream_in_flight(
    serve, pki, tmp_path
):
    cert_file, key_file_ = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(pki.server.cert_file, cert_file)
    shutil.copy(pki.server.key_file, key_file_)
    server = serve(tls=TlsFiles(str(cert_file), str(key_file_)))
    old, new = tls_credentials(pki.server_ca), tls_credentials(pki.rotated_ca)
    assert health_check(server.target, new) == grpc.StatusCode.UNAVAILABLE

    with channel(server.target, old) as old_channel:
        request = pb.GenerateRequest(
            prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=200, ignore_eos=True)
        )
        stream = textgen_pb2_grpc.TextGenerationServiceStub(old_channel).GenerateStream(request, timeout=120)
        messages = [next(stream)]

        shutil.copy(pki.rotated.cert_file, cert_file)
        shutil.copy(pki.rotated.key_file, key_file_)
        reload(server)
        new_connection = health_check(server.target, new)
        old_ca_connection = health_check(server.target, old)
        running = server.engine.load.num_running
        messages += list(stream)

    assert new_connection == grpc.StatusCode.OK
    assert old_ca_connection == grpc.StatusCode.UNAVAILABLE
    assert running == 1  # the stream was still generating after the reload and the new connections
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(message.tokens) for message in messages) == 200


def test_a_failed_reload_keeps_the_current_certificate_and_keys(serve, pki, tmp_path, caplog):
    cert_file, key_file_ = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(pki.server.cert_file, cert_file)
    shutil.copy(pki.server.key_file, key_file_)
    keys = key_file(tmp_path, FILE_KEY)
    server = serve(tls=TlsFiles(str(cert_file), str(key_file_)), api_key_file=keys)
    credentials = tls_credentials(pki.server_ca)

    shutil.copy(pki.rotated.key_file, key_file_)  # a key that does not match the certificate
    Path(keys).write_text("# every key removed\n")
    with caplog.at_level(logging.ERROR, logger="service"):
        reload(server)

    assert "reloading API keys failed" in caplog.text and "reloading TLS certificates failed" in caplog.text
    assert call(server.target, "Tokenize", bearer(FILE_KEY), credentials) == grpc.StatusCode.OK


def start_service(args: list[str], env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m service` on a free port of 127.0.0.1; the process and its target once it is SERVING."""
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    while not re.search(r"INFO service: serving \S+ \(", log_path.read_text()):
        assert process.poll() is None, f"the server exited early:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
        time.sleep(0.2)
    port = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text()).group(1)
    return process, f"127.0.0.1:{port}"


def wait_for_log(log_path: Path, text: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while log_path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log_path.read_text()}"
        time.sleep(0.05)


def test_sighup_reloads_the_key_file_and_the_certificate(tiny_model_dir, pki, tmp_path):
    cert_file, key_file_ = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(pki.server.cert_file, cert_file)
    shutil.copy(pki.server.key_file, key_file_)
    keys = key_file(tmp_path, FILE_KEY)
    args = ["--model", str(tiny_model_dir("llama")), "--device", "cpu", "--dtype", "float32"]
    args += ["--metrics-port", "0", "--num-kv-blocks", "64", "--api-key-file", keys]
    env = {"TEXTGEN_TLS_CERT_FILE": str(cert_file), "TEXTGEN_TLS_KEY_FILE": str(key_file_)}
    log_path = tmp_path / "server.log"
    process, target = start_service(args, env, log_path)
    try:
        old, new = tls_credentials(pki.server_ca), tls_credentials(pki.rotated_ca)
        before = (
            call(target, "Tokenize", bearer(FILE_KEY), old),
            call(target, "Tokenize", bearer(NEW_KEY), old),
        )

        key_file(tmp_path, NEW_KEY)
        shutil.copy(pki.rotated.cert_file, cert_file)
        shutil.copy(pki.rotated.key_file, key_file_)
        os.kill(process.pid, signal.SIGHUP)
        wait_for_log(log_path, "reloaded TLS certificates", 1)

        after = (
            call(target, "Tokenize", bearer(FILE_KEY), new),
            call(target, "Tokenize", bearer(NEW_KEY), new),
        )
        old_ca = health_check(target, old)
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()

    assert before == (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
    assert after == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)
    assert old_ca == grpc.StatusCode.UNAVAILABLE
    assert "reloaded API keys" in log_path.read_text()
    assert FILE_KEY not in log_path.read_text() and NEW_KEY not in log_path.read_text()


# ---- command line and Node.js clients ---------------------------------------------------------------------


def tls_args(pki: Pki) -> list[str]:
    return ["--tls-ca-file", pki.server_ca, "--tls-cert-file", pki.client.cert_file,
            "--tls-key-file", pki.client.key_file]  # fmt: skip


def test_cli_with_mtls_and_the_key_from_textgen_api_key(secure_server, pki):
    command = [sys.executable, "-m", "client", PROMPT, "--max-new-tokens", "3", "--target"]
    command += [secure_server.target, *tls_args(pki)]
    env = {**os.environ, "TEXTGEN_API_KEY": FILE_KEY}

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    refused = subprocess.run(
        [*command, "--api-key", WRONG_KEY], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert "3 completion tokens" in done.stderr
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_example_with_mtls_and_an_api_key(secure_server, pki):
    example = REPO / "examples" / "node"
    if not (example / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.skip("the Node example's dependencies are not installed (make node-deps)")
    command = ["node", "generate_stream.js", "--max-new-tokens", "3", "--target", secure_server.target]
    command += [*tls_args(pki), PROMPT]
    no_key = {name: value for name, value in os.environ.items() if name != "TEXTGEN_API_KEY"}

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *args], cwd=example, env={**no_key, **env}, capture_output=True, text=True, timeout=60
        )

    with_env_key = run(TEXTGEN_API_KEY=FILE_KEY)
    with_flag_key = run("--api-key", FILE_KEY)
    without_key = run()

    assert with_env_key.returncode == 0, with_env_key.stderr
    assert "3 completion tokens" in with_env_key.stderr
    assert with_flag_key.returncode == 0, with_flag_key.stderr
    assert without_key.returncode == 1 and "UNAUTHENTICATED" in without_key.stderr


# ---- configuration and warnings ----------------------------------------------------------------------------


def test_security_flags_and_their_environment_variables(monkeypatch):
    monkeypatch.setenv("TEXTGEN_TLS_CERT_FILE", "server.pem")
    monkeypatch.setenv("TEXTGEN_API_KEYS", f" {ENV_KEY}, ,{NEW_KEY} ")

    config = parse_config(["--tls-key-file", "server-key.pem", "--tls-client-ca-file", "ca.pem"])

    assert config.tls == TlsFiles("server.pem", "server-key.pem", "ca.pem")
    assert config.api_keys == (ENV_KEY, NEW_KEY)
    assert ENV_KEY not in repr(config)


@pytest.mark.parametrize(
    "argv",
    [["--tls-cert-file", "server.pem"], ["--tls-key-file", "k.pem"], ["--tls-client-ca-file", "ca.pem"]],
)
def test_incomplete_tls_flags_are_refused(argv, monkeypatch):
    monkeypatch.delenv("TEXTGEN_TLS_CERT_FILE", raising=False)
    monkeypatch.delenv("TEXTGEN_TLS_KEY_FILE", raising=False)
    with pytest.raises(SystemExit):
        parse_config(argv)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("TEXTGEN_API_KEYS", ","),
        ("TEXTGEN_API_KEYS", " , "),
        ("TEXTGEN_API_KEYS", ""),
        ("TEXTGEN_API_KEY_FILE", ""),
        ("TEXTGEN_API_KEY_FILE", "  "),
    ],
)
def test_a_key_setting_that_names_no_key_refuses_to_start(variable, value, monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        parse_config([])
    assert exited.value.code != 0
    assert variable in capsys.readouterr().err


def test_the_service_refuses_to_start_with_an_empty_key_list(tmp_path):
    env = {**os.environ, "TEXTGEN_API_KEYS": ","}
    done = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "TEXTGEN_API_KEYS is set but names no key" in done.stderr


def test_a_server_with_an_empty_key_file_name_refuses_to_start(server_config):
    with pytest.raises(ValueError, match="the API key file setting is empty"):
        Server(dataclasses.replace(server_config(), api_key_file=""))


def test_a_key_file_without_keys_is_refused(tmp_path):
    path = key_file(tmp_path)

    with pytest.raises(ValueError, match="holds no API key"):
        ApiKeys(file=path)


def test_a_short_key_is_refused_without_being_shown(tmp_path):
    with pytest.raises(ValueError, match="1 API keys shorter than 16 characters") as refused:
        ApiKeys(file=key_file(tmp_path, FILE_KEY, "short-key"))

    assert "short-key" not in str(refused.value)


def test_key_file_lines_and_bearer_tokens(tmp_path):
    assert read_key_file(key_file(tmp_path, FILE_KEY, NEW_KEY)) == [FILE_KEY, NEW_KEY]
    assert bearer_token([("traceparent", "00-1-2-01"), ("authorization", f"Bearer {FILE_KEY}")]) == FILE_KEY
    assert bearer_token([("authorization", f"Basic {FILE_KEY}")]) == ""
    assert bearer_token([]) is None


TLS = TlsFiles("server.pem", "server-key.pem")
MTLS = TlsFiles("server.pem", "server-key.pem", "ca.pem")


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        ({"host": "127.0.0.1"}, []),
        ({"host": "[::1]"}, []),
        ({"host": "localhost"}, []),
        ({"host": "[::]"}, ["without TLS", "without API keys or client certificates"]),
        ({"host": "0.0.0.0", "api_keys": (ENV_KEY,)}, ["without TLS"]),
        ({"host": "10.0.0.5", "tls": TLS}, ["without API keys or client certificates"]),
        ({"host": "textgen.internal", "tls": TLS, "api_key_file": "keys"}, []),
        ({"host": "[::]", "tls": MTLS}, []),  # client certificates authenticate the callers
    ],
)
def test_exposure_warnings(overrides, warned):
    warnings = exposure_warnings(ServerConfig(**overrides))

    assert [warning.split(":")[0] for warning in warnings] == warned

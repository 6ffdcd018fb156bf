"""TLS reload (SIGHUP) of both fronts at once: one read of each file, both switched or neither, and the
HTTP front's client CAs replaced, not added to (certificates made at test time with trustme)."""

from __future__ import annotations

import dataclasses
import socket
import ssl
from pathlib import Path

import grpc
import pytest
import trustme
from conftest import ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.security import tls
from service.security.tls import TlsFiles

FRESH = [("grpc.use_local_subchannel_pool", 1)]  # a new connection, so a new handshake, per check


@dataclasses.dataclass
class Pki:
    server_ca: trustme.CA
    rotated_ca: trustme.CA
    client_ca: trustme.CA
    other_client_ca: trustme.CA

    def client(self, ca: trustme.CA) -> trustme.LeafCert:
        return ca.issue_cert("client@example.com")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(trustme.CA(), trustme.CA(), trustme.CA(), trustme.CA())


@dataclasses.dataclass
class Files:
    cert: Path
    key: Path
    client_ca: Path

    def write(self, server_ca: trustme.CA, *client_cas: trustme.CA) -> None:
        leaf = server_ca.issue_cert("127.0.0.1", "localhost")
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        self.key.write_bytes(leaf.private_key_pem.bytes())
        self.client_ca.write_bytes(b"".join(ca.cert_pem.bytes() for ca in client_cas))

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(str(self.cert), str(self.key), str(self.client_ca))


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "clients-ca.pem")


@pytest.fixture
def server(server_config, files, pki):
    """TLS with client certificates on both fronts; no model is loaded: handshakes are what is tested."""
    files.write(pki.server_ca, pki.client_ca, pki.other_client_ca)
    server = ServerThread(dataclasses.replace(server_config(), http_port=0, tls=files.tls)).start(load=False)
    yield server
    server.stop()


def reload(server: ServerThread) -> None:
    async def on_loop() -> None:
        server.server.certificates.reload()

    server.run(on_loop())


def grpc_accepts(server: ServerThread, server_ca: trustme.CA, client: trustme.LeafCert) -> bool:
    credentials = grpc.ssl_channel_credentials(
        server_ca.cert_pem.bytes(), client.private_key_pem.bytes(), client.cert_chain_pems[0].bytes()
    )
    with grpc.secure_channel(server.target, credentials, FRESH) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
            return False
    return True


def http_accepts(server: ServerThread, server_ca: trustme.CA, client: trustme.LeafCert) -> bool:
    """Whether an HTTPS request with `client`'s certificate, trusting `server_ca`, gets an HTTP answer."""
    context = ssl.create_default_context()
    server_ca.configure_trust(context)
    client.configure_cert(context)
    try:
        raw = socket.create_connection(("127.0.0.1", server.server.http.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(9) == b"HTTP/1.1 "
    except (ssl.SSLError, ConnectionError):
        return False


def test_a_client_ca_removed_from_the_file_stops_being_trusted_on_both_fronts(server, files, pki):
    removed, kept = pki.client(pki.client_ca), pki.client(pki.other_client_ca)
    assert all(accepts(server, pki.server_ca, removed) for accepts in (grpc_accepts, http_accepts))

    files.write(pki.server_ca, pki.other_client_ca)
    reload(server)

    for accepts in (grpc_accepts, http_accepts):
        assert not accepts(server, pki.server_ca, removed), accepts.__name__
        assert accepts(server, pki.server_ca, kept), accepts.__name__


def test_a_rotated_certificate_is_served_on_both_fronts(server, files, pki):
    client = pki.client(pki.client_ca)
    files.write(pki.rotated_ca, pki.client_ca)
    reload(server)

    for accepts in (grpc_accepts, http_accepts):
        assert accepts(server, pki.rotated_ca, client), accepts.__name__
        assert not accepts(server, pki.server_ca, client), accepts.__name__


def test_a_reload_that_fails_changes_neither_front(server, files, pki):
    client = pki.client(pki.client_ca)
    files.write(pki.rotated_ca, pki.client_ca)
    files.client_ca.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="no PEM CA certificate"):
        reload(server)

    for accepts in (grpc_accepts, http_accepts):
        assert accepts(server, pki.server_ca, client), accepts.__name__
        assert not accepts(server, pki.rotated_ca, client), accepts.__name__


def test_a_reload_reads_each_file_once(server, files, pki, monkeypatch):
    """Each file is read once and never again: removed right after that read, the reload still succeeds
    and both fronts serve what was read, so a rotation between reads cannot pair a key with another
    certificate."""
    client = pki.client(pki.other_client_ca)
    files.write(pki.rotated_ca, pki.other_client_ca)
    read = tls.TlsMaterial.read.__func__

    def read_once_then_remove(cls, tls_files: TlsFiles) -> tls.TlsMaterial:
        material = read(cls, tls_files)
        for path in (tls_files.cert_file, tls_files.key_file, tls_files.client_ca_file):
            Path(path).unlink()
        return material

    monkeypatch.setattr(tls.TlsMaterial, "read", classmethod(read_once_then_remove))
    reload(server)

    for accepts in (grpc_accepts, http_accepts):
        assert accepts(server, pki.rotated_ca, client), accepts.__name__

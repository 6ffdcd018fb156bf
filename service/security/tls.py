"""TLS for the server: its certificate and key, and for mTLS the client CA, read from PEM files.

`reload()` re-reads the files (on SIGHUP): each file is read once, and both fronts' credentials (grpc's
certificate configuration, the OpenAI HTTP front's `ssl.SSLContext`) are made from those bytes, so a
rotation between reads cannot pair a key with the wrong certificate. Both switch together, and only once
both are built: a reload that fails changes neither. grpc asks for the certificates at every new
connection's TLS handshake, on its own threads; the HTTP front's listening context hands each handshake
the current context (its SNI callback), so a client CA removed from the file stops being trusted on both
ports. Connections already open keep theirs, with their calls in flight.
"""

from __future__ import annotations

import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM files: the certificate chain, its private key, and (mTLS) the CA that signs clients."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """One read of the files: the bytes every front's credentials are made from."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @classmethod
    def read(cls, files: TlsFiles) -> TlsMaterial:
        """Each file read once; OSError when one cannot be."""
        client_ca = Path(files.client_ca_file).read_bytes() if files.client_ca_file is not None else None
        return cls(Path(files.cert_file).read_bytes(), Path(files.key_file).read_bytes(), client_ca)


class ServerCertificates:
    """The server's TLS credentials (`credentials`, for `add_secure_port`; `ssl_context`, for the HTTP
    front), re-read by `reload()`. With a client CA, every client must present a certificate that it signed.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        material = TlsMaterial.read(files)
        self._lock = threading.Lock()  # grpc's handshake threads take what the event loop's reload() left
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._context = ssl_context(files, material)  # the HTTP front's, for connections from now on
        self.credentials = grpc.dynamic_ssl_server_credentials(
            grpc_configuration(material),
            self._fetch,
            require_client_authentication=material.client_ca is not None,
        )
        self.ssl_context = ssl_context(files, material)  # the one the HTTP port listens with
        self.ssl_context.sni_callback = self._select

    def reload(self) -> None:
        """Re-read the files for connections made from now on, on both fronts.

        Raises OSError or ValueError, keeping the current certificates on both, when a file cannot be read,
        is not PEM, or the key does not belong to the certificate.
        """
        material = TlsMaterial.read(self.files)
        context = ssl_context(self.files, material)
        configuration = grpc_configuration(material)
        with self._lock:
            self._context, self._pending = context, configuration

    def _select(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        """The HTTP port's SNI callback, called in every handshake: the current certificate and client CAs."""
        with self._lock:
            connection.context = self._context

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, called at each handshake: a new configuration once after a reload, else None."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


def ssl_context(files: TlsFiles, material: TlsMaterial) -> ssl.SSLContext:
    """A TLS server context holding `material`; ValueError (naming the files) when it does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # ssl loads a certificate chain only from files: these bytes go through a private temporary folder.
    with tempfile.TemporaryDirectory(prefix="textgen-tls-") as folder:
        cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_file.write_bytes(material.cert_chain)
        key_file.write_bytes(material.private_key)
        try:
            context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as error:
            names = f"{files.cert_file}, {files.key_file}"
            raise ValueError(f"{names}: not a PEM certificate chain and its private key: {error}") from None
    if material.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as error:
            raise ValueError(f"{files.client_ca_file}: no PEM CA certificate: {error}") from None
    return context


def grpc_configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    """`material` as grpc's certificate configuration (checked by `ssl_context` first)."""
    pair = (material.private_key, material.cert_chain)
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=material.client_ca)

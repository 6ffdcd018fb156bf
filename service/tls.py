"""TLS for the server: its certificate and key, and for mTLS the client CA, read from PEM files.

`reload()` re-reads the files (on SIGHUP). grpc asks for the certificates at every new connection's TLS
handshake, on its own threads; a reload changes what connections made after it get, and connections
already open keep theirs, with their calls in flight. The OpenAI HTTP front's `ssl.SSLContext` is loaded
from the same files and reloaded with them.
"""

from __future__ import annotations

import ssl
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


class ServerCertificates:
    """The server's TLS credentials (`credentials`, for `add_secure_port`), re-read by `reload()`.

    With a client CA, every client must present a certificate that it signed.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # grpc's handshake threads take what the event loop's reload() left
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _read(files), self._fetch, require_client_authentication=files.client_ca_file is not None
        )
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the HTTP front's
        if files.client_ca_file is not None:
            self.ssl_context.verify_mode = ssl.CERT_REQUIRED
        self._load_ssl_context()

    def reload(self) -> None:
        """Re-read the files for connections made from now on.

        Raises OSError or ValueError, keeping the current certificates, when a file cannot be read, is
        not PEM, or the key does not belong to the certificate.
        """
        configuration = _read(self.files)
        with self._lock:
            self._pending = configuration
        self._load_ssl_context()

    def _load_ssl_context(self) -> None:
        """Load the files (checked by `_read`) into `ssl_context`: new connections get them. A reload adds the
        client CA file's certificates to those already trusted."""
        self.ssl_context.load_cert_chain(self.files.cert_file, self.files.key_file)
        if self.files.client_ca_file is not None:
            self.ssl_context.load_verify_locations(self.files.client_ca_file)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, called at each handshake: a new configuration once after a reload, else None."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


def _read(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """The files as a grpc certificate configuration, checked the way a TLS server will load them."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert_file, files.key_file)
    except ssl.SSLError as error:
        names = f"{files.cert_file}, {files.key_file}"
        raise ValueError(f"{names}: not a PEM certificate chain and its private key: {error}") from None
    client_ca = None
    if files.client_ca_file is not None:
        client_ca = Path(files.client_ca_file).read_bytes()
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as error:
            raise ValueError(f"{files.client_ca_file}: no PEM CA certificate: {error}") from None
    pair = (Path(files.key_file).read_bytes(), Path(files.cert_file).read_bytes())
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)

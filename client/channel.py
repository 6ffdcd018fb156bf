"""Opening a client's channel: `grpc` and `grpc.aio` take the same target, credentials and options; TLS
credentials from PEM files, and the metadata that carries an API key."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc


def open_channel(
    api: ModuleType,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]],
    **kwargs: Any,
) -> Any:
    """A channel from `api` (`grpc` or `grpc.aio`) to `target`: TLS with `credentials`, plaintext without.

    `kwargs` go to the channel as they are, e.g. the `interceptors` of a `grpc.aio` channel.
    """
    if credentials is None:
        return api.insecure_channel(target, options, **kwargs)
    return api.secure_channel(target, credentials, options, **kwargs)


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS that trusts the CA certificates in `ca_file` (PEM; None: the system's roots), and for mTLS
    presents the client certificate chain in `cert_file` with its private key in `key_file`."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(_read(ca_file), _read(key_file), _read(cert_file))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def api_key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that sends `api_key` (None: $TEXTGEN_API_KEY) with a call; empty without a key."""
    key = os.environ.get("TEXTGEN_API_KEY") if api_key is None else api_key
    return (("authorization", f"Bearer {key}"),) if key else ()


def replica_options(health_service: str = "textgen.v1.TextGenerationService") -> list[tuple[str, str]]:
    """Channel options for a target with many replicas (`dns:///textgen:50051`, `ipv4:a:p,b:p`): calls
    spread over every address (round_robin), and over those whose health service says SERVING only, so a
    replica that is loading or draining gets no new calls."""
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": health_service},
    }
    return [("grpc.service_config", json.dumps(config))]

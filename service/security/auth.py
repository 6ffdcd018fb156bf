"""API keys: which callers may use the server, checked on every call by a gRPC server interceptor.

A caller sends `authorization: Bearer <key>` metadata. Keys come from `TEXTGEN_API_KEYS` (comma-separated,
fixed for the process's life) and from `--api-key-file` (one per line, re-read by `reload()` on SIGHUP).
Only SHA-256 digests of the keys are kept, and a presented key is compared with every one of them in
constant time, so neither its length nor which key it matched shows in the time a refusal takes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from service import memory
from service.status import Unauthenticated, abort

# Shorter keys are refused when loaded: they could be guessed (`openssl rand -hex 32` makes 64 characters).
MIN_KEY_CHARS = 16
# Probes carry no secrets (Kubernetes' gRPC probes cannot send metadata), and health tells nothing.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

_MISSING = "this server needs an API key: send the metadata 'authorization: Bearer <key>'"
_INVALID = "the API key is not valid"


def read_key_file(path: str) -> list[str]:
    """The keys in `path`: one per line, surrounding spaces ignored, blank lines and `#` comments skipped."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def parse_key_list(value: str) -> list[str]:
    """The keys in a comma-separated list such as `TEXTGEN_API_KEYS`, empty items skipped."""
    return [key.strip() for key in value.split(",") if key.strip()]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _digests(keys: Sequence[str], source: str) -> list[bytes]:
    """The digests of `keys`; ValueError, naming `source` but no key, if one is shorter than the minimum."""
    short = sum(len(key) < MIN_KEY_CHARS for key in keys)
    if short:
        raise ValueError(f"{source}: {short} API keys shorter than {MIN_KEY_CHARS} characters")
    return [_digest(key) for key in keys]


class ApiKeys:
    """The keys the server accepts: `keys` given once, plus those of `file`, which `reload()` re-reads."""

    def __init__(self, keys: Sequence[str] = (), file: str | None = None) -> None:
        if file is not None and not file.strip():
            raise ValueError("the API key file setting is empty: name the file")
        self.file = file
        self._fixed = _digests([key for key in keys if key], "TEXTGEN_API_KEYS")
        self._digests = self._load()

    def reload(self) -> None:
        """Re-read the key file; keys it no longer holds are refused from the next call on.

        Raises OSError or ValueError, keeping the current keys, when the file cannot be read, holds no
        key (a server that asked for keys never falls back to serving without them) or a short one.
        """
        self._digests = self._load()

    def accepts(self, key: str | None) -> bool:
        """Whether `key` is one of the keys, in time that depends on neither the key nor which one matched."""
        if not key:
            return False
        presented = _digest(key)
        # A list, not a generator: every digest is compared, whichever matches.
        return any([hmac.compare_digest(presented, digest) for digest in self._digests])

    def _load(self) -> list[bytes]:
        digests = list(self._fixed)
        if self.file is not None:
            file_keys = read_key_file(self.file)
            if not file_keys:
                raise ValueError(f"{self.file} holds no API key")
            digests += _digests(file_keys, self.file)
        if not digests:
            raise ValueError("no API key given")
        return digests


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata; None when there is none."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to a call without a valid key, except to the open (health) methods.

    Put it after the tracing interceptors, so that a refused call is still a server span with its status
    code; neither the key nor the metadata that carries it is recorded anywhere.
    """

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if self._keys.accepts(token):
            return handler
        return _refusing(handler, _MISSING if token is None else _INVALID)


def _refusing(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by an UNAUTHENTICATED answer of the same kind.

    The request is left as bytes: an unauthenticated caller's messages are never parsed, and the heap pages
    a flood of them went through are given back once it is over (`service.memory`).
    """

    async def refuse_unary(request, context):
        memory.soon()
        await abort(context, Unauthenticated(details))

    async def refuse_stream(request, context):
        memory.soon()
        await abort(context, Unauthenticated(details))
        yield  # never reached: an async generator, as tracing interceptors expect of a response stream

    kind = ("stream" if handler.request_streaming else "unary") + "_"
    kind += "stream" if handler.response_streaming else "unary"
    behavior = refuse_stream if handler.response_streaming else refuse_unary
    return handler._replace(request_deserializer=None, **{kind: behavior})

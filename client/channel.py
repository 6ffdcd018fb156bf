"""Opening a client's channel: `grpc` and `grpc.aio` take the same target, credentials and options."""

from __future__ import annotations

from collections.abc import Sequence
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

"""Re-read the API key file and the TLS files when they change, as SIGHUP does, without a signal.

Kubernetes updates a mounted Secret's files in place (an atomic swap of a symbolic link) but tells no
one: a revoked key stayed valid, and a renewed certificate unused, until a restart. Polling the files'
identity (inode, size, modification time; `os.stat` follows the links) every few seconds costs nothing
and needs no sidecar, no shared process namespace and no file-notification API.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

Fingerprint = tuple[tuple[int, int, int, int] | None, ...]


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """What identifies each file's current content: None for one that cannot be read now."""
    identities = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            identities.append(None)
        else:
            identities.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(identities)


async def reload_on_change(paths: Sequence[str], reload: Callable[[], None], interval_s: float) -> None:
    """Every `interval_s`, call `reload` if any of `paths` changed since the last look; runs until cancelled.

    A file caught half-written changes again once complete, and is reloaded again then."""
    last = fingerprint(paths)
    while True:
        await asyncio.sleep(interval_s)
        current = fingerprint(paths)
        if current != last:
            last = current
            reload()

"""Which prefix-cache partition a caller's requests read: one per API key, unless the server shares.

With keys, a tenant's prompt blocks are reused only by requests with the same key, so another tenant can
learn neither from `cached_prompt_tokens` nor from a faster first token what it sent (vLLM's answer to
the same leak is a per-request `cache_salt`, which both fronts take as well). The partition is named by a
digest of the key, never the key.
"""

from __future__ import annotations

import hashlib

from service.config import ServerConfig


def cache_tenant(config: ServerConfig, api_key: str | None) -> str:
    """The prefix-cache tenant of a caller who sent `api_key` (already accepted): "" is the shared cache,
    which every caller reads without keys or with `--shared-prefix-cache`."""
    if not config.keyed or config.shared_prefix_cache or not api_key:
        return ""
    return hashlib.sha256(b"textgen prefix-cache tenant\0" + api_key.encode()).hexdigest()[:32]

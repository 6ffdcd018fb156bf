"""Where textgen keeps what it makes once and reuses: converted models and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TEXTGEN_CACHE_DIR`, else `~/.cache/textgen`."""
    return Path(os.environ.get("TEXTGEN_CACHE_DIR", Path.home() / ".cache" / "textgen"))

"""The "cpu" decode backend: the C paged decode-attention kernel (engine/csrc/paged_attention.c).

The torch decode path gathers every sequence's KV blocks into new tensors and then runs small batched
matmuls over them; on the CPU both are bound by memory and per-call overheads. The C kernel reads the
blocks in place, once. It is compiled with the system's C compiler (`cc`, or `$CC`) into
`~/.cache/textgen/kernels` the first time it is needed and loaded with ctypes; when no compiler is there
the engine says so and falls back to the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import threading
from pathlib import Path

import torch

from engine.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parents[1] / "csrc" / "paged_attention.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate.split()[0]
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not be loaded on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.machine())


def build() -> Path:
    """Compile the kernel (once per source and flags; the result is cached) and return the library."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    key = source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"paged_attention-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    command = [compiler, *_FLAGS, str(SOURCE), "-o", str(staging), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    staging.replace(target)  # atomic: a concurrent builder sees the whole library or none
    return target


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None (with the reason in `load_error()`) if it cannot be."""
    global _library, _error
    with _lock:
        if _library is None and _error is None:
            try:
                library = ctypes.CDLL(str(build()))
                fn = library.paged_decode_attention
                fn.restype = ctypes.c_int
                fn.argtypes = (
                    [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float] + [ctypes.c_int64] * 2
                )
                _library = library
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _error = str(exc)
                log.warning("the CPU attention kernel is unavailable, using the torch path: %s", exc)
        return _library


def load_error() -> str | None:
    return _error


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [batch, heads, dim], caches [kv_heads, slots, dim], tables [batch, blocks] -> [batch, heads, dim].

    Float32 CPU tensors only; `load()` must have succeeded.
    """
    library = load()
    assert library is not None, load_error()
    batch, num_heads, head_dim = q.shape
    num_kv_heads, num_slots, _ = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = library.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        out.data_ptr(), num_heads, num_kv_heads, head_dim, num_slots, tables.shape[1], block_size,
        scale, 0, batch * num_kv_heads,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scores")
    return out

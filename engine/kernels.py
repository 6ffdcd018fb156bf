"""Builds the project's C kernels (engine/csrc) with the system's C compiler, once, into the cache.

A kernel is compiled the first time it is needed (about a second) into `~/.cache/textgen/kernels`, keyed
by its sources, the flags and the CPU (it is built with -march=native), and loaded with ctypes. It links
OpenMP against the libgomp that torch already loaded, so it runs on torch's own thread team.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

from engine.paths import cache_dir

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate.split()[0]
    return None


def cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not be loaded on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.machine())


def build(name: str) -> Path:
    """Compile engine/csrc/`name`.c (with the .c files it includes; the result is cached); the library."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    sources = b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.c")))  # includes are among them
    key = sources + " ".join([name, cc, *FLAGS, cpu_signature()]).encode()
    target = cache_dir() / "kernels" / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    command = [cc, *FLAGS, str(CSRC / f"{name}.c"), "-o", str(staging), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    staging.replace(target)  # atomic: a concurrent builder sees the whole library or none
    return target

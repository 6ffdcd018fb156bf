"""Builds the project's C kernels (engine/csrc) with the system's C compiler, once, into the cache.

A kernel is compiled the first time it is needed (about a second) into `~/.cache/textgen/kernels`, keyed
by its sources, the flags and the CPU (it is built with -march=native), and loaded with ctypes. It links
OpenMP against the libgomp that torch already loaded, so it runs on torch's own thread team.

Where there is no compiler (a container's final stage), `python -m engine.kernels --prebuild DIR` run where
there is one builds every kernel for a baseline x86-64 CPU (x86-64-v3: AVX2, FMA, F16C) into DIR, and
`TEXTGEN_PREBUILT_KERNELS=DIR` makes `build` use those: the same results, without the node's own extensions.
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
from collections.abc import Callable
from pathlib import Path

from engine.paths import cache_dir

log = logging.getLogger(__name__)

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


BASELINE_FLAGS = [flag if flag != "-march=native" else "-march=x86-64-v3" for flag in FLAGS]
PREBUILT_ENV = "TEXTGEN_PREBUILT_KERNELS"


def build(name: str) -> Path:
    """Compile engine/csrc/`name`.c (with the .c files it includes; the result is cached); the library.
    Without a compiler, the prebuilt baseline library in `$TEXTGEN_PREBUILT_KERNELS`, if there is one."""
    cc = compiler()
    if cc is None:
        prebuilt = os.environ.get(PREBUILT_ENV)
        if prebuilt and (Path(prebuilt) / f"{name}.so").exists():
            return Path(prebuilt) / f"{name}.so"
        raise RuntimeError(f"no C compiler found (set CC, install gcc, or set {PREBUILT_ENV})")
    sources = b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.c")))  # includes are among them
    key = sources + " ".join([name, cc, *FLAGS, cpu_signature()]).encode()
    target = cache_dir() / "kernels" / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists():
        return target
    return _compile(cc, name, FLAGS, target)


def prebuild(directory: Path) -> list[Path]:
    """Every kernel for a baseline x86-64 CPU, as `directory`/`name`.so (for `$TEXTGEN_PREBUILT_KERNELS`)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return [_compile(cc, path.stem, BASELINE_FLAGS, directory / f"{path.stem}.so") for path in _LIBRARIES]


_LIBRARIES = [CSRC / "quantized.c", CSRC / "paged_attention.c"]


def _compile(cc: str, name: str, flags: list[str], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    command = [cc, *flags, str(CSRC / f"{name}.c"), "-o", str(staging), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    staging.replace(target)  # atomic: a concurrent builder sees the whole library or none
    return target


class Library:
    """A kernel library built and loaded at first use. `get()` is None when it cannot be, and `error`
    then says why; `declare` sets the argument and result types of its functions."""

    def __init__(self, name: str, declare: Callable[[ctypes.CDLL], None]) -> None:
        self.name = name
        self.declare = declare
        self.error: str | None = None
        self._library: ctypes.CDLL | None = None
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        with self._lock:
            if self._library is None and self.error is None:
                try:
                    library = ctypes.CDLL(str(build(self.name)))
                    self.declare(library)
                    self._library = library
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    self.error = str(exc)
                    log.warning("the %s kernel is unavailable: %s", self.name, exc)
            return self._library


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the C kernels for a baseline x86-64 CPU.")
    parser.add_argument("--prebuild", type=Path, required=True, help="directory to write NAME.so into")
    for built in prebuild(parser.parse_args().prebuild):
        print(built)

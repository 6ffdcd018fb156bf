"""Builds the project's C kernels (engine/execution/csrc) with the system's C compiler, once, into the cache.

A kernel is compiled the first time it is needed (about a second) into `~/.cache/textgen/kernels`, keyed
by its sources, the flags and the CPU (it is built with -march=native), and loaded with ctypes. It links
OpenMP against the libgomp that torch already loaded, so it runs on torch's own thread team.

Every build computes the same bits: the kernels' float arithmetic is written in an order C fixes (no
vector-width-dependent reductions, no contraction the source does not ask for), and the only
CPU-specific instructions are exact integer ones (VNNI or AVX2 for the int8 dot products). So a request's
output does not depend on which CPU of a fleet serves it; tests/test_kernel_targets.py builds the
kernels for every level in TARGETS this CPU can run (`$TEXTGEN_KERNEL_TARGET` picks one) and checks it.

A C++ source (csrc/fp16_gemm.cpp) is built with the C++ compiler against the FBGEMM headers and library
that torch ships, so its key holds torch's version and place too.

Where there is no compiler (a container's final stage), `python -m engine.execution.kernels --prebuild DIR`
run where there is one builds every kernel for a baseline x86-64 CPU (x86-64-v3: AVX2, FMA, F16C) into DIR
with a manifest of the CPU features it needs, and `TEXTGEN_PREBUILT_KERNELS=DIR` makes `build` use those on a
CPU that has them (elsewhere the kernels are unavailable and the engine falls back to torch, never SIGILL).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.execution.paths import cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -ffp-contract=off: a multiply and an add stay two roundings on every target (fused only where the source
# says fmaf), so the builds for different CPUs compute the same bits.
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off"]


@dataclass(frozen=True, slots=True)
class Target:
    """A CPU the kernels are built for: the compiler's flags, and the /proc/cpuinfo flags a CPU must have
    to run the result (none for `native`: built on the CPU it runs on)."""

    name: str
    flags: tuple[str, ...]
    cpu_flags: frozenset[str]


_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
TARGETS = {
    target.name: target
    for target in (
        Target("native", ("-march=native",), frozenset()),
        Target("x86-64-v3", ("-march=x86-64-v3",), _V3),  # AVX2, FMA, F16C: the baseline
        Target("avx-vnni", ("-march=x86-64-v3", "-mavxvnni"), _V3 | {"avx_vnni"}),
        Target("avx512-vnni", ("-march=x86-64-v4", "-mavx512vnni"), _V4 | {"avx512_vnni"}),
    )
}
BASELINE = TARGETS["x86-64-v3"]
TARGET_ENV = "TEXTGEN_KERNEL_TARGET"
PREBUILT_ENV = "TEXTGEN_PREBUILT_KERNELS"
_PREBUILT_MANIFEST = "target.json"


def compiler(cplusplus: bool = False) -> str | None:
    """The C compiler (`$CC`, Python's, cc, gcc), or with `cplusplus` the C++ one (`$CXX`, c++, g++)."""
    candidates = ("CXX", "c++", "g++") if cplusplus else ("CC", sysconfig.get_config_var("CC"), "cc", "gcc")
    for candidate in (os.environ.get(candidates[0]), *candidates[1:]):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate.split()[0]
    return None


def _compiler_for(path: Path) -> str | None:
    return compiler(cplusplus=True) if path.suffix == ".cpp" else compiler()


def _no_compiler(path: Path, remedy: str = "") -> str:
    language, variable, package = ("C++", "CXX", "g++") if path.suffix == ".cpp" else ("C", "CC", "gcc")
    return f"no {language} compiler found (set {variable}, install {package}{remedy})"


def source(name: str) -> Path:
    """csrc/`name`.cpp where there is one, else csrc/`name`.c."""
    cpp = CSRC / f"{name}.cpp"
    return cpp if cpp.exists() else CSRC / f"{name}.c"


def _language_flags(path: Path) -> tuple[list[str], list[str]]:
    """The flags before and after the source file: C11, or C++17 with torch's FBGEMM headers and its
    libraries (csrc/asmjit stands in for the asmjit headers that FBGEMM's headers name and torch lacks)."""
    if path.suffix != ".cpp":
        return ["-std=c11"], ["-lm"]
    torch_dir = _torch_dir()
    libraries = torch_dir / "lib"
    compile_flags = ["-std=c++17", f"-I{CSRC}", f"-I{torch_dir / 'include'}"]
    return compile_flags, [f"-L{libraries}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libraries}"]


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None, "textgen runs on torch"
    return Path(spec.origin).parent


def cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not be loaded on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.machine())


def missing_cpu_flags(target: Target) -> list[str]:
    """The CPU features `target`'s code uses that this CPU lacks (running it anyway would die of SIGILL)."""
    have = set(cpu_signature().split())
    return sorted(target.cpu_flags - have)


def selected_target() -> Target:
    """`$TEXTGEN_KERNEL_TARGET` (a name in TARGETS), `native` by default."""
    name = os.environ.get(TARGET_ENV, "native")
    if name not in TARGETS:
        raise RuntimeError(f"{TARGET_ENV}={name!r} is not one of {', '.join(TARGETS)}")
    return TARGETS[name]


def build(name: str, target: Target | None = None) -> Path:
    """Compile engine/execution/csrc/`name`.c or .cpp (with the files it includes; the result is cached) for
    `target` (`selected_target()` by default); the library. Without a compiler, the prebuilt library in
    `$TEXTGEN_PREBUILT_KERNELS`, if there is one and this CPU can run it."""
    path = source(name)
    cc = _compiler_for(path)
    if cc is None:
        prebuilt = os.environ.get(PREBUILT_ENV)
        if prebuilt and (Path(prebuilt) / f"{name}.so").exists():
            return _checked_prebuilt(Path(prebuilt), name)
        raise RuntimeError(_no_compiler(path, f", or set {PREBUILT_ENV}"))
    target = target or selected_target()
    missing = missing_cpu_flags(target)
    if missing:
        lacking = ", ".join(missing)
        raise RuntimeError(f"the {target.name} kernels need CPU features this CPU lacks: {lacking}")
    # Every source and header (includes are among them), and for C++ the torch it links against.
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".c", ".cpp", ".h"))
    sources = b"".join(p.read_bytes() for p in files)
    linked = [str(_torch_dir()), importlib.metadata.version("torch")] if path.suffix == ".cpp" else []
    key = sources + " ".join([name, cc, *FLAGS, *target.flags, cpu_signature(), *linked]).encode()
    target_path = cache_dir() / "kernels" / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target_path.exists():
        return target_path
    return _compile(cc, path, [*FLAGS, *target.flags], target_path)


def prebuild(directory: Path, target: Target = BASELINE) -> list[Path]:
    """Every kernel for `target` (the baseline x86-64-v3 by default), as `directory`/`name`.so, with a
    manifest of the CPU features it needs (for `$TEXTGEN_PREBUILT_KERNELS`)."""
    built = []
    for path in _LIBRARIES:
        cc = _compiler_for(path)
        if cc is None:
            raise RuntimeError(_no_compiler(path))
        built.append(_compile(cc, path, [*FLAGS, *target.flags], directory / f"{path.stem}.so"))
    manifest = {"target": target.name, "cpu_flags": sorted(target.cpu_flags)}
    (directory / _PREBUILT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return built


def _checked_prebuilt(directory: Path, name: str) -> Path:
    """`directory`/`name`.so, once its manifest shows this CPU has every feature it was built for."""
    try:
        manifest = json.loads((directory / _PREBUILT_MANIFEST).read_text())
        needed = Target(str(manifest["target"]), (), frozenset(manifest["cpu_flags"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{directory} holds no readable {_PREBUILT_MANIFEST}") from exc
    missing = missing_cpu_flags(needed)
    if missing:
        raise RuntimeError(
            f"the prebuilt kernels in {directory} were built for {needed.name} and need CPU features this CPU"
            f" lacks: {', '.join(missing)}"
        )
    return directory / f"{name}.so"


_LIBRARIES = [CSRC / "quantized.c", CSRC / "paged_attention.c", CSRC / "fp16_gemm.cpp"]


def _compile(cc: str, path: Path, flags: list[str], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    before, after = _language_flags(path)
    command = [cc, *flags, *before, str(path), "-o", str(staging), *after]
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

    parser = argparse.ArgumentParser(description="Build the C kernels for an x86-64 CPU level ahead of time.")
    parser.add_argument("--prebuild", type=Path, required=True, help="directory to write NAME.so into")
    levels = sorted(set(TARGETS) - {"native"})  # a native build's manifest could not say what it needs
    parser.add_argument("--target", choices=levels, default=BASELINE.name, help="the CPU level")
    args = parser.parse_args()
    for built in prebuild(args.prebuild, TARGETS[args.target]):
        print(built)

"""llama.cpp's `llama-server`, built once from the llama-cpp-python sdist on PyPI and cached.

The sdist vendors llama.cpp at a known commit; only the server target is built (Release, native CPU, no
curl, no TLS, no web UI to download), linked statically, and the binary alone is kept in
`~/.cache/textgen/peers/llama-cpp-python-<version>-<key>/`, where the key covers the CMake flags and the
CPU's feature flags (a `-march=native` binary must not run on another CPU). About 12 minutes on 2 cores.

    python -m bench.peers.llamacpp_build            # prints the binary's path, building it if needed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from engine.execution.kernels import cpu_signature
from engine.execution.paths import cache_dir

PACKAGE = "llama-cpp-python"
DEFAULT_VERSION = "0.3.36"
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server lives under tools/
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # otherwise the build downloads the web UI from Hugging Face
)
# ggml's AMX matmul segfaults at the first forward on this project's Sapphire Rapids machine (the open
# ggml-org/llama.cpp#20824): -march=native keeps every other extension, AMX is turned off.
if platform.machine() == "x86_64":
    NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS += (f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")
TARGET = "llama-server"


def peers_dir() -> Path:
    """Where peer systems are built: `<textgen cache>/peers`."""
    return cache_dir() / "peers"


def build_key(version: str, cmake_args: Sequence[str], cpu: str) -> str:
    """The cache directory's name for one version built with `cmake_args` on a CPU with flags `cpu`."""
    digest = hashlib.sha256("\n".join([*cmake_args, cpu]).encode()).hexdigest()[:12]
    return f"{PACKAGE}-{version}-{digest}"


def cached_binary(version: str) -> Path:
    """Where `version`'s server is (or will be) kept on this CPU."""
    return peers_dir() / build_key(version, CMAKE_ARGS, cpu_signature()) / TARGET


def sdist_version(filename: str) -> str:
    """The version in an sdist's file name: `llama_cpp_python-0.3.36.tar.gz` -> `0.3.36`."""
    match = re.fullmatch(r"llama_cpp_python-(.+)\.tar\.gz", filename)
    assert match, f"not a llama-cpp-python sdist: {filename}"
    return match.group(1)


def download_sdist(version: str | None, into: Path) -> Path:
    """`pip download` the sdist of `version` (None: the newest) into `into`; the path of the tarball."""
    requirement = PACKAGE if version is None else f"{PACKAGE}=={version}"
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    done = subprocess.run([*command, "-d", str(into), requirement], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed: {done.stderr.strip()[-2000:]}")
    (tarball,) = into.glob("llama_cpp_python-*.tar.gz")
    return tarball


def fetch_sdist(version: str, into: Path) -> Path:
    """The sdist of `version`, or of the newest release when PyPI no longer has that one (said on stdout)."""
    try:
        return download_sdist(version, into)
    except RuntimeError as error:
        print(f"{PACKAGE}=={version} could not be downloaded ({error}); trying the newest release")
    tarball = download_sdist(None, into)
    print(f"using {PACKAGE} {sdist_version(tarball.name)} instead of {version}")
    return tarball


def compile_server(tarball: Path, work: Path, jobs: int) -> Path:
    """Unpack the sdist into `work` and build the server target; the path of the built binary."""
    with tarfile.open(tarball) as archive:
        archive.extractall(work, filter="data")
    (source,) = [p / "vendor" / "llama.cpp" for p in work.iterdir() if (p / "vendor" / "llama.cpp").is_dir()]
    build = work / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_ARGS],
        ["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)],
    ]
    for step in steps:
        print("+", shlex.join(step), flush=True)
        log = work / "build.log"
        with log.open("a") as out:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = "\n".join(log.read_text().splitlines()[-40:])
                raise RuntimeError(f"{shlex.join(step)} failed:\n{tail}")
    return build / "bin" / TARGET


def ensure_server(version: str = DEFAULT_VERSION, jobs: int = 2) -> Path:
    """The cached `llama-server` for `version` (or the newest release if PyPI lacks it), built if missing."""
    binary = cached_binary(version)
    if binary.exists():
        return binary
    peers_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamacpp-build-", dir=peers_dir()) as tmp:
        tarball = fetch_sdist(version, Path(tmp))
        actual = sdist_version(tarball.name)
        binary = cached_binary(actual)
        if binary.exists():
            return binary
        print(f"building {TARGET} from {tarball.name} into {binary.parent} (about 12 minutes on 2 cores)")
        start = time.monotonic()
        built = compile_server(tarball, Path(tmp), jobs)
        binary.parent.mkdir(parents=True, exist_ok=True)
        staging = binary.with_name(f"{TARGET}.tmp")
        shutil.copy2(built, staging)
        info = {"package": PACKAGE, "version": actual, "cmake_args": list(CMAKE_ARGS), "jobs": jobs}
        info["build_s"] = round(time.monotonic() - start, 1)
        about = subprocess.run([built, "--version"], capture_output=True, text=True)
        info["llama_server_version"] = (about.stdout + about.stderr).strip()
        (binary.parent / "build.json").write_text(json.dumps(info, indent=1))
        staging.rename(binary)  # last: a binary present means a finished build
        print(f"built {binary} in {info['build_s'] / 60:.1f} min")
    return binary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers.llamacpp_build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--version", default=DEFAULT_VERSION, help=f"the {PACKAGE} release to build")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = parser.parse_args(argv)
    print(ensure_server(args.version, args.jobs))


if __name__ == "__main__":
    main()

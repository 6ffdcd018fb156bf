"""The CUDA image can run Triton: its final stage installs a C compiler (Triton builds its launcher with one
at the first kernel launch), read from deploy/Dockerfile.cuda without a container engine."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPILERS = {"gcc", "clang", "build-essential"}


def final_stage_commands(dockerfile: Path) -> list[str]:
    """The shell commands of the last stage's RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    runs = [line[4:] for line in instructions[last_from:] if line.upper().startswith("RUN ")]
    return [command.strip() for run in runs for command in re.split(r"&&|;", run)]


def installed_compilers(dockerfile: Path) -> set[str]:
    """The C compilers the final stage leaves installed: apt-get installs less apt-get removes."""
    installed: set[str] = set()
    for command in final_stage_commands(dockerfile):
        words = shlex.split(command)
        if words[:1] == ["apt-get"] and len(words) > 1:
            packages = {w for w in words[2:] if not w.startswith("-")} & COMPILERS
            if words[1] == "install":
                installed |= packages
            elif words[1] in ("remove", "purge", "autoremove"):
                installed -= packages
    return installed


def test_the_cuda_image_keeps_a_c_compiler_for_tritons_launcher():
    assert installed_compilers(DEPLOY / "Dockerfile.cuda")


def test_the_check_finds_no_compiler_in_an_image_without_one():
    assert installed_compilers(DEPLOY / "Dockerfile") == set()  # the CPU image: prebuilt kernels, no gcc


def test_the_check_sees_a_compiler_removed_after_its_install(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM base AS build\nRUN apt-get install -y gcc\nFROM base\n"
        "RUN apt-get update \\\n    && apt-get install -y --no-install-recommends gcc libc6-dev\n"
        "RUN apt-get purge -y gcc && rm -rf /var/lib/apt/lists/*\n"
    )
    assert installed_compilers(dockerfile) == set()

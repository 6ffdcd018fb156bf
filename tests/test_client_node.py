"""The Node.js example (examples/node) streams from the server with @grpc/grpc-js and the same proto."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from client import TextGenClient

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
PROMPT = "The quick brown fox"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture(scope="module")
def node_example() -> Path:
    """The example with its npm dependencies installed (`make node-deps` does this; so does this fixture)."""
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists():
        npm = shutil.which("npm")
        assert npm, "node is installed but npm is not: cannot install the example's dependencies"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, timeout=600)
    return EXAMPLE


def run_node(example: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", "generate_stream.js", *args], cwd=example, capture_output=True, text=True, timeout=60
    )


def test_node_stream_text_equals_the_python_generate_text(node_example, server):
    with TextGenClient(server.target) as client:
        expected = client.generate(PROMPT, max_new_tokens=12)

    done = run_node(node_example, "--target", server.target, "--max-new-tokens", "12", PROMPT)

    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text
    assert f"{expected.usage.completion_tokens} completion tokens" in done.stderr


def test_node_chat_stream(node_example, server):
    done = run_node(node_example, "--target", server.target, "--max-new-tokens", "4", "--chat", "Hi")

    assert done.returncode == 0, done.stderr
    assert "FINISH_REASON_" in done.stderr


def test_node_choice_constrains_the_output_to_one_of_the_choices(node_example, server):
    done = run_node(node_example, "--target", server.target, "--choice", "yes", "--choice", "no", "Is it?")

    assert done.returncode == 0, done.stderr
    assert done.stdout in ("yes", "no") and "FINISH_REASON_EOS" in done.stderr


def test_node_reports_invalid_argument(node_example, server):
    done = run_node(node_example, "--target", server.target, "--temperature=-1", PROMPT)

    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "sampling.temperature" in done.stderr


def test_node_summary_shows_the_prompt_tokens_the_prefix_cache_held(node_example, server):
    prompt = "A long shared system prompt for the Node example. " * 6
    run_node(node_example, "--target", server.target, "--max-new-tokens", "2", prompt)

    done = run_node(node_example, "--target", server.target, "--max-new-tokens", "2", prompt)

    assert done.returncode == 0, done.stderr
    assert " cached) + 2 completion tokens" in done.stderr

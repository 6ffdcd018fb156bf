"""The shared-prefix benchmark's workload: one system prompt, a different question per request."""

from __future__ import annotations

import math

from bench.serving.shared_prefix import shared_prefix_specs


def test_every_request_has_its_own_question_after_the_same_system_prompt():
    system, specs = shared_prefix_specs(8, system_len=50, question_len=6, output_len=4, rate=math.inf, seed=0)
    assert len(system.split()) == 50
    assert len({spec.prompt_text for spec in specs}) == 8
    assert all(spec.prompt_len == 56 and spec.output_len == 4 and spec.arrival_s == 0 for spec in specs)


def test_the_same_seed_gives_the_same_workload():
    assert shared_prefix_specs(4, 20, 5, 3, 2.0, seed=1) == shared_prefix_specs(4, 20, 5, 3, 2.0, seed=1)

"""A stress scenario's outcome: the checks it made, its figures, and the table `make stress` prints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from bench.report import markdown_table


@dataclass(slots=True)
class Check:
    """One property a scenario checked; `evidence` says what was seen when it did not hold."""

    name: str
    passed: bool
    evidence: str = ""


@dataclass(slots=True)
class ScenarioResult:
    """The row of one scenario: what it checked, whether each held, and its figures."""

    scenario: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    def check(self, name: str, passed: bool, evidence: object = "") -> None:
        self.checks.append(Check(name, bool(passed), "" if passed else str(evidence)[:500]))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self, *known: str) -> list[str]:
        """'name: evidence' of every check that did not hold, but those named in `known`."""
        return [f"{c.name}: {c.evidence}" for c in self.checks if not c.passed and c.name not in known]

    def row(self) -> list[str]:
        failed = [c.name for c in self.checks if not c.passed]
        result = "pass" if not failed else "FAIL: " + "; ".join(failed)
        figures = "; ".join(f"{k} {v}" for k, v in self.figures.items())
        return [self.scenario, "; ".join(c.name for c in self.checks), result, figures]


def table(results: Iterable[ScenarioResult]) -> str:
    return markdown_table(["scenario", "checked", "result", "figures"], [r.row() for r in results])


def by_count(values: Iterable[str]) -> str:
    """'OK 40, RESOURCE_EXHAUSTED 160': each distinct value with its count, most frequent first."""
    counts = Counter(values)
    return ", ".join(f"{value} {n}" for value, n in counts.most_common()) or "none"


def p99(values: Iterable[float]) -> str:
    """The 99th percentile in seconds, as a table cell ('-' when there are no values)."""
    data = list(values)
    return f"{np.percentile(data, 99):.3f} s" if data else "-"

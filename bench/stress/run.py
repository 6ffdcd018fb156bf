"""`python -m bench.stress.run` (`make stress`): reliability under load, one table row per scenario.

Each scenario starts its own server on loopback (the tiny random-weight llama unless `--model`), is
bounded in time, and checks what every call ended with and what the server holds afterwards:

    overload, cancellation storm, deadlines, memory pressure    in-process servers (bench/stress/load.py)
    engine faults                                               injected in-process (bench/stress/faults.py)
    bystanders under adversarial grammars                       in-process (bench/stress/grammar.py)
    SIGTERM during load, soak                                   `python -m service` (bench/stress/process.py)
    unauthenticated flood                                       `python -m service` (bench/stress/flood.py)
    fuzzing                                                     tests/test_stress.py's hypothesis properties,
                                                                run by pytest with --fuzz-examples examples

The soak runs only with `--soak-minutes`. Server logs and a JSON record go to bench/results/stress-*/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from bench.report import environment, load_note, to_json
from bench.stress.faults import engine_faults
from bench.stress.flood import unauthenticated_flood
from bench.stress.grammar import bystanders_under_adversarial_grammars
from bench.stress.load import cancellation_storm, deadlines, memory_pressure, overload
from bench.stress.process import sigterm_during_load, soak
from bench.stress.report import ScenarioResult, by_count, table

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = (
    "overload", "cancellation", "fuzzing", "deadlines", "sigterm", "faults", "grammar", "memory", "flood",
    "soak",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stress.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="local model directory (default: a tiny random llama)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="soak length; 0 skips the soak")
    parser.add_argument("--fuzz-examples", type=int, default=300, help="hypothesis examples per property")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=900.0,
        help="the most one scenario may take (the soak: its length more)",
    )
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench" / "results")
    return parser


async def fuzzing(examples: int, log_dir: Path) -> ScenarioResult:
    """tests/test_stress.py's fuzzing properties through pytest, with `examples` random examples each."""
    result = ScenarioResult(f"fuzzing: {examples} random examples per property, over gRPC")
    junit, tally = log_dir / "fuzzing-junit.xml", log_dir / "fuzzing-tally.json"
    env = {**os.environ, "TEXTGEN_FUZZ_EXAMPLES": str(examples), "TEXTGEN_FUZZ_TALLY": str(tally)}
    command = [sys.executable, "-m", "pytest", "tests/test_stress.py", "-k", "fuzz or malformed", "-q",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]  # fmt: skip
    with (log_dir / "fuzzing-pytest.log").open("w") as log:
        process = await asyncio.create_subprocess_exec(*command, cwd=REPO, env=env, stdout=log, stderr=log)
        await process.wait()
    outcomes = _junit_outcomes(junit)
    counts = json.loads(tally.read_text()) if tally.exists() else {}
    for group, name in (
        ("fuzzed", "every fuzzed request field: OK or INVALID_ARGUMENT naming a field, server healthy after"),
        ("malformed", "raw malformed bytes on every method: OK or INVALID_ARGUMENT, server healthy after"),
    ):
        mine = {test: outcome for test, outcome in outcomes.items() if group in test}
        result.check(name, mine and all(o == "passed" for o in mine.values()), mine)
    for properties in ("fields", "raw bytes"):
        codes = sum((Counter(c) for test, c in counts.items() if test.endswith(properties)), Counter())
        result.figures[properties] = by_count(codes.elements())
    return result


def _junit_outcomes(path: Path) -> dict[str, str]:
    """Test name -> passed, failed or xfailed, from pytest's JUnit XML."""
    if not path.exists():
        return {}
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[case.get("name")] = "failed"
        elif skipped is not None:
            outcomes[case.get("name")] = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            outcomes[case.get("name")] = "passed"
    return outcomes


def scenarios(model: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Callable[[], Awaitable]]:
    return {
        "overload": lambda: overload(model),
        "cancellation": lambda: cancellation_storm(model),
        "fuzzing": lambda: fuzzing(args.fuzz_examples, log_dir),
        "deadlines": lambda: deadlines(model),
        "sigterm": lambda: sigterm_during_load(model, log_dir),
        "faults": lambda: engine_faults(model),
        "grammar": lambda: bystanders_under_adversarial_grammars(model),
        "memory": lambda: memory_pressure(model),
        "flood": lambda: unauthenticated_flood(model, log_dir),
        "soak": lambda: soak(model, log_dir, args.soak_minutes),
    }


async def run_one(name: str, scenario: Callable[[], Awaitable], timeout_s: float) -> ScenarioResult:
    """Run one scenario within `timeout_s`; a timeout or an exception is a failed check of its own."""
    start = time.monotonic()
    try:
        result = await asyncio.wait_for(scenario(), timeout_s)
    except TimeoutError:
        result = ScenarioResult(name)
        result.check(f"finishes within {timeout_s:g} s", False, "timed out")
    except Exception as error:  # a scenario that crashes reports it as its row
        logging.exception("scenario %s failed", name)
        result = ScenarioResult(name)
        result.check("runs to the end", False, f"{type(error).__name__}: {error}")
    result.figures["took"] = f"{time.monotonic() - start:.0f} s"
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.soak_minutes <= 0 and "soak" in chosen:
        chosen.remove("soak")
    log_dir = args.output_dir / time.strftime("stress-%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log_dir / "stress.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tiny:
        if args.model is None:
            from bench.engine.tracing_overhead import save_tiny_model

            save_tiny_model(tiny)
        runs = scenarios(args.model or tiny, args, log_dir)
        for name in chosen:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            timeout_s = args.timeout_s + (args.soak_minutes * 60 if name == "soak" else 0)
            results.append(asyncio.run(run_one(name, runs[name], timeout_s)))
            print(" | ".join(results[-1].row()), file=sys.stderr, flush=True)
    env = environment(load_before)
    print(table(results))
    print(f"\n{load_note(env)}; logs in {log_dir}")
    record = {"command": ["python", "-m", "bench.stress.run", *(argv or sys.argv[1:])], "environment": env,
              "results": [asdict(r) for r in results]}  # fmt: skip
    (log_dir / "stress.json").write_text(to_json(record))
    if not all(r.passed for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

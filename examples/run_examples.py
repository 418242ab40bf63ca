"""Run every example's ``run.py`` (with ``--smoke-test``: each in seconds) and report which pass.

    python examples/run_examples.py --smoke-test
    python examples/run_examples.py --smoke-test --only mlflow_ui --only ray_cluster

Exit code 0 only if every example selected exits 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent


@dataclass
class Outcome:
    """One example's exit code, duration and the tail of its output."""

    name: str
    returncode: int
    seconds: float
    tail: str


def examples() -> dict[str, Path]:
    """``{name: run.py}`` for every example folder with a ``run.py``, by name."""
    return {path.parent.name: path for path in sorted(EXAMPLES.glob("*/run.py"))}


def run_example(name: str, script: Path, smoke_test: bool, timeout: float) -> Outcome:
    command = [sys.executable, str(script), *(["--smoke-test"] if smoke_test else [])]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES.parent)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"timed out after {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"
    return Outcome(name, code, time.monotonic() - started, "\n".join(str(output).splitlines()[-25:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="pass --smoke-test to every example")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this example (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per example")
    args = parser.parse_args(argv)
    found = examples()
    unknown = sorted(set(args.only) - set(found))
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; known: {', '.join(found)}")
    selected = {name: path for name, path in found.items() if not args.only or name in args.only}
    outcomes = []
    for name, script in selected.items():
        print(f"running {name} ...", flush=True)
        outcome = run_example(name, script, args.smoke_test, args.timeout)
        outcomes.append(outcome)
        if outcome.returncode != 0:
            print(outcome.tail, flush=True)
    print(f"\n{'example':<28} {'result':<8} seconds")
    for outcome in outcomes:
        result = "ok" if outcome.returncode == 0 else f"FAIL({outcome.returncode})"
        print(f"{outcome.name:<28} {result:<8} {outcome.seconds:7.1f}")
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Framework overhead per trial of the Optuna and Ray drivers (target: at most 5% of a 30-second trial).

    python benchmarks/search_overhead.py                 # 30 s trials (train.time_budget_s: 30), 3 per driver
    python benchmarks/search_overhead.py --quick         # 3 s trials, 2 per driver
    python benchmarks/search_overhead.py --json          # one JSON object on the last line

Each driver runs a real search (``psmsearch search``, one trial at a time, no pruning, inference
metrics off) into a fresh MLflow database. Per trial:

* compute: the wall time of :func:`psmsearch.trial.run_trial` (model build, training, every
  evaluation), measured inside the trial and logged as the metric ``bench_compute_seconds``;
* run: the trial's MLflow run, start to end (``execute_trial``: config validation, run creation,
  params, step metrics, closing);
* gap: from one trial's run end to the next trial's run start (sampling, scheduling, Ray's
  reporting and actor handling).

The steady-state overhead of a trial is ``(run - compute + gap) / (run + gap)``; the end-to-end
figure also counts the one-off start (interpreter, imports, a local Ray cluster) over the whole
search. To measure ``run_trial`` inside the trial process (an in-process Optuna trial or a Ray
worker), this file doubles as a psmsearch plugin: loaded with ``--plugin``, its ``register_tasks``
hook registers nothing and times ``run_trial`` in the process that calls it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from psmsearch import hookimpl

COMPUTE_METRIC = "bench_compute_seconds"
SPACE = """\
name: overhead-{driver}
task: {{name: group, group: Z5, train_length: 16, eval_max_multiple: 4, eval_samples: 128}}
model:
  kind: psm
  d_model: 32
  n_layers: 1
  chunk_size: {{choice: [4, 8]}}
  encoder: embed
  aggregator: {{name: mlp, mlp_ratio: 2}}
  head: {{name: attention, layers: 1, heads: 4}}
train: {{steps: null, time_budget_s: {budget}, batch_size: 32, eval_every: 200}}
metrics: {{enabled: false}}
objectives:
  - {{metric: acc_4x, direction: maximize}}
driver: {{sampler: random, pruner: none}}
"""


def _timed(run_trial: Callable[..., dict[str, float]]) -> Callable[..., dict[str, float]]:
    """``run_trial`` that also reports its own wall time as ``bench_compute_seconds``."""

    @functools.wraps(run_trial)
    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        metrics = run_trial(*args, **kwargs)
        return {**metrics, COMPUTE_METRIC: time.perf_counter() - started}

    timed.__wrapped_for_benchmark__ = True  # type: ignore[attr-defined]
    return timed


def _instrument() -> None:
    """Plugin side: time ``run_trial`` in this process (``execute_trial`` looks it up at each call)."""
    import psmsearch.trial

    if not getattr(psmsearch.trial.run_trial, "__wrapped_for_benchmark__", False):
        psmsearch.trial.run_trial = _timed(psmsearch.trial.run_trial)


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    """The plugin's hook, called wherever psmsearch loads its plugins (the search, each Ray worker):
    it registers nothing and instruments ``run_trial`` there. (A plugin without a hook is reported
    as a failure, and a failed ``--plugin`` stops the search.)"""
    _instrument()


@dataclass
class DriverResult:
    """One driver's measurements (seconds; shares in percent)."""

    driver: str
    trials: int
    budget_s: float
    compute_s: float
    run_s: float
    gap_s: float
    overhead_s: float
    overhead_pct: float
    search_wall_s: float
    end_to_end_pct: float


def run_search(driver: str, budget: float, trials: int, root: Path) -> tuple[float, str]:
    """One real search; returns its wall time and the MLflow tracking URI it wrote to."""
    folder = root / driver
    folder.mkdir()
    (folder / "space.yaml").write_text(SPACE.format(driver=driver, budget=budget))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "PSMSEARCH_PLUGINS"}
    if driver == "ray":
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="psr")  # short path: Ray's socket names have a length limit
    command = [sys.executable, "-m", "psmsearch", "--plugin", str(Path(__file__).resolve()), "search", "space.yaml",
               "--driver", driver, "--trials", str(trials), "--jobs", "1", "--tracking-uri", uri, "--no-progress", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the {driver} search failed:\n{done.stderr[-4000:]}")
    return wall, uri


def measure(driver: str, budget: float, trials: int, root: Path) -> DriverResult:
    from mlflow.tracking import MlflowClient

    wall, uri = run_search(driver, budget, trials, root)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"overhead-{driver}")
    runs = client.search_runs([experiment.experiment_id], "tags.`psmsearch.kind` = 'trial'", order_by=["attributes.start_time ASC"])
    if len(runs) != trials or any(COMPUTE_METRIC not in r.data.metrics for r in runs):
        raise SystemExit(f"{driver}: expected {trials} timed trial runs, found {len(runs)}")
    compute = [r.data.metrics[COMPUTE_METRIC] for r in runs]
    spans = [(r.info.end_time - r.info.start_time) / 1000 for r in runs]
    gaps = [(b.info.start_time - a.info.end_time) / 1000 for a, b in zip(runs, runs[1:])] or [0.0]
    run_s, gap_s, compute_s = statistics.mean(spans), statistics.mean(gaps), statistics.mean(compute)
    overhead = run_s - compute_s + gap_s
    return DriverResult(
        driver, trials, budget, round(compute_s, 3), round(run_s, 3), round(gap_s, 3), round(overhead, 3),
        round(100 * overhead / (run_s + gap_s), 2), round(wall, 2), round(100 * (wall - sum(compute)) / wall, 2),
    )


def table(results: list[DriverResult]) -> str:
    header = (f"{'driver':<7} {'trials':>6} {'budget s':>8} {'compute s':>9} {'run s':>7} {'gap s':>6} "
              f"{'overhead s':>10} {'overhead %':>10} {'search s':>8} {'end-to-end %':>12}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.driver:<7} {r.trials:>6} {r.budget_s:>8.0f} {r.compute_s:>9.2f} {r.run_s:>7.2f} {r.gap_s:>6.2f} "
                     f"{r.overhead_s:>10.2f} {r.overhead_pct:>10.2f} {r.search_wall_s:>8.1f} {r.end_to_end_pct:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3-second trials, 2 per driver")
    parser.add_argument("--trials", type=int, default=None, help="trials per driver (default 3, --quick 2)")
    parser.add_argument("--budget", type=float, default=None, help="train.time_budget_s (default 30, --quick 3)")
    parser.add_argument("--drivers", nargs="+", default=["optuna", "ray"], choices=["optuna", "ray"])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = parser.parse_args(argv)
    budget = args.budget or (3.0 if args.quick else 30.0)
    trials = args.trials or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="psmsearch-overhead-") as scratch:
        results = [measure(driver, budget, trials, Path(scratch)) for driver in args.drivers]
    print(table(results))
    target = all(r.overhead_pct <= 5.0 for r in results)
    print(f"steady-state overhead per trial {'within' if target else 'ABOVE'} the 5% target")
    if args.json:
        print(json.dumps({"target_pct": 5.0, "within_target": target, "results": [asdict(r) for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

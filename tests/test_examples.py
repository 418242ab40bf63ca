"""Every example's smoke test runs for real (each well under 90 s on a 2-core CPU).

Each example is a subprocess started the way a user starts it: ``python examples/NAME/run.py
--smoke-test``; the examples clean up after themselves (temporary folders, the Ray head and the
MLflow UI they start).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_custom_aggregator_search_trains_the_plugin_aggregator() -> None:
    result = run(str(EXAMPLES / "custom_aggregator_search" / "run.py"), "--smoke-test")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gated aggregator found through its entry point" in result.stdout
    assert result.stdout.count("complete") == 2 and "gate_bias" in result.stdout
    assert not (EXAMPLES / "plugin_package" / "build").exists()


@pytest.mark.slow  # about 45 s; tests/test_ray_driver.py searches on a started head in the default run
def test_ray_cluster_runs_a_search_on_a_started_head_and_stops_it() -> None:
    result = run(str(EXAMPLES / "ray_cluster" / "run.py"), "--smoke-test")
    assert result.returncode == 0, result.stderr[-3000:]
    # two trials through `--address`, two more through `ray job submit` (ray[default] is a dependency)
    assert result.stdout.count("  complete  ") == 2, result.stdout[-3000:]
    assert result.stdout.count('"status": "complete"') == 2, result.stdout[-3000:]
    assert "Running entrypoint for job raysubmit_" in result.stdout
    assert "ray head stopped" in result.stdout


def test_mlflow_ui_serves_the_search_and_stops() -> None:
    result = run(str(EXAMPLES / "mlflow_ui" / "run.py"), "--smoke-test")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 search run, 2 nested trial runs" in result.stdout
    assert "MLflow UI stopped" in result.stdout


@pytest.mark.slow  # about 9 s; test_custom_aggregator_search_trains_the_plugin_aggregator runs the same example
def test_run_examples_reports_each_example() -> None:
    result = run(str(EXAMPLES / "run_examples.py"), "--smoke-test", "--only", "custom_aggregator_search")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "custom_aggregator_search" in result.stdout and " ok " in result.stdout


@pytest.mark.parametrize("name", ["custom_aggregator_search", "ray_cluster", "mlflow_ui"])
def test_every_example_has_a_readme_and_a_smoke_test(name: str) -> None:
    assert (EXAMPLES / name / "README.md").is_file()
    assert "--smoke-test" in (EXAMPLES / name / "run.py").read_text()

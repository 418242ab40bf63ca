"""Search a third-party aggregator against the built-in ones.

The ``gated`` aggregator lives in its own package (``examples/plugin_package``) and reaches psmsearch
only through the package's ``psmsearch`` entry point. If it is not installed already
(``pip install ./examples/plugin_package``), this script installs it into a temporary ``--target``
folder and puts that folder on ``PYTHONPATH`` for the search, leaving your environment untouched.

    python examples/custom_aggregator_search/run.py               # the search in space.yaml (minutes)
    python examples/custom_aggregator_search/run.py --smoke-test  # a tiny 2-trial search of gated

Results go to ``--out`` (default ``./custom_aggregator_results``): ``mlflow.db`` (compare the trials
with ``psmsearch compare --tracking-uri sqlite:///<out>/mlflow.db`` or the MLflow UI, see
``examples/mlflow_ui``) and ``psmsearch.db`` (the Optuna study, resumable with ``--resume``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "plugin_package"
SPACE = HERE / "space.yaml"


def install_plugin(root: Path) -> Path | None:
    """Install the plugin package under ``root`` unless it is importable already; returns the folder."""
    if importlib.util.find_spec("psmsearch_gated") is not None:
        return None
    source = root / "plugin_package"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True,
    )
    return target


def smoke_space(out: Path) -> Path:
    """space.yaml shrunk to seconds per trial, searching only the plugin's aggregator."""
    data: dict[str, Any] = yaml.safe_load(SPACE.read_text())
    data["name"] = "gated-smoke"
    data["task"].update(train_length=16, eval_max_multiple=4, eval_samples=32)
    data["model"].update(d_model=16, aggregator={"name": "gated", "gate_bias": {"float": [-2.0, 2.0]}})
    data["model"]["head"]["heads"] = 2
    data["train"] = {"steps": 20, "batch_size": 8, "eval_every": 10, "eval_batch_size": 32, "warmup_steps": 2}
    data["metrics"] = {"enabled": False}
    path = out / "space_smoke.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def psmsearch(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the psmsearch command line with this interpreter."""
    return subprocess.run([sys.executable, "-m", "psmsearch", *args], env=env, cwd=cwd, text=True, capture_output=True)


def check_registered(env: dict[str, str], cwd: Path) -> None:
    """Fail early, and clearly, if the entry point was not found."""
    listed = psmsearch("plugins", "--json", env=env, cwd=cwd)
    names = {(c["kind"], c["name"]) for c in json.loads(listed.stdout or '{"components": []}')["components"]}
    if ("aggregator", "gated") not in names:
        sys.exit(f"the gated aggregator is not registered:\n{listed.stderr}")
    print("gated aggregator found through its entry point")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="a tiny 2-trial search in a temporary folder")
    parser.add_argument("--out", type=Path, default=Path("custom_aggregator_results"), help="where results go")
    parser.add_argument("--trials", type=int, default=None, help="override the space's driver.trials")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="psmsearch-gated-") as scratch:
        out = Path(scratch) / "results" if args.smoke_test else args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        target = install_plugin(Path(scratch))
        env = dict(os.environ)
        if target is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
        check_registered(env, out)
        space = smoke_space(out) if args.smoke_test else SPACE
        trials = ["--trials", str(args.trials or 2)] if args.smoke_test or args.trials else []
        result = psmsearch("search", str(space), *trials, "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
                           "--no-progress", "--json", env=env, cwd=out)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        for trial in summary["trials"]:
            print(f"{trial['name']:>9}  {trial['status']:<9} {trial['objectives']}  {trial['params']}")
        if args.smoke_test and any(t["status"] != "complete" for t in summary["trials"]):
            print("smoke test: not every trial completed", file=sys.stderr)
            return 1
        if not args.smoke_test:
            print(f"compare: psmsearch compare --tracking-uri sqlite:///{out / 'mlflow.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

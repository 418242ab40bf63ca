"""Compare a search's trials in the MLflow UI.

    python examples/mlflow_ui/run.py                     # serve ./mlflow.db on http://127.0.0.1:5000
    python examples/mlflow_ui/run.py --db path/mlflow.db --port 5001
    python examples/mlflow_ui/run.py --smoke-test        # tiny search, start the UI, query it, stop it

The UI is ``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1`` (loopback only).
``--smoke-test`` runs a 2-trial search into a temporary ``mlflow.db``, starts the UI on a free
loopback port, checks ``/health`` and that the search's parent and nested trial runs are served by
the REST API, and stops the UI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MLFLOW = Path(sys.executable).with_name("mlflow")
SMOKE_SPACE = """\
name: mlflow-ui-smoke
task: {name: group, group: Z5, train_length: 8, eval_max_multiple: 2, eval_samples: 32}
model:
  kind: psm
  d_model: 16
  n_layers: 1
  chunk_size: {choice: [2, 4]}
  encoder: embed
  aggregator: {choice: [{name: mlp, mlp_ratio: 1}, {name: attention, layers: 1, heads: 2}]}
  head: {name: attention, layers: 1, heads: 2}
train: {steps: 20, batch_size: 8, eval_every: 10, eval_batch_size: 32, warmup_steps: 2}
metrics: {enabled: false}
objectives:
  - {metric: acc_1x, direction: maximize}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ui_command(db: Path, port: int) -> list[str]:
    return [str(MLFLOW), "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}", "--host", "127.0.0.1", "--port", str(port)]


def start_ui(db: Path, port: int, log: Path) -> subprocess.Popen:
    """``mlflow ui`` in its own process group (it forks a server and workers)."""
    with log.open("w") as out:
        return subprocess.Popen(ui_command(db, port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_ui(ui: subprocess.Popen) -> None:
    """Stop the UI we started: its whole process group, by the group id we created."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(ui.pid, sig)
        except ProcessLookupError:
            break
        try:
            ui.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def get(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) and decode the JSON answer (``/health`` answers plain text)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def wait_healthy(base: str, ui: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if str(get(f"{base}/health")).strip().upper() == "OK":
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if ui.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow UI did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def tiny_search(root: Path) -> Path:
    """Two tracked trials to look at; returns the MLflow database."""
    (root / "space.yaml").write_text(SMOKE_SPACE)
    db = root / "mlflow.db"
    subprocess.run(
        [sys.executable, "-m", "psmsearch", "search", "space.yaml", "--trials", "2", "--tracking-uri", f"sqlite:///{db}",
         "--no-progress", "--json"],
        cwd=root, check=True, stdout=subprocess.DEVNULL,
    )
    return db


def check_runs(base: str, experiment: str) -> None:
    """The search's parent run and its two nested trial runs, as the UI's REST API serves them."""
    found = get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
    experiment_id = found["experiment"]["experiment_id"]
    runs = get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parents = [t for t in tags if t.get("psmsearch.kind") == "search"]
    trials = [t for t in tags if t.get("psmsearch.kind") == "trial"]
    if len(parents) != 1 or len(trials) != 2:
        raise RuntimeError(f"expected 1 search run and 2 trial runs, got {len(parents)} and {len(trials)}")
    print(f"MLflow UI serves experiment {experiment!r}: 1 search run, {len(trials)} nested trial runs")


def smoke_test() -> int:
    with tempfile.TemporaryDirectory(prefix="psmsearch-mlflow-ui-") as scratch:
        root = Path(scratch)
        db = tiny_search(root)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = root / "ui.log"
        ui = start_ui(db, port, log)
        try:
            wait_healthy(base, ui, log)
            print(f"MLflow UI healthy at {base}")
            check_runs(base, "mlflow-ui-smoke")
        finally:
            stop_ui(ui)
        print("MLflow UI stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="tiny search, start the UI, query it once, stop it")
    parser.add_argument("--db", type=Path, default=Path("mlflow.db"), help="the MLflow SQLite database to serve")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.smoke_test:
        return smoke_test()
    if not args.db.is_file():
        sys.exit(f"no MLflow database at {args.db}: run a search first (psmsearch search search_spaces/quick.yaml)")
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    return subprocess.call(ui_command(args.db, args.port))


if __name__ == "__main__":
    sys.exit(main())

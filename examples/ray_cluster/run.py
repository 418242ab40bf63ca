"""A search on a Ray cluster: start a head node, run ``psmsearch search --driver ray --address``, stop it.

What it does (see README.md for the same steps by hand):

1. ``ray start --head --node-ip-address=127.0.0.1`` in single-machine mode (every Ray server on the
   loopback interface) with a fresh authentication token;
2. ``psmsearch search SPACE --driver ray --address 127.0.0.1:PORT``: trials run as Ray Tune trials
   on the cluster, tracked in MLflow (``<out>/mlflow.db``) as nested runs of one parent run;
3. ``ray job submit`` of the same command, when Ray's job server is available (it needs
   ``pip install "ray[default]"``; otherwise this step is skipped with a message);
4. stops the head it started, and only that one (``ray stop`` would stop every Ray cluster on
   the machine).

    python examples/ray_cluster/run.py               # search_spaces/quick.yaml, 4 trials, 2 at a time
    python examples/ray_cluster/run.py --smoke-test  # a tiny 2-trial search, then stop
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[2]
QUICK_SPACE = REPO / "search_spaces" / "quick.yaml"
RAY = Path(sys.executable).with_name("ray")
SMOKE_SPACE = """\
name: ray-cluster-smoke
task: {name: group, group: Z5, train_length: 8, eval_max_multiple: 2, eval_samples: 32}
model:
  kind: psm
  d_model: 16
  n_layers: 1
  chunk_size: {choice: [2, 4]}
  encoder: embed
  aggregator: {name: mlp, mlp_ratio: 1}
  head: {name: attention, layers: 1, heads: 2}
train: {steps: 20, batch_size: 8, eval_every: 10, eval_batch_size: 32, warmup_steps: 2}
metrics: {enabled: false}
objectives:
  - {metric: acc_1x, direction: maximize}
"""


@dataclass
class Head:
    """A running head node: the GCS address, the job server URL (or None) and the client environment."""

    address: str
    dashboard: str | None
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_server_available() -> bool:
    """Ray's job server lives in its dashboard, which needs the ``ray[default]`` extras."""
    probe = subprocess.run([sys.executable, "-c", "import ray.dashboard.optional_deps"], capture_output=True)
    return probe.returncode == 0


@contextmanager
def ray_head(num_cpus: int, with_jobs: bool) -> Iterator[Head]:
    """Start ``ray start --head --block`` in its own process group; stop exactly that head on exit."""
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: node address 127.0.0.1, servers on loopback
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port, dashboard_port = free_port(), free_port()
    dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"] if with_jobs else ["--include-dashboard=false"]
    temp_dir = Path(tempfile.mkdtemp(prefix="psr"))  # short: Ray's Unix socket paths have a length limit
    log_path = temp_dir / "head.log"
    command = [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats", *dashboard]
    print("$", " ".join(command[:9]), "...", flush=True)
    with log_path.open("w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "Ray runtime started" in log_path.read_text(), head, log_path)
        yield Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}" if with_jobs else None, env)
    finally:
        stop(head)


def wait_for(ready: Callable[[], bool], head: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(head: subprocess.Popen) -> None:
    """SIGTERM lets the head drain and stop its processes; then SIGKILL whatever is left of its group."""
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)
    print("ray head stopped", flush=True)


def search_command(space: Path, address: str, out: Path, trials: int, jobs: int, study: str) -> list[str]:
    return [sys.executable, "-m", "psmsearch", "search", str(space), "--driver", "ray", "--address", address,
            "--trials", str(trials), "--jobs", str(jobs), "--study", study,
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--storage", str(out / "ray_results"), "--json"]


def run_search(command: list[str], head: Head, out: Path) -> dict:
    print("$ psmsearch", " ".join(command[3:]), flush=True)
    result = subprocess.run(command, env=head.env, cwd=out, text=True, stdout=subprocess.PIPE)
    if result.returncode != 0:
        raise SystemExit(f"the search failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def submit_job(command: list[str], head: Head, out: Path) -> None:
    """``ray job submit`` of the same search: the driver then runs on the cluster itself."""
    job = [str(RAY), "job", "submit", "--address", str(head.dashboard), "--", *command]
    print("$ ray job submit --address", head.dashboard, "-- psmsearch ...", flush=True)
    subprocess.run(job, env=head.env, cwd=out, check=True)


def summarise(summary: dict) -> None:
    for trial in summary["trials"]:
        print(f"{trial['name']:>9}  {trial['status']:<9} {trial['objectives']}  {trial['params']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="a tiny 2-trial search in a temporary folder")
    parser.add_argument("--out", type=Path, default=Path("ray_cluster_results"), help="where results go")
    parser.add_argument("--space", type=Path, default=QUICK_SPACE, help="search space (ignored by --smoke-test)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs the head node offers")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="psmsearch-ray-") as scratch:
        out = Path(scratch) if args.smoke_test else args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        space = out / "space.yaml" if args.smoke_test else args.space.resolve()
        if args.smoke_test:
            space.write_text(SMOKE_SPACE)
        trials, jobs = (2, 1) if args.smoke_test else (4, 2)
        with_jobs = job_server_available()
        with ray_head(min(args.cpus, 2) if args.smoke_test else args.cpus, with_jobs) as head:
            summarise(run_search(search_command(space, head.address, out, trials, jobs, "from-the-cli"), head, out))
            if with_jobs:
                submit_job(search_command(space, head.address, out, trials, jobs, "as-a-ray-job"), head, out)
            else:
                print("skipped `ray job submit`: Ray's job server needs `pip install \"ray[default]\"`", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

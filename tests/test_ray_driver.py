"""The Ray driver on a real single-machine Ray cluster: MLflow runs, nested trials and shipped plugins.

The cluster is started with ``ray start --head --block`` in its own process group and stopped by
terminating that process (never ``ray stop``, which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from clihelpers import run_cli
from psmsearch.ray_experiment import DEFAULT_RESULTS_DIR as DEFAULT_RESULTS

PLUGIN = '''
"""A test plugin: the MLP aggregator under a new name."""

from psmsearch import hookimpl
from psmsearch.plugins.token_state import MLPAggregator


class ShippedMLP(MLPAggregator):
    """Registered only by this file, so a worker that runs it has loaded the plugin."""

    name = "shipped_mlp"


@hookimpl
def register_aggregators(register):
    register(ShippedMLP)
'''

SPACE = """
name: ray-tiny
task: {name: group, group: Z5, train_length: 8, eval_max_multiple: 2, eval_samples: 32}
model:
  kind: psm
  d_model: 16
  n_layers: 1
  chunk_size: {choice: [2, 4]}
  encoder: embed
  aggregator: {name: shipped_mlp, mlp_ratio: 1}
  head: {name: attention, layers: 1, heads: 2}
train: {steps: 20, batch_size: 8, eval_every: 10, eval_batch_size: 32, warmup_steps: 2}
metrics: {enabled: false}
objectives:
  - {metric: acc_1x, direction: maximize}
"""


@dataclass
class Cluster:
    """A running single-machine Ray head: its address and the environment to reach it."""

    address: str
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_env() -> dict[str, str]:
    """Loopback-only Ray with a private authentication token (nothing read from or written to ~/.ray)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def start_head(temp_dir: Path, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` bound to 127.0.0.1; returns once the runtime has started."""
    port = free_port()
    log_path = temp_dir / "head.log"
    ray = Path(sys.executable).with_name("ray")
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=false", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **env}, start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in log_path.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            pytest.fail(f"ray start failed:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return head, f"127.0.0.1:{port}"


def stop_head(head: subprocess.Popen) -> None:
    """Terminate the head (it drains and stops its own processes), then kill whatever is left of its group."""
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # Ray's Unix socket paths must stay short, so its temp dir is a short /tmp path, not tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="psr"))
    env = cluster_env()
    head, address = start_head(temp_dir, tmp_path, env)
    try:
        yield Cluster(address, env)
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_search_on_a_cluster_tracks_nested_runs_and_ships_plugins(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "shipped_plugin.py").write_text(PLUGIN)
    (tmp_path / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(
        "--plugin", str(tmp_path / "shipped_plugin.py"), "search", "space.yaml", "--driver", "ray",
        "--address", cluster.address, "--trials", "2", "--tracking-uri", uri,
        "--storage", str(tmp_path / "ray_results"), "--no-progress", "--json",
        env=cluster.env, cwd=tmp_path, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [t["status"] for t in summary["trials"]] == ["complete", "complete"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ray-tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("psmsearch.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("psmsearch.kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 2
    parent = parents[0]
    assert parent.info.run_id == summary["parent_run"]
    assert parent.info.status == "FINISHED" and parent.data.tags["psmsearch.driver"] == "ray"
    assert sorted(r.data.tags["psmsearch.trial"] for r in trials) == ["0", "1"]
    plugin = str((tmp_path / "shipped_plugin.py").resolve())
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["psmsearch.driver"] == "ray"
        assert run.info.status == "FINISHED", run.data.tags.get("psmsearch.error")
        assert run.data.params["model.aggregator"] == "shipped_mlp"
        assert run.data.params["search.model.chunk_size"] in {"2", "4"}
        assert {"acc_1x", "acc_2x", "train_seconds", "params"} <= set(run.data.metrics)
        # the file as the user gave it, as under the Optuna driver; the worker knows it as module 'shipped_plugin'
        assert run.data.tags["psmsearch.plugin.aggregator"] == plugin
        config = Path(client.download_artifacts(run.info.run_id, "trial_config.yaml", str(tmp_path / run.info.run_id)))
        assert f"# Run it again with: psmsearch --plugin {plugin} train trial_config.yaml" in config.read_text()
        digest = hashlib.sha256(Path(plugin).read_bytes()).hexdigest()  # the file as the worker ran it
        assert yaml.safe_load(config.read_text())["plugins"] == {
            "model.aggregator": {"name": "shipped_mlp", "plugin": plugin, "sha256": digest}}


FAILS_ONCE_PLUGIN = '''
"""A test plugin whose aggregator fails the first trial that trains with it (marker file: {marker})."""

from pathlib import Path

from psmsearch import hookimpl
from psmsearch.plugins.token_state import MLPAggregator

MARKER = Path({marker!r})


class FailsOnce(MLPAggregator):
    name = "fails_once"

    def forward(self, older, newer):
        if older.device.type != "meta" and not MARKER.exists():
            MARKER.touch()
            raise RuntimeError("the first trial fails on purpose")
        return super().forward(older, newer)


@hookimpl
def register_aggregators(register):
    register(FailsOnce)
'''


def test_ray_search_on_a_private_cluster_records_a_failed_trial_and_goes_on(tmp_path: Path) -> None:
    (tmp_path / "fails_once.py").write_text(FAILS_ONCE_PLUGIN.format(marker=str(tmp_path / "failed-once")))
    (tmp_path / "space.yaml").write_text(SPACE.replace("shipped_mlp", "fails_once"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("--plugin", str(tmp_path / "fails_once.py"), "search", "space.yaml", "--driver", "ray", "--trials", "2",
            "--tracking-uri", uri, "--no-progress", "--json")
    env = {**cluster_env(), "RAY_TMPDIR": tempfile.mkdtemp(prefix="psr")}
    try:
        result = run_cli(*args, env=env, cwd=tmp_path, timeout=240)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert result.returncode == 0, result.stderr[-4000:]
    statuses = {t["name"]: t["status"] for t in json.loads(result.stdout.strip().splitlines()[-1])["trials"]}
    assert statuses == {"ray-tiny-trial-0": "failed", "ray-tiny-trial-1": "complete"}
    assert (tmp_path / DEFAULT_RESULTS / "ray-tiny").is_dir()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ray-tiny")
    trials = {r.data.tags["psmsearch.trial"]: r for r in client.search_runs([experiment.experiment_id], "tags.`psmsearch.kind` = 'trial'")}
    assert trials["0"].info.status == "FAILED"
    assert "the first trial fails on purpose" in trials["0"].data.tags["psmsearch.error"]
    assert trials["1"].info.status == "FINISHED"

    again = run_cli(*args, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 2
    [line] = [line for line in again.stderr.splitlines() if "already exists" in line]
    assert line.startswith("error: a Ray search 'ray-tiny' already exists in "), "--resume was not passed: no '--resume:' prefix"
    assert "pass --resume to continue it" in line


def test_a_ray_search_in_which_no_trial_completed_exits_1_naming_the_plugin_as_given(
        tmp_path: Path, private_env: dict[str, str]) -> None:
    """A plugin aggregator that raises fails every trial: the Ray search exits 1
    (it exited 0) after its JSON, with one line saying so; the trial's run tags the plugin file as the
    user gave it (Ray workers load it as the bare module 'plugin_aggregators', which the tag held)."""
    plugin = Path(__file__).parent / "fixtures" / "plugin_aggregators.py"
    (tmp_path / "space.yaml").write_text(SPACE.replace("shipped_mlp", "always_fails") + "driver: {pruner: none}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("--plugin", str(plugin), "search", "space.yaml", "--driver", "ray", "--trials", "1",
                     "--tracking-uri", uri, "--no-progress", "--json", env=private_env, cwd=tmp_path, timeout=240)
    assert result.returncode == 1, result.stderr[-4000:]
    [trial] = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
    assert trial["status"] == "failed" and "RuntimeError: my plugin's bug" in trial["error"]
    assert trial["run_id"], "a trial that failed before its first report named no run"
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: no trial of search 'ray-tiny' completed (1 failed, of 1): this command's failures are above")

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(trial["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["psmsearch.plugin.aggregator"] == str(plugin.resolve())
    assert run.data.tags["psmsearch.plugin.head"] == "psmsearch.plugins.token_state"


@pytest.fixture
def private_env() -> Iterator[dict[str, str]]:
    """The environment of a search that starts its own loopback cluster, its session files under a
    short /tmp path (Ray's Unix socket paths must stay short)."""
    env = {**cluster_env(), "RAY_TMPDIR": tempfile.mkdtemp(prefix="psr")}
    try:
        yield env
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


DIES_ONCE_PLUGIN = '''
"""A test plugin whose aggregator kills its worker process in the first trial that trains with it."""

import os
from pathlib import Path

from psmsearch import hookimpl
from psmsearch.plugins.token_state import MLPAggregator

MARKER = Path({marker!r})


class DiesOnce(MLPAggregator):
    name = "dies_once"

    def forward(self, older, newer):
        if older.device.type != "meta" and not MARKER.exists():
            MARKER.touch()
            os._exit(3)
        return super().forward(older, newer)


@hookimpl
def register_aggregators(register):
    register(DiesOnce)
'''


@pytest.mark.slow
def test_a_trial_whose_worker_dies_is_recorded_with_rays_error(tmp_path: Path, private_env: dict[str, str]) -> None:
    """No MLflow error is recorded by a worker that died; Ray's error (written before the callbacks
    run) is the trial's error in the console, its MLflow run and the summary, not "unknown error"."""
    (tmp_path / "dies_once.py").write_text(DIES_ONCE_PLUGIN.format(marker=str(tmp_path / "died-once")))
    (tmp_path / "space.yaml").write_text(SPACE.replace("shipped_mlp", "dies_once"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("--plugin", str(tmp_path / "dies_once.py"), "search", "space.yaml", "--driver", "ray", "--trials", "2",
                     "--tracking-uri", uri, "--no-progress", "--json", env=private_env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {t["name"]: t for t in json.loads(result.stdout.strip().splitlines()[-1])["trials"]}
    assert {name: row["status"] for name, row in rows.items()} == {"ray-tiny-trial-0": "failed", "ray-tiny-trial-1": "complete"}
    died = "worker process has died"
    assert died in rows["ray-tiny-trial-0"]["error"], rows["ray-tiny-trial-0"]
    failed_line = next(line for line in result.stderr.splitlines() if line.startswith("trial 0 failed:"))
    assert "unknown error" not in failed_line

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(rows["ray-tiny-trial-0"]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["psmsearch.status"] == "failed"
    assert died in run.data.tags["psmsearch.error"], run.data.tags["psmsearch.error"]


@pytest.mark.slow
def test_a_resumed_search_runs_more_trials_at_more_jobs_and_keeps_failed_trials(tmp_path: Path, private_env: dict[str, str]) -> None:
    """``--resume --trials 4 --jobs 2`` after a finished 2-trial search runs two new trials at once;
    the failed trial counts and is not run again (it would complete now: it fails only once); the
    summary lists every trial of the search. A resume asking for fewer trials runs none and drops none."""
    (tmp_path / "fails_once.py").write_text(FAILS_ONCE_PLUGIN.format(marker=str(tmp_path / "failed-once")))
    # ~2 s of training a trial, so that two trials started at once are running at once.
    space = SPACE.replace("shipped_mlp", "fails_once").replace("steps: 20", "steps: 200")
    (tmp_path / "space.yaml").write_text(space + "driver: {pruner: none}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("--plugin", str(tmp_path / "fails_once.py"), "search", "space.yaml", "--driver", "ray", "--tracking-uri", uri, "--json")

    def search(*more: str) -> tuple[dict[str, dict], str]:
        result = run_cli(*args, *more, env=private_env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        rows = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
        return {row["name"]: row for row in rows}, result.stderr

    def trial_runs() -> dict[str, list]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("ray-tiny")
        runs: dict[str, list] = {}
        for run in client.search_runs([experiment.experiment_id], "tags.`psmsearch.kind` = 'trial'"):
            runs.setdefault(run.data.tags["psmsearch.trial"], []).append(run)
        return runs

    first, _ = search("--trials", "2", "--no-progress")
    assert {name: row["status"] for name, row in first.items()} == {"ray-tiny-trial-0": "failed", "ray-tiny-trial-1": "complete"}

    resumed, stderr = search("--trials", "4", "--jobs", "2", "--resume")
    statuses = {name: row["status"] for name, row in resumed.items()}
    assert statuses == {"ray-tiny-trial-0": "failed", "ray-tiny-trial-1": "complete", "ray-tiny-trial-2": "complete", "ray-tiny-trial-3": "complete"}
    assert "the first trial fails on purpose" in resumed["ray-tiny-trial-0"]["error"]
    assert resumed["ray-tiny-trial-1"]["run_id"] == first["ray-tiny-trial-1"]["run_id"]
    assert resumed["ray-tiny-trial-1"]["objectives"] == first["ray-tiny-trial-1"]["objectives"]
    events = [line for line in stderr.splitlines() if line.startswith("[ray-tiny] trial ")]
    first_end = next(i for i, line in enumerate(events) if " started" not in line)
    assert {"[ray-tiny] trial 2 started", "[ray-tiny] trial 3 started"} <= set(events[:first_end]), stderr[-4000:]  # --jobs 2
    runs = trial_runs()
    assert {n: [r.info.status for r in rs] for n, rs in runs.items()} == {
        "0": ["FAILED"], "1": ["FINISHED"], "2": ["FINISHED"], "3": ["FINISHED"]}

    again, stderr = search("--trials", "3", "--resume")
    assert {name: row["status"] for name, row in again.items()} == statuses
    assert "already holds 4 ended trials (asked for 3)" in stderr
    assert {n: len(rs) for n, rs in trial_runs().items()} == {"0": 1, "1": 1, "2": 1, "3": 1}

    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(tmp_path / DEFAULT_RESULTS / "ray-tiny"))
    assert sorted((t.config["psmsearch_trial_number"], t.status) for t in analysis.trials) == [
        (0, "ERROR"), (1, "TERMINATED"), (2, "TERMINATED"), (3, "TERMINATED")]


def test_a_ray_search_already_being_started_is_refused_and_a_tracking_error_gives_the_name_back(tmp_path: Path) -> None:
    """Two Ray searches started at the same moment without --resume both found nothing Tune could
    restore and ran two Tuners in one folder. The first now claims the folder before anything else;
    the claim it leaves (before Tune saves state) is the race's state, set up here by hand."""
    from mlflow.tracking import MlflowClient
    from searchhelpers import write_space

    from psmsearch.ray_experiment import CLAIM_FILE

    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    experiment = tmp_path / DEFAULT_RESULTS / "tiny"
    experiment.mkdir(parents=True)
    (experiment / CLAIM_FILE).touch()
    result = run_cli("search", str(space), "--driver", "ray", "--no-progress", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: a Ray search 'tiny' was already started in " in result.stderr
    assert "pass --resume to restart it" in result.stderr

    (experiment / CLAIM_FILE).unlink()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("gone"))
    result = run_cli("search", str(space), "--driver", "ray", "--experiment", "gone", "--no-progress",
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "is deleted; restore it" in result.stderr, result.stderr[-3000:]
    assert not (experiment / CLAIM_FILE).exists(), "a search that never started keeps no claim on its name"


def test_a_ray_search_another_process_is_driving_is_refused_with_or_without_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `--resume` commands on a new name both found nothing to restore, skipped the claim and ran
    two Tuners in one folder (two trial-0 runs under one parent). A driving process now holds a lock
    in the experiment's folder; a second search, `--resume` or not, is refused while it runs, before
    Ray or MLflow is touched. (Both commands started together: the slow test below.)"""
    import fcntl

    from searchhelpers import write_space

    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import QUIET_ENV
    from psmsearch.ray_driver import run_ray_search
    from psmsearch.ray_experiment import LOCK_FILE
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    for key, value in QUIET_ENV.items():  # the driver sets them for Ray; restored after the test
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    space = load_space(write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"}), smoke_samples=1)
    experiment = tmp_path / DEFAULT_RESULTS / "tiny"
    experiment.mkdir(parents=True)
    with open(experiment / LOCK_FILE, "w") as held:  # the driving process's lock, as it holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242@gpu-node-7")  # PID@HOST: on shared storage the holder may be another machine
        held.flush()
        for resume in (True, False):
            options = SearchOptions(trials=1, resume=resume, progress=False, storage=str(tmp_path / DEFAULT_RESULTS),
                                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
            with pytest.raises(ConfigError, match=r"the Ray search 'tiny' in .* is being run by process 4242 on gpu-node-7 now"):
                run_ray_search(space, options)
    assert sorted(p.name for p in experiment.iterdir()) == [LOCK_FILE], "a refused search creates nothing"
    assert not (tmp_path / "mlflow.db").exists()


def test_a_ray_search_the_grid_sampler_refuses_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray driver built its sampler (and the grid) with the Tuner, after claiming the experiment's
    folder and opening the search's MLflow run: a refused grid left the claim, and the fixed space then
    needed --resume. A space ``load_space`` never checked (built in code) is now refused first."""
    from searchhelpers import MIXED_MODEL, write_space

    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import QUIET_ENV
    from psmsearch.ray_driver import run_ray_search
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    for key, value in QUIET_ENV.items():  # the driver sets them for Ray; restored after the test
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    space = load_space(write_space(tmp_path, model=MIXED_MODEL, driver={"trials": 1, "pruner": "none"}), smoke_samples=1)
    space.header.driver.sampler = "grid"  # after load_space's checks, as in a space built in code
    options = SearchOptions(trials=1, progress=False, storage=str(tmp_path / DEFAULT_RESULTS),
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"space\.yaml:\d+: model\.encoder: sampler 'grid' needs encoders of a single "
                                          r"state kind"):
        run_ray_search(space, options)
    assert not (tmp_path / DEFAULT_RESULTS).exists() and not (tmp_path / "mlflow.db").exists()


def test_a_file_system_that_cannot_lock_runs_the_search_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """flock failing with ENOLCK (NFS mounted nolock) stopped every Ray search with a bare OSError."""
    import errno

    from psmsearch import ray_experiment

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ray_experiment.fcntl, "flock", no_locks)
    ran = False
    with ray_experiment._driving(tmp_path / "tiny"):
        ran = True
    assert ran
    assert "warning: cannot lock" in capsys.readouterr().err


@pytest.mark.slow
def test_two_resumes_of_a_new_ray_search_started_together_run_it_once(tmp_path: Path, private_env: dict[str, str]) -> None:
    """The reported race end to end: two `search --driver ray --resume` on a new name at once. One
    runs the search, the other is refused by name; MLflow holds one run of trial 0.

    Its encoders span two state kinds, so the aggregator is chosen by a per-kind parameter, which
    MLflow refused while it was named ``model.aggregator[tokens]`` (the trial failed)."""
    from searchhelpers import TINY_SPACE, mlflow_runs, write_space

    model = {**TINY_SPACE["model"], "encoder": {"choice": ["embed", "gla"]},
             "aggregator": {"choice": [*TINY_SPACE["model"]["aggregator"]["choice"], "affine_diag"]},
             "head": {"choice": [TINY_SPACE["model"]["head"], "linear_readout_diag"]}}
    space = write_space(tmp_path, model=model, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    command = [sys.executable, "-m", "psmsearch", "search", str(space), "--driver", "ray", "--resume", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PSMSEARCH_PLUGINS"} | private_env
    both = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in both]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is being run by process" in refused and "Traceback" not in refused, refused[-3000:]
    trials = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]
    assert [r.info.run_name for r in trials] == ["tiny-trial-0"]
    params = trials[0].data.params
    assert trials[0].info.status == "FINISHED", trials[0].data.tags.get("psmsearch.error")
    assert params["search.model.encoder"] == "embed", "the seed must draw a token-state encoder"
    assert params["search.model.aggregator-tokens"] == params["model.aggregator"]


OLD_FORMAT = Path(__file__).parent / "fixtures" / "ray_pre_9e2c35e" / "tiny"


def test_an_experiment_saved_before_resume_could_add_trials_is_recognised(tmp_path: Path) -> None:
    """Its tuner.pkl holds a plain OptunaSearch; every later one refers to the budgeted search."""
    from psmsearch.ray_experiment import saved_with_fixed_budget

    assert saved_with_fixed_budget(OLD_FORMAT)
    assert not saved_with_fixed_budget(tmp_path), "no saved Tuner: nothing to tell"


@pytest.mark.slow
def test_resuming_an_old_format_experiment_with_more_trials_says_why_none_is_added(
        tmp_path: Path, private_env: dict[str, str]) -> None:
    """A Ray search saved before 9e2c35e, resumed with a larger --trials, sampled nothing and exited
    130 with 'interrupted ... run the same command with --resume to continue' (which never helps).
    It now stops with an error naming the cause and what to do; asking for what it holds is a plain resume."""
    from searchhelpers import mlflow_runs, write_space

    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    shutil.copytree(OLD_FORMAT, tmp_path / DEFAULT_RESULTS / "tiny")
    more = run_cli("search", str(space), "--driver", "ray", "--resume", "--trials", "2", "--no-progress",
                   env=private_env, cwd=tmp_path, timeout=300)
    assert more.returncode == 2 and "Traceback" not in more.stderr, more.stderr[-3000:]
    assert "error: --trials: the Ray search 'tiny' in " in more.stderr
    assert "holds 1 ended trials and samples no more (asked for 2); start a new search with --study NAME" in more.stderr
    parents = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "search"]
    assert [r.info.status for r in parents] == ["FINISHED"]

    same = run_cli("search", str(space), "--driver", "ray", "--resume", "--trials", "1", "--no-progress", "--json",
                   env=private_env, cwd=tmp_path, timeout=300)
    assert same.returncode == 0, same.stderr[-3000:]
    assert [t["status"] for t in json.loads(same.stdout.strip().splitlines()[-1])["trials"]] == ["complete"]


def test_a_ray_resume_with_other_objectives_is_refused_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune restores the searcher and scheduler with the objectives they were made with: a resume
    whose space asked for others ran, then died in Tune's loop with a TuneError traceback at the first
    new trial's report (exit 1, a trial run KILLED, the parent KILLED). The claim records the
    objectives; a resume with others is refused by name, with the MLflow store untouched."""
    from searchhelpers import write_space

    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import QUIET_ENV
    from psmsearch.ray_driver import run_ray_search
    from psmsearch.ray_experiment import CLAIM_FILE
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    experiment = tmp_path / DEFAULT_RESULTS / "tiny"
    shutil.copytree(OLD_FORMAT, experiment)  # a saved Tuner: the experiment exists
    (experiment / CLAIM_FILE).write_text(json.dumps({"objectives": [{"metric": "acc_2x", "direction": "maximize"}]}))
    space = load_space(write_space(tmp_path, objectives=[{"metric": "acc_1x", "direction": "minimize"}]), smoke_samples=1)
    options = SearchOptions(trials=2, resume=True, progress=False, storage=str(tmp_path / DEFAULT_RESULTS),
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"was started with the objectives acc_2x \(maximize\), but the space asks "
                                          r"for acc_1x \(minimize\); .* choose another name with --study"):
        run_ray_search(space, options)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_ray_resume_with_a_changed_search_space_is_refused_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune restores the searcher, which samples from the space saved with the experiment, while trials
    are rebuilt from the file: a new or re-ranged dimension made trials fail with Optuna's FixedTrial
    error. The claim records the dimensions; a resume whose space changed them is refused, naming each."""
    from searchhelpers import TINY_SPACE, write_space

    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import QUIET_ENV
    from psmsearch.ray_driver import run_ray_search
    from psmsearch.ray_experiment import CLAIM_FILE, _check_new_or_resumed
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    experiment = tmp_path / DEFAULT_RESULTS / "tiny"
    experiment.mkdir(parents=True)
    started = load_space(write_space(tmp_path, "started.yaml"), smoke_samples=1)
    assert not _check_new_or_resumed(experiment, SearchOptions(trials=1), started)  # a new search claims its folder
    claim = json.loads((experiment / CLAIM_FILE).read_text())
    assert claim["dimensions"]["model.chunk_size"] == {"choice": [1, 2, 4]}
    shutil.copytree(OLD_FORMAT, experiment, dirs_exist_ok=True)  # then Tune saves its state: the experiment exists
    model = {**TINY_SPACE["model"], "chunk_size": {"choice": [1, 2, 8]}, "d_model": {"int": [16, 32], "step": 16}}
    space = load_space(write_space(tmp_path, model=model), smoke_samples=1)
    options = SearchOptions(trials=2, resume=True, progress=False, storage=str(tmp_path / DEFAULT_RESULTS),
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"space\.yaml:\d+: model\.d_model: the Ray search 'tiny' in .* was started "
                                          r"with another search space: model\.d_model was 16, now \{int: \[16, 32\], step: 16\}; "
                                          r"model\.chunk_size was \{choice: \[1, 2, 4\]\}, now \{choice: \[1, 2, 8\]\}\. "
                                          r".*start a new search with --study NAME"):
        run_ray_search(space, options)
    assert not (tmp_path / "mlflow.db").exists()
    assert json.loads((experiment / CLAIM_FILE).read_text()) == claim


def test_a_ray_resume_with_other_training_is_refused_as_an_optuna_one_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the dimensions were compared: a resume with another ``train.steps`` ran the new trials with
    it (the trial function takes the resuming command's space) beside trials trained otherwise. The claim
    records the search's whole definition (psmsearch.definition), checked as an Optuna study's is; what
    may change (``--trials``, ``driver.jobs``, the description, ``threads``) still resumes. A claim from
    before the record was kept is checked on its dimensions and given the record."""
    from searchhelpers import TINY_SPACE, write_space

    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import QUIET_ENV
    from psmsearch.ray_experiment import CLAIM_FILE, _check_new_or_resumed
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    experiment = tmp_path / DEFAULT_RESULTS / "tiny"
    experiment.mkdir(parents=True)
    assert not _check_new_or_resumed(experiment, SearchOptions(trials=1), load_space(write_space(tmp_path), smoke_samples=1))
    claim = json.loads((experiment / CLAIM_FILE).read_text())
    assert claim["definition"]["train.steps"] == 6
    shutil.copytree(OLD_FORMAT, experiment, dirs_exist_ok=True)  # Tune saved its state: the experiment exists
    resume = SearchOptions(trials=4, resume=True)
    longer = load_space(write_space(tmp_path, "longer.yaml", train={**TINY_SPACE["train"], "steps": 12}), smoke_samples=1)
    with pytest.raises(ConfigError) as refused:
        _check_new_or_resumed(experiment, resume, longer)
    line = (tmp_path / "longer.yaml").read_text().splitlines().index("  steps: 12") + 1
    assert str(refused.value).startswith(
        f"{tmp_path / 'longer.yaml'}:{line}: train.steps: the Ray search 'tiny' in {experiment.parent} was started with "
        "another search space: train.steps was 6, now 12. Trials of one search must be trained and sampled alike")
    assert "start a new search with --study NAME" in str(refused.value)
    allowed = load_space(write_space(tmp_path, "allowed.yaml", description="more", threads=2,
                                     driver={**TINY_SPACE["driver"], "trials": 4, "jobs": 2}), smoke_samples=1)
    assert _check_new_or_resumed(experiment, resume, allowed)

    (experiment / CLAIM_FILE).write_text(json.dumps({k: v for k, v in claim.items() if k != "definition"}))
    assert _check_new_or_resumed(experiment, resume, longer)  # an old claim: its dimensions are the same
    assert json.loads((experiment / CLAIM_FILE).read_text())["definition"]["train.steps"] == 12


@pytest.mark.slow
def test_a_real_ray_search_resumed_with_a_re_ranged_dimension_is_refused(tmp_path: Path, private_env: dict[str, str]) -> None:
    """End to end: the claim a real search writes holds its dimensions. Resumed with a chunk size it never
    had, the second trial failed with "The value of the parameter 'model.chunk_size' is not found ...
    FixedTrial"; it is now refused (exit 2) before Ray starts, and the search's trials are as they were."""
    space = SPACE.replace("shipped_mlp", "mlp") + "driver: {pruner: none, trials: 1}\n"
    (tmp_path / "space.yaml").write_text(space)
    (tmp_path / "changed.yaml").write_text(space.replace("chunk_size: {choice: [2, 4]}", "chunk_size: {choice: [2, 8]}"))
    first = run_cli("search", "space.yaml", "--driver", "ray", "--no-progress", env=private_env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = run_cli("search", "changed.yaml", "--driver", "ray", "--resume", "--trials", "2", "--no-progress",
                      env=private_env, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 2, resumed.stderr[-4000:]
    assert resumed.stderr.strip().splitlines()[-1].startswith(
        "error: changed.yaml:8: model.chunk_size: the Ray search 'ray-tiny' in ")
    assert "model.chunk_size was {choice: [2, 4]}, now {choice: [2, 8]}" in resumed.stderr


def test_an_unreachable_cluster_address_is_a_clear_error_within_seconds(tmp_path: Path) -> None:
    """Ray retries an unreachable GCS for minutes with its own warnings only; psmsearch probes first."""
    from searchhelpers import write_space

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    started = time.monotonic()
    result = run_cli("search", str(space), "--driver", "ray", "--address", f"127.0.0.1:{port}", "--no-progress",
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--address: cannot reach a Ray cluster at '127.0.0.1:{port}'" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "mlflow.db").exists(), "nothing is created for a search that cannot start"


@pytest.mark.slow
def test_a_trial_stopped_by_asha_shows_its_last_evaluation(tmp_path: Path) -> None:
    """ASHA stops a trial whose first evaluation is below the completed one's; the summary and its
    MLflow run show that evaluation's metrics (as a pruned Optuna trial's do)."""
    from searchhelpers import TINY_SPACE, write_space

    space = write_space(
        tmp_path,
        task={"name": "scripted_score", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16, "curriculum": False,
              "quality": {"choice": [0.2, 0.8]}},
        model={**TINY_SPACE["model"], "chunk_size": 2, "aggregator": {"name": "mlp", "mlp_ratio": 1}},
        objectives=[{"metric": "score", "direction": "maximize"}],
        driver={"trials": 4, "startup_trials": 1, "pruner": "median", "sampler": "random", "seed": 0},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**cluster_env(), "RAY_TMPDIR": tempfile.mkdtemp(prefix="psr")}
    try:
        result = run_cli("--plugin", str(Path(__file__).parent / "fixtures" / "scripted_score.py"), "search", str(space),
                         "--driver", "ray", "--tracking-uri", uri, "--no-progress", "--json", env=env, cwd=tmp_path, timeout=300)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
    pruned = [row for row in rows if row["status"] == "pruned"]
    assert pruned, f"seed 0 draws 0.8 then 0.2 (Optuna 5 RandomSampler): {rows}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for row in pruned:
        assert row["run_id"], row
        run = client.get_run(row["run_id"])
        first_evaluation = float(run.data.params["task.quality"]) * 1
        assert run.info.status == "FINISHED" and run.data.tags["psmsearch.status"] == "pruned"  # KILLED is interrupted
        assert run.data.metrics["score"] == pytest.approx(first_evaluation)
        assert row["objectives"]["score"] == pytest.approx(first_evaluation)
        assert row["metrics"]["acc_1x"] == pytest.approx(run.data.metrics["acc_1x"])


def test_the_workers_get_the_directory_the_command_started_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative ``task.path`` is looked for in ``PSMSEARCH_LAUNCH_DIR``; a private local cluster inherits it
    from the driver, but workers of a cluster joined with ``--address`` do not: the job's runtime_env
    carries it, beside the shipped plugins."""
    from psmsearch.ray_cluster import worker_runtime_env
    from psmsearch.tasks import LAUNCH_DIR_ENV

    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path))
    assert worker_runtime_env([]) == {"env_vars": {LAUNCH_DIR_ENV: str(tmp_path)}}
    plugin = tmp_path / "my_agg.py"
    plugin.write_text("")
    env = worker_runtime_env([str(plugin)])
    assert env["env_vars"] == {LAUNCH_DIR_ENV: str(tmp_path), "PSMSEARCH_PLUGINS": "my_agg"}
    assert env["py_modules"] == [str(plugin.resolve())]
    monkeypatch.delenv(LAUNCH_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    assert worker_runtime_env([])["env_vars"][LAUNCH_DIR_ENV] == str(tmp_path), "library use: the working directory"


@pytest.mark.parametrize("address", ["bogus", "127.0.0.1", ":6379", "ray://nohost"])
def test_a_malformed_cluster_address_is_refused_naming_the_forms(address: str) -> None:
    """Without a port the probe was skipped and Ray raised "Invalid address format" (a traceback, exit 1)."""
    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import _check_reachable

    with pytest.raises(ConfigError, match=rf"--address: '{re.escape(address)}' is not a Ray cluster address; expected "
                                          r"HOST:PORT .*, ray://HOST:PORT \(Ray Client\) or auto"):
        _check_reachable(address)
    _check_reachable("auto")  # left to Ray


def test_two_plugin_files_of_one_name_are_refused_for_the_ray_workers(tmp_path: Path) -> None:
    """Both shipped as the module ``agg``: every trial using the second's components failed "unknown aggregator"."""
    from psmsearch.errors import ConfigError
    from psmsearch.ray_cluster import check_shipped_names

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "agg.py").write_text("")
    check_shipped_names([str(tmp_path / "a" / "agg.py"), str(tmp_path / "a" / "agg.py"), "some_module"])
    with pytest.raises(ConfigError, match=r"--plugin: plugins .*a/agg\.py and .*b/agg\.py would both reach the Ray "
                                          r"workers as the module 'agg' .*; rename one"):
        check_shipped_names([str(tmp_path / "a" / "agg.py"), str(tmp_path / "b" / "agg.py")])


def test_a_grid_search_runs_each_point_once_whatever_trials_ask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tune went on sampling past the grid (Optuna's grid sampler stops its study there): a point trained twice."""
    from searchhelpers import write_space

    from psmsearch.ray_driver import capped_to_grid
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    space = load_space(write_space(tmp_path, driver={"trials": 9, "sampler": "grid", "pruner": "none"}), smoke_samples=1)
    capped = capped_to_grid(space, SearchOptions(trials=9))
    assert capped.trials == 6  # chunk sizes 1, 2, 4 x two aggregators
    assert "sampler grid: the space has 6 points, so 6 trials run, not 9" in capsys.readouterr().err
    assert capped_to_grid(space, SearchOptions(trials=4)).trials == 4


@pytest.mark.slow
@pytest.mark.parametrize("address", [[], ["--address", "local"]], ids=["private", "local"])
def test_resources_a_private_cluster_lacks_are_refused_and_leave_nothing(tmp_path: Path, address: list[str]) -> None:
    """A GPU asked of a CPU-only machine hung the search silently (Tune waits for resources, its warning
    hidden); the failed start also kept the name and left a parent run that compare listed. ``--address
    local`` starts a cluster on this machine too."""
    from searchhelpers import write_space

    from psmsearch.ray_experiment import CLAIM_FILE

    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    result = run_cli("search", str(space), "--driver", "ray", *address, "--gpus-per-trial", "1000", "--no-progress",
                     cwd=tmp_path, timeout=180)  # more than any machine has, GPU or not
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"--gpus-per-trial: --gpus-per-trial 1000: the Ray cluster has \d+ GPUs in all, so no trial "
                     r"could start \(the private cluster is this machine\)", result.stderr), result.stderr
    assert not (tmp_path / DEFAULT_RESULTS / "tiny" / CLAIM_FILE).exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []

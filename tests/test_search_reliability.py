"""Searches survive failing trials, SIGINT, SIGTERM, SIGKILL and a second process on the same stores."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from clihelpers import run_cli, table_rows
from searchhelpers import mlflow_runs, optuna_trials, write_space

FIXTURES = Path(__file__).parent / "fixtures"
FAILING = ["fail_raises", "fail_nan", "fail_shape", "fail_streaming"]


def trial_runs(db: Path) -> list:
    return [r for r in mlflow_runs(db) if r.data.tags.get("psmsearch.kind") == "trial"]


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path: Path, fresh_registry) -> None:
    from psmsearch.optuna_driver import run_optuna_search
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    fresh_registry.use_plugins([str(FIXTURES / "failing_components.py")])
    model = {"d_model": 16, "chunk_size": 2, "encoder": "embed", "head": {"name": "attention", "layers": 1, "heads": 2},
             "aggregator": {"choice": [*FAILING, "mlp"]}}
    space = load_space(write_space(tmp_path, model=model), smoke_samples=2)
    storage = f"sqlite:///{tmp_path / 'psmsearch.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    for name in [*FAILING, "mlp"]:
        study.enqueue_trial({"model.aggregator": name})
    options = SearchOptions(trials=5, storage=storage, resume=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    result = run_optuna_search(space, options)

    by_name = {o.params["model.aggregator"]: o for o in result.outcomes}
    assert by_name["mlp"].state == "complete"
    assert by_name["fail_raises"].state == "failed"
    fixture = FIXTURES / "failing_components.py"
    assert by_name["fail_raises"].error.startswith("training and evaluation: RuntimeError: boom from fail_raises (at ")
    assert f"{fixture}:" in by_name["fail_raises"].error and by_name["fail_raises"].error.endswith(" in forward)")
    streaming = by_name["fail_streaming"]
    assert streaming.state == "failed" and streaming.error.startswith(
        "measuring streaming inference: RuntimeError: boom while streaming (at ")
    assert "acc_2x" in streaming.metrics and "train_seconds" in streaming.metrics, "what training measured is kept"
    assert by_name["fail_nan"].state == "failed" and "diverged" in by_name["fail_nan"].error
    assert by_name["fail_shape"].state == "failed" and by_name["fail_shape"].error
    trials = {t.params["model.aggregator"]: t for t in optuna_trials(tmp_path / "psmsearch.db")}
    assert trials["mlp"].state == TrialState.COMPLETE
    for name in FAILING:
        assert trials[name].state == TrialState.FAIL
        assert trials[name].user_attrs["error"] == by_name[name].error
    runs = {r.data.params["model.aggregator"]: r for r in trial_runs(tmp_path / "mlflow.db")}
    assert runs["mlp"].info.status == "FINISHED"
    for name in FAILING:
        assert runs[name].info.status == "FAILED"
        assert runs[name].data.tags["psmsearch.error"] == by_name[name].error
    assert runs["fail_streaming"].data.metrics["acc_2x"] == streaming.metrics["acc_2x"]


def test_a_task_that_raises_fails_its_trial_not_the_search(tmp_path: Path) -> None:
    """Every trial fails, each recorded as usual, and the search goes on to the end; it then exits 1
    (it exited 0, so a script could not tell it from a search that found something) with one line
    saying so after the table, which is still printed."""
    task = {"name": "fail_task", "group": "Z5", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16}
    space = write_space(tmp_path, task=task, driver={"trials": 2, "pruner": "none"})
    result = run_cli("--plugin", str(FIXTURES / "failing_components.py"), "search", str(space), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "ValueError: the task's data source is broken (at " in result.stderr.replace(" \n", " ")
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no trial of search 'tiny' completed (2 failed, of 2): this command's failures are above "
        "('trial N failed: ...'), and `psmsearch compare --search tiny` lists every trial with its error (as its "
        "MLflow run holds it: tag psmsearch.error, artifact error.txt)")
    assert [row[:2] for row in table_rows(result.stdout)] == [["tiny-trial-0", "failed"], ["tiny-trial-1", "failed"]]
    assert [t.state for t in optuna_trials(tmp_path / "psmsearch.db")] == [TrialState.FAIL] * 2
    assert [r.info.status for r in trial_runs(tmp_path / "mlflow.db")] == ["FAILED"] * 2


def _start_search(space: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PSMSEARCH_PLUGINS"}
    return subprocess.Popen(
        [sys.executable, "-m", "psmsearch", "search", str(space), "--no-progress", *extra],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - the stores may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def _one_done_one_running(folder: Path) -> bool:
    """One trial complete and another running, in Optuna *and* with its MLflow run open.

    Waiting for the MLflow run too means the signal lands where both stores know
    the running trial, so the test can check how each marks it afterwards.
    """
    trials = optuna_trials(folder / "psmsearch.db")
    running = {t.number for t in trials if t.state == TrialState.RUNNING}
    if not running or not any(t.state == TrialState.COMPLETE for t in trials):
        return False
    return bool(running & _open_mlflow_trials(folder / "mlflow.db"))


def _open_mlflow_trials(db: Path) -> set[int]:
    """Trial numbers whose MLflow run is RUNNING, read with plain SQL.

    A poll must take milliseconds (trials here last seconds); building an
    MlflowClient per poll does not. Raises while MLflow has not created its schema.
    """
    query = ("SELECT t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
             "WHERE t.key = 'psmsearch.trial' AND r.status = 'RUNNING'")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
        return {int(value) for (value,) in connection.execute(query)}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGKILL", "SIGTERM"])
def test_resume_after_the_search_process_is_killed(tmp_path: Path, sig: signal.Signals) -> None:
    driver = {"trials": 3, "pruner": "none", "startup_trials": 1, "heartbeat_interval": 1, "grace_period": 3}
    # Trials of about 1.5 s, so that the signal cannot miss the running one: at 30 steps (0.3 s)
    # a trial once ended between the poll that saw it running and the kill.
    train = {"steps": 300, "batch_size": 8, "eval_every": 100, "warmup_steps": 1, "eval_batch_size": 16}
    space = write_space(tmp_path, driver=driver, train=train)
    process = _start_search(space, tmp_path)
    _wait_for(lambda: _one_done_one_running(tmp_path))
    completed_before = {t.number for t in optuna_trials(tmp_path / "psmsearch.db") if t.state == TrialState.COMPLETE}
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    if sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM, what schedulers send, is handled as Ctrl-C is
        assert process.returncode == 130
        assert "--resume" in stderr and "Traceback" not in stderr
    else:
        assert process.returncode == -signal.SIGKILL
        left_running = [t.number for t in optuna_trials(tmp_path / "psmsearch.db") if t.state == TrialState.RUNNING]
        assert len(left_running) == 1, f"the kill did not land inside a trial (running after it: {left_running})"

    result = run_cli("search", str(space), "--resume", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    trials = optuna_trials(tmp_path / "psmsearch.db")
    complete = {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert completed_before <= complete
    assert len(complete) == 3, [(t.number, t.state, t.user_attrs) for t in trials]
    (interrupted,) = [t for t in trials if t.state == TrialState.FAIL]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted.number or t.system_attrs.get("failed_trial") == interrupted.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == interrupted.params

    runs = trial_runs(tmp_path / "mlflow.db")
    finished = sorted(int(r.data.tags["psmsearch.trial"]) for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(complete)  # same count as Optuna, no duplicates
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert [int(r.data.tags["psmsearch.trial"]) for r in killed] == [interrupted.number]
    assert killed[0].data.tags["psmsearch.status"] == "interrupted"
    if sig != signal.SIGKILL:  # its latest metrics are its last evaluation's: compare shows them, so the step is named
        error = killed[0].data.tags["psmsearch.error"]
        evaluated = client_history_steps(tmp_path / "mlflow.db", killed[0].info.run_id)
        assert error == (f"interrupted by the user after step {max(evaluated)}; the values shown are that evaluation's"
                         if evaluated else "interrupted by the user before its first evaluation"), error
    assert len([r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "search"]) == 1


def client_history_steps(db: Path, run_id: str) -> list[int]:
    """The steps at which the run logged its evaluation metrics (acc_2x, the objective)."""
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, "acc_2x")]


SIGNALS_TWICE = """
import os, signal, sys, threading
from psmsearch import interrupts

interrupts.install()
try:
    os.kill(os.getpid(), signal.SIGINT)
    threading.Event().wait(5)
    sys.exit("the first SIGINT did not raise")
except KeyboardInterrupt:
    pass
assert interrupts.STOP.is_set()
os.kill(os.getpid(), signal.SIGTERM)  # while stopping: a message, no second KeyboardInterrupt
threading.Event().wait(0.2)
try:
    interrupts.raise_if_stopping()
except KeyboardInterrupt:
    print("worker threads stop")
"""


def test_a_second_signal_while_stopping_does_not_raise_again() -> None:
    result = subprocess.run([sys.executable, "-c", SIGNALS_TWICE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "SIGTERM: stopping; what is running is being closed (a search marks its trials interrupted" in result.stderr
    assert result.stdout.strip() == "worker threads stop"


SIGNAL_IN_A_DATABASE_CALL = """
import os, signal, sys, threading
from psmsearch import interrupts

interrupts.install()
steps = []
try:
    with interrupts.deferred():
        with interrupts.deferred():  # nested: only the outermost block's end raises
            os.kill(os.getpid(), signal.SIGINT)
            threading.Event().wait(0.2)
            steps.append("inner finished")
        assert interrupts.STOP.is_set(), "worker threads are told at once"
        steps.append("outer finished")
    sys.exit("the held-back interrupt was lost")
except KeyboardInterrupt as err:
    print(steps, str(err))
"""


def test_a_signal_inside_a_database_call_is_raised_when_the_call_returns() -> None:
    """A KeyboardInterrupt raised inside SQLAlchemy could leave a transaction holding SQLite's lock, and the
    interrupted trial's clean-up (and Optuna's heartbeat thread) then waited on it: the SIGINT resume test
    hung about once in 10-20 runs. Storage and tracking calls now run whole, the interrupt raised after."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_DATABASE_CALL], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['inner finished', 'outer finished'] SIGINT"


def test_every_storage_and_tracking_call_holds_a_signal_back() -> None:
    from psmsearch.optuna_driver import QueueSafeRDBStorage
    from psmsearch.tracking import retry_locked

    for name in ("create_new_trial", "set_trial_user_attr", "set_trial_intermediate_value", "get_all_trials",
                 "set_trial_state_values", "record_heartbeat"):
        assert getattr(getattr(QueueSafeRDBStorage, name), "__wrapped__", None) is not None, name
    from psmsearch import interrupts

    depth = []
    retry_locked(lambda: depth.append(interrupts._deferring))
    assert depth == [1]


SIGNAL_IN_A_FINALIZER = """
import os, signal, sys, threading
from psmsearch import interrupts

interrupts.install()

class Finalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(200000):  # the handler runs here, inside the finalizer
            pass

try:
    Finalised()  # dropped at once: its __del__ runs
    threading.Event().wait(5)
    sys.exit("the interrupt was lost in the finalizer")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_signal_that_lands_in_a_finalizer_still_interrupts() -> None:
    """Python swallows an exception raised in ``__del__`` or a weakref callback (SQLAlchemy's, during a
    search) and prints it with a traceback: Ctrl-C there printed "Exception ignored ... Traceback"."""
    result = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_FINALIZER], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "interrupted"
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_ctrl_c_stops_parallel_trials_at_once(tmp_path: Path) -> None:
    """With --jobs 2 the trials run in threads, which Python's KeyboardInterrupt never reaches: the
    search used to train both to the end before it stopped."""
    driver = {"trials": 2, "pruner": "none", "startup_trials": 1, "heartbeat_interval": 1, "grace_period": 3}
    train = {"steps": 20000, "batch_size": 8, "eval_every": 10000, "warmup_steps": 1, "eval_batch_size": 16}  # minutes each
    space = write_space(tmp_path, driver=driver, train=train)
    process = _start_search(space, tmp_path, "--jobs", "2")
    _wait_for(lambda: len(_open_mlflow_trials(tmp_path / "mlflow.db")) == 2)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert time.monotonic() - started < 60, "the running trials were trained to the end"
    assert "Traceback" not in stderr and "terminate called" not in stderr
    runs = trial_runs(tmp_path / "mlflow.db")
    assert sorted((r.info.status, r.data.tags["psmsearch.status"]) for r in runs) == [("KILLED", "interrupted")] * 2
    assert not [(t.number, t.user_attrs, stderr) for t in optuna_trials(tmp_path / "psmsearch.db") if t.state == TrialState.RUNNING]


def test_two_processes_share_one_study_and_one_experiment(tmp_path: Path) -> None:
    space = write_space(tmp_path, driver={"trials": 4, "pruner": "none", "startup_trials": 1})
    first = _start_search(space, tmp_path, "--resume")
    second = _start_search(space, tmp_path, "--resume")
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    for process, (_, stderr) in zip((first, second), outputs):
        assert process.returncode == 0, stderr
        assert "locked" not in stderr.lower() and "Traceback" not in stderr
    trials = optuna_trials(tmp_path / "psmsearch.db")
    complete = sorted(t.number for t in trials if t.state == TrialState.COMPLETE)
    assert len(complete) >= 4 and len(complete) == len(trials)  # at most one in flight per process overshoots
    assert len(complete) <= 4 + 1
    runs = trial_runs(tmp_path / "mlflow.db")
    assert sorted(int(r.data.tags["psmsearch.trial"]) for r in runs) == complete
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "search"]
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}


def test_an_unwritable_artifact_store_does_not_fail_trials_or_the_search(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from psmsearch.optuna_driver import run_optuna_search
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("tiny", artifact_location=str(tmp_path / "a-file" / "artifacts"))
    space = load_space(write_space(tmp_path, driver={"trials": 1, "pruner": "none"}), smoke_samples=1)
    options = SearchOptions(trials=1, storage=f"sqlite:///{tmp_path / 'psmsearch.db'}", tracking_uri=uri, progress=False)
    with pytest.warns(UserWarning, match="could not (log its configuration|log its results) to MLflow"):
        result = run_optuna_search(space, options)
    assert [o.state for o in result.outcomes] == ["complete"]
    assert [t.state for t in optuna_trials(tmp_path / "psmsearch.db")] == [TrialState.COMPLETE]
    assert [r.info.status for r in trial_runs(tmp_path / "mlflow.db")] == ["FINISHED"]


def test_parallel_jobs_take_each_queued_trial_once(tmp_path: Path) -> None:
    """A resumed search re-queues its interrupted trials, which ``study.optimize(n_jobs=...)`` threads
    then take from the SQLite study. SQLite ignores ``SELECT ... FOR UPDATE``, so with Optuna's own
    storage two threads took the same queued trial: 2-4 of 24 ran twice in each of three rounds here,
    and the second ``tell`` raised "Cannot tell a COMPLETE trial" (a resumed ``--jobs 2`` search
    crashed or ran a trial twice). The driver's storage serialises the hand-out."""
    from collections import Counter

    from psmsearch.optuna_driver import make_storage
    from psmsearch.search import SearchOptions

    for round_ in range(3):
        storage = make_storage(f"sqlite:///{tmp_path / f'queue{round_}.db'}", SearchOptions(trials=1))
        study = optuna.create_study(study_name="queue", storage=storage)
        for x in range(24):
            study.enqueue_trial({"x": float(x)})
        runs: Counter[float] = Counter()

        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", 0.0, 100.0)
            runs[x] += 1
            time.sleep(0.01)
            return x

        study.optimize(objective, n_trials=24, n_jobs=4)
        assert runs == Counter({float(x): 1 for x in range(24)}), f"round {round_}: {runs}"
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 24

"""Real searches: Optuna on SQLite, MLflow on SQLite, started by the real command line."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from psmsearch.errors import ConfigError

from clihelpers import run_cli, table_rows
from searchhelpers import MIXED_MODEL, TINY_SPACE, mlflow_runs, optuna_trials, write_space

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One real 3-trial search run through ``psmsearch search`` in a fresh directory."""
    work = tmp_path_factory.mktemp("search")
    space = write_space(work)
    result = run_cli("search", str(space), "--json", "--no-progress", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, json.loads(result.stdout.strip().splitlines()[-1])


def test_optuna_study_lives_in_sqlite_in_the_working_directory(finished_search) -> None:
    work, summary = finished_search
    trials = optuna_trials(work / "psmsearch.db")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert summary["storage"] == f"sqlite:///{work / 'psmsearch.db'}"
    for trial in trials:
        assert 0.0 <= trial.value <= 1.0
        assert trial.user_attrs["metrics"]["acc_2x"] == trial.value


def test_mlflow_holds_one_parent_and_one_nested_run_per_trial(finished_search) -> None:
    work, summary = finished_search
    runs = mlflow_runs(work / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("psmsearch.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("psmsearch.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id == summary["parent_run"]
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["psmsearch.driver"] == "optuna"
        assert run.data.tags["psmsearch.state_kind"] == "tokens"
        assert run.data.tags["psmsearch.associative"] == "false"
        assert run.data.tags["psmsearch.plugin.aggregator"] == "psmsearch.plugins.token_state"
        assert run.data.tags["psmsearch.plugin.task"] == "psmsearch.plugins.tasks"
        params = run.data.params
        assert params["model.aggregator"] in {"mlp", "attention"}
        assert params["model.chunk_size"] in {"1", "2", "4"}
        assert params["model.head.layers"] == "1"
        assert "acc_2x" in run.data.metrics and "state_bytes_64" in run.data.metrics and "params" in run.data.metrics


def test_step_metrics_and_config_artifact_are_logged(finished_search) -> None:
    from mlflow.tracking import MlflowClient

    work, _ = finished_search
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = next(r for r in mlflow_runs(work / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc_1x")]
    assert steps == [3, 6]  # the final metrics added a third point at step 0 (the curve's start)
    once = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    assert {key: steps for key, steps in once.items() if steps != [3, 6]} == {
        key: [6] for key, steps in once.items() if steps != [3, 6]}  # measured once: at the last step
    assert any(steps == [6] for steps in once.values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "trial_config.yaml" in artifacts and "curves.png" in artifacts
    from psmsearch.trial import load_trial_config

    warnings: list[str] = []  # the resolved config runs as written (it held n_heads and window under psm)
    load_trial_config(client.download_artifacts(run.info.run_id, "trial_config.yaml", str(work)), warn=warnings.append)
    assert warnings == []


def test_summary_ranks_trials_best_first(finished_search) -> None:
    _, summary = finished_search
    values = [t["objectives"]["acc_2x"] for t in summary["trials"]]
    assert values == sorted(values, reverse=True)
    assert summary["trials"][0]["pareto"] is True
    trial_runs = {r.info.run_id for r in mlflow_runs(finished_search[0] / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"}
    assert {t["run_id"] for t in summary["trials"]} == trial_runs


def test_the_summary_names_trials_as_mlflow_does(finished_search) -> None:
    """search's table said trial-4 where MLflow (and compare) say tiny-trial-4: it now uses the run's name."""
    work, summary = finished_search
    runs = {r.info.run_id: r.info.run_name for r in mlflow_runs(work / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"}
    assert {t["run_id"]: t["name"] for t in summary["trials"]} == runs
    assert sorted(runs.values()) == ["tiny-trial-0", "tiny-trial-1", "tiny-trial-2"]


def test_compare_reads_mlflow_ranks_and_writes_plots(finished_search) -> None:
    work, summary = finished_search
    result = run_cli("compare", "--experiment", "tiny", "--json", "--out", str(work / "plots"), cwd=work)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["trials"]) == 3
    values = [t["objectives"]["acc_2x"] for t in report["trials"]]
    assert values == sorted(values, reverse=True)
    assert sorted(values) == sorted(t["objectives"]["acc_2x"] for t in summary["trials"])
    assert [(t["name"], t["run_id"]) for t in report["trials"]] == [(t["name"], t["run_id"]) for t in summary["trials"]]
    assert (work / "plots" / "objectives.png").stat().st_size > 1000
    assert (work / "plots" / "accuracy_vs_length.png").exists()
    assert (work / "plots" / "memory_vs_n.png").exists()


def test_rerunning_without_resume_is_refused(finished_search) -> None:
    work, _ = finished_search
    result = run_cli("search", "space.yaml", "--no-progress", cwd=work)
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if "already exists" in line]
    assert line.startswith("error: study 'tiny' already exists in sqlite:///"), "--resume was not passed: no '--resume:' prefix"
    assert "pass --resume to continue" in line and line.endswith("or another --storage"), "the message is one line"


def test_compare_table_shows_counts_as_whole_numbers(finished_search) -> None:
    work, summary = finished_search
    result = run_cli("compare", "--experiment", "tiny", "--objective", "params:min", "--objective", "acc_2x:max",
                     "--out", str(work / "plots"), cwd=work)
    assert result.returncode == 0, result.stderr
    shown = {row[0]: row[3] for row in table_rows(result.stdout)}
    for trial in summary["trials"]:
        params = trial["metrics"]["params"]
        assert params >= 1000 and params == int(params)
        assert shown[trial["name"]] == f"{int(params):,}", "params as an integer with thousands separators"


def test_resume_of_a_finished_study_runs_nothing_more(finished_search) -> None:
    work, _ = finished_search
    result = run_cli("search", "space.yaml", "--resume", "--no-progress", cwd=work)
    assert result.returncode == 0, result.stderr
    assert len(optuna_trials(work / "psmsearch.db")) == 3
    assert len([r for r in mlflow_runs(work / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]) == 3


def test_resume_with_more_trials_adds_exactly_the_difference(tmp_path: Path) -> None:
    """A random sampler reseeded with the plain seed on resume would draw trial 0's parameters again."""
    space = write_space(tmp_path, train={**TINY_SPACE["train"], "lr": {"float": [1.0e-3, 1.0e-2], "log": True}},
                        driver={"trials": 1, "startup_trials": 1, "pruner": "none", "sampler": "random"})
    assert run_cli("search", str(space), "--no-progress", cwd=tmp_path).returncode == 0
    result = run_cli("search", str(space), "--resume", "--trials", "2", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = optuna_trials(tmp_path / "psmsearch.db")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params["train.lr"] != trials[1].params["train.lr"], "the resumed search repeated trial 0"
    runs = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]
    assert sorted(r.data.tags["psmsearch.trial"] for r in runs) == ["0", "1"]
    assert len([r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "search"]) == 1


def test_multi_objective_search_marks_a_pareto_front(tmp_path: Path) -> None:
    objectives = [{"metric": "acc_2x", "direction": "maximize"}, {"metric": "state_bytes_64", "direction": "minimize"}]
    space = write_space(tmp_path, objectives=objectives)
    result = run_cli("search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
    points = [(t["objectives"]["acc_2x"], t["objectives"]["state_bytes_64"]) for t in trials]
    for t, (acc, mem) in zip(trials, points):
        dominated = any(a >= acc and m <= mem and (a > acc or m < mem) for a, m in points)
        assert t["pareto"] is (not dominated)
    assert all(len(t.values) == 2 for t in optuna_trials(tmp_path / "psmsearch.db"))


def test_studies_of_one_name_are_separate_searches_and_compare_shows_the_latest(tmp_path: Path) -> None:
    """Trial runs are named and tagged with the study (--study), not the space; two studies of one name in
    two storages are two searches (two parent runs), so compare never mixes their trials."""
    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    for storage in ("first.db", "second.db"):
        result = run_cli("search", str(space), "--study", "mystudy", "--storage", f"sqlite:///{tmp_path / storage}",
                         "--no-progress", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    runs = mlflow_runs(tmp_path / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("psmsearch.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("psmsearch.kind") == "trial"]
    assert len(parents) == 2 and {p.data.tags["psmsearch.search"] for p in parents} == {"mystudy"}
    assert {p.data.tags["psmsearch.storage"] for p in parents} == {f"sqlite:///{tmp_path / s}" for s in ("first.db", "second.db")}
    assert sorted(r.info.run_name for r in trials) == ["mystudy-trial-0", "mystudy-trial-0"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {p.info.run_id for p in parents}
    latest = max(parents, key=lambda run: run.info.start_time)
    for args in ((), ("--search", "mystudy")):
        result = run_cli("compare", "--json", *args, "--out", str(tmp_path / "plots"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["search"] == "mystudy" and len(report["trials"]) == 1
    latest_trial = next(r for r in trials if r.data.tags["mlflow.parentRunId"] == latest.info.run_id)
    assert report["trials"][0]["run_id"] == latest_trial.info.run_id
    _compare_picks_searches_of_one_name_by_run_id(tmp_path, parents, trials)


def _compare_picks_searches_of_one_name_by_run_id(tmp_path: Path, parents: list[Any], trials: list[Any]) -> None:
    """By name compare shows the latest search and lists the others' run IDs; ``--search RUN_ID`` picks
    any of them (alone, or beside another of its name, each then labelled ``NAME@RUNID8``)."""
    from click.testing import CliRunner

    from psmsearch.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    older, latest = sorted(parents, key=lambda run: run.info.start_time)
    trial_of = {r.data.tags["mlflow.parentRunId"]: r.info.run_id for r in trials}

    def compare(*args: str) -> Any:
        return CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--out", str(tmp_path / "plots"), *args])

    shown = compare("--search", "mystudy")
    assert shown.exit_code == 0, shown.output
    title = " ".join(shown.output.split())  # the table's title, wrapped at the terminal's width
    assert f"search mystudy, run {latest.info.run_id} (the latest of 2 searches of this name)" in title
    assert f"other searches named 'mystudy' in experiment 'tiny' (the latest is shown; --search RUN_ID picks one): " \
           f"{older.info.run_id} (started " in shown.output
    assert f"storage sqlite:///{tmp_path / 'first.db'}" in shown.output
    result = compare("--search", older.info.run_id, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["run_id"] for t in report["trials"]] == [trial_of[older.info.run_id]]
    assert report["searches"] == [{"search": "mystudy", "label": "mystudy", "experiment": "tiny",
                                   "parent_run": older.info.run_id, "searches_of_this_name": 2}]
    short = compare("--search", older.info.run_id[:8], "--json")  # as a NAME@RUNID8 label shows it
    assert short.exit_code == 0, short.output
    assert json.loads(short.stdout)["searches"][0]["parent_run"] == older.info.run_id
    from psmsearch.errors import ConfigError
    from psmsearch.search_picking import _search_run_by_prefix

    with pytest.raises(ConfigError, match=rf"2 searches have run IDs starting '': {latest.info.run_id} \(started .*; "
                                          rf"{older.info.run_id} \(started .*; give more of the ID"):
        _search_run_by_prefix(uri, "")
    result = compare("--search", "mystudy", "--search", older.info.run_id, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fixed_differences"] == {}, "one space: nothing held fixed differs"
    labels = [f"mystudy@{run.info.run_id[:8]}" for run in (latest, older)]
    assert [s["label"] for s in report["searches"]] == labels
    assert sorted((t["search"], t["run_id"]) for t in report["trials"]) == sorted(
        (f"mystudy@{run.info.run_id[:8]}", trial_of[run.info.run_id]) for run in (latest, older))
    assert (tmp_path / "plots").is_dir()
    refused = compare("--search", "mystudy", "--search", latest.info.run_id)
    assert refused.exit_code == 2
    assert f"--search 'mystudy' and --search '{latest.info.run_id}' are one search" in refused.output
    refused = compare("--search", trial_of[older.info.run_id])
    assert refused.exit_code == 2 and "is a psmsearch trial run, not a search's parent run" in refused.output
    unknown = "0" * 32
    refused = compare("--search", unknown)
    assert refused.exit_code == 2 and f"no search '{unknown}' has been tracked" in refused.output
    refused = compare("--search", older.info.run_id, "--experiment", "elsewhere")
    assert refused.exit_code == 2 and "is in experiment 'tiny', not 'elsewhere'" in refused.output
    refused = compare("--search", "a'b")  # went into an MLflow filter string: a traceback
    assert refused.exit_code == 2 and """"a'b" is no search name or run ID""" in refused.output, refused.output
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).delete_run(older.info.run_id)  # in MLflow's trash: found by ID only
    refused = compare("--search", older.info.run_id)
    assert refused.exit_code == 2 and f"run {older.info.run_id} is deleted (in MLflow's trash)" in refused.output


@pytest.mark.parametrize(("uri", "message"), [
    ("sqlite:////nonexistent_folder_psm/m.db", "the folder '/nonexistent_folder_psm' of the SQLite file does not exist"),
    ("bogus://x", "unknown tracking URI scheme 'bogus'"),
    ("file:///tmp/psm_file_store", "is a file store, which MLflow no longer writes"),
    ("http://127.0.0.1:9/", "cannot reach the tracking server at 127.0.0.1:9"),
    ("sqlite:///:memory:", "is an in-memory database, lost when the command ends"),
])
def test_a_bad_tracking_uri_is_refused_before_the_study_exists(tmp_path: Path, uri: str, message: str) -> None:
    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    result = run_cli("search", str(space), "--tracking-uri", uri, "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--tracking-uri: " in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    import optuna

    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'psmsearch.db'}") == [], "a study was left behind"


@pytest.mark.parametrize(("storage", "message"), [
    ("{tmp}", "'{tmp}' is not a database URL (a folder is what --driver ray takes as --storage); expected an Optuna "
              "storage URL such as sqlite:///psmsearch.db"),
    ("sqlite:////nonexistent_folder_psm/x.db", "'sqlite:////nonexistent_folder_psm/x.db': the folder "
                                              "'/nonexistent_folder_psm' of the SQLite file does not exist"),
    ("bogus://x", "'bogus://x': unknown database scheme 'bogus'; expected an Optuna storage URL"),
    ("sqlite:///:memory:", "'sqlite:///:memory:' is an in-memory database, lost when the command ends"),
    ("sqlite:///", "'sqlite:///' is an in-memory database, lost when the command ends"),
    ("sqlite:///:memory:?cache=shared", "'sqlite:///:memory:?cache=shared' is an in-memory database"),
    ("sqlite:///~/psm-x.db", "'sqlite:///~/psm-x.db': SQLite does not expand '~' (it would look for a folder named '~')"),
], ids=["folder", "missing-folder", "unknown-scheme", "in-memory", "empty-name", "in-memory-query", "tilde"])
def test_a_bad_storage_url_names_the_option_and_what_it_takes(tmp_path: Path, storage: str, message: str) -> None:
    """A folder gave SQLAlchemy's "Could not parse SQLAlchemy URL", and a SQLite file in a missing folder
    named psmsearch's own lock file (x.db.init-lock); both now say what --storage takes, as --tracking-uri does.
    An empty database name and an in-memory URL with a query passed the check, and '~' (SQLite does not
    expand it) failed later with SQLite's own error."""
    from click.testing import CliRunner

    from psmsearch.cli import main

    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    storage, message = storage.format(tmp=tmp_path), message.format(tmp=tmp_path)
    result = CliRunner().invoke(main, ["search", str(space), "--storage", storage, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --storage: {message}") and len(result.output.strip().splitlines()) == 1
    assert "init-lock" not in result.output and not (tmp_path / "mlflow.db").exists()


def test_a_bad_storage_in_the_space_file_names_its_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from psmsearch.cli import main

    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none", "storage": str(tmp_path)})
    result = CliRunner().invoke(main, ["search", str(space), "--no-progress"])
    assert result.exit_code == 2, result.output
    line = next(i for i, text in enumerate(space.read_text().splitlines(), 1) if text.strip().startswith("storage:"))
    assert f"error: {space}:{line}: driver.storage: '{tmp_path}' is not a database URL" in result.output


def test_compare_refuses_an_objective_no_trial_reported_and_an_unwritable_out(finished_search) -> None:
    work, _ = finished_search
    result = run_cli("compare", "--experiment", "tiny", "--objective", "acc_8x:max", cwd=work)
    assert result.returncode == 2 and "--objective: no trial of search 'tiny' reported 'acc_8x'" in result.stderr
    assert "acc_2x" in result.stderr and "Traceback" not in result.stderr
    (work / "a_file").write_text("")
    result = run_cli("compare", "--experiment", "tiny", "--out", str(work / "a_file" / "plots"), cwd=work)
    assert result.returncode == 2 and "--out: cannot write plots to" in result.stderr, result.stderr


def test_a_study_name_that_cannot_name_runs_and_folders_is_refused(tmp_path: Path) -> None:
    space = write_space(tmp_path)
    result = run_cli("search", str(space), "--study", "bad name!", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and "Invalid value for '--study': 'bad name!'" in result.stderr
    space = write_space(tmp_path, driver={"trials": 1, "study": "bad name!"})
    result = run_cli("search", str(space), "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and "driver.study" in result.stderr and "Traceback" not in result.stderr


def test_tracking_masks_passwords_and_adopts_a_parent_run_from_before_storage_tags(tmp_path: Path) -> None:
    from psmsearch.tracking import STORAGE_ID_TAG, STORAGE_TAG, Tracker, _storage_tags

    assert _storage_tags("postgresql://me:secret@db:5432/optuna")[STORAGE_TAG] == "postgresql://me:***@db:5432/optuna"
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "legacy")
    old = tracker.parent_run("s", {}, {})                          # written without a storage tag
    resumed = tracker.parent_run("s", {}, {}, storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert resumed == old, "resuming a search from before storage tags continues its parent run"
    assert STORAGE_ID_TAG in tracker.client.get_run(old).data.tags
    other = tracker.parent_run("s", {}, {}, storage=f"sqlite:///{tmp_path / 'b.db'}")
    assert other != old, "another storage is another search"


def test_resume_with_other_directions_leaves_the_tracking_as_it_was(finished_search, tmp_path: Path) -> None:
    work, _ = finished_search
    flipped = write_space(tmp_path, objectives=[{"metric": "acc_2x", "direction": "minimize"}])
    result = run_cli("search", str(flipped), "--resume", "--storage", f"sqlite:///{work / 'psmsearch.db'}",
                     "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and "was created with directions ['maximize']" in result.stderr
    other_metric = write_space(tmp_path, name="other.yaml", objectives=[{"metric": "acc_1x", "direction": "maximize"}])
    result = run_cli("search", str(other_metric), "--resume", "--storage", f"sqlite:///{work / 'psmsearch.db'}",
                     "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2
    assert "study 'tiny' holds values of the objectives ['acc_2x'], but the space asks for ['acc_1x']" in result.stderr
    parents = [r for r in mlflow_runs(work / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "search"]
    assert [p.info.status for p in parents] == ["FINISHED"], "no search run was reopened and left RUNNING"


def test_a_pruned_trial_shows_its_last_evaluation_in_optuna_mlflow_the_summary_and_compare(tmp_path: Path) -> None:
    """The median pruner stops a trial whose first evaluation is below the earlier trials'; the
    search's summary, the Optuna trial, its MLflow run and compare all show that evaluation's value."""
    space = write_space(
        tmp_path,
        task={"name": "scripted_score", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16, "curriculum": False,
              "quality": {"choice": [0.2, 0.8]}},
        model={**TINY_SPACE["model"], "chunk_size": 2, "aggregator": {"name": "mlp", "mlp_ratio": 1}},
        objectives=[{"metric": "score", "direction": "maximize"}],
        driver={"trials": 4, "startup_trials": 1, "pruner": "median", "sampler": "random", "seed": 0},
    )
    plugin = str(FIXTURES / "scripted_score.py")
    result = run_cli("--plugin", plugin, "search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    trials = optuna_trials(tmp_path / "psmsearch.db")
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, f"seed 0 draws 0.8 then 0.2 (Optuna 5 RandomSampler): {[t.params for t in trials]}"
    runs = {r.info.run_id: r for r in mlflow_runs(tmp_path / "mlflow.db")}
    rows = {t["name"]: t for t in summary["trials"]}
    compared = run_cli("--plugin", plugin, "compare", "--experiment", "tiny", "--json", "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    compare_rows = {t["run_id"]: t for t in json.loads(compared.stdout)["trials"]}
    for trial in pruned:
        first_evaluation = trial.params["task.quality"] * 1
        assert trial.user_attrs["metrics"]["score"] == pytest.approx(first_evaluation)
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["psmsearch.status"] == "pruned"  # KILLED is interrupted
        assert run.data.metrics["score"] == pytest.approx(first_evaluation)
        assert rows[f"tiny-trial-{trial.number}"]["run_id"] == run.info.run_id
        assert rows[f"tiny-trial-{trial.number}"]["status"] == "pruned"
        assert rows[f"tiny-trial-{trial.number}"]["objectives"]["score"] == pytest.approx(first_evaluation)
        assert compare_rows[run.info.run_id]["objectives"]["score"] == pytest.approx(first_evaluation)


def test_the_median_pruner_waits_for_the_warmup_steps() -> None:
    """``driver.pruner_warmup_steps`` reaches Optuna's median pruner: a trial far below the median is not
    pruned at an evaluation before the warmup's step, and is at the first one from it (a real study)."""
    from psmsearch.optuna_driver import make_pruner
    from psmsearch.space import space_from_data
    from psmsearch.yamlio import SourceMap

    data = {**TINY_SPACE, "driver": {**TINY_SPACE["driver"], "pruner": "median", "startup_trials": 1,
                                      "pruner_warmup_steps": 4}}
    study = optuna.create_study(direction="maximize", pruner=make_pruner(space_from_data(data, SourceMap("s.yaml", {}),
                                                                                          smoke_samples=1)))
    good = study.ask()
    for step in (3, 6):
        good.report(1.0, step)
    study.tell(good, 1.0)
    weak = study.ask()
    weak.report(0.1, 3)
    assert not weak.should_prune()  # step 3 < 4: inside the warmup
    weak.report(0.1, 6)
    assert weak.should_prune()


@pytest.mark.slow  # about 10 s; test_the_median_pruner_waits_for_the_warmup_steps checks the pruner in the default run
def test_no_evaluation_before_the_pruner_warmup_prunes_a_trial(tmp_path: Path) -> None:
    """``driver.pruner_warmup_steps``: the step-3 evaluation (inside the warmup of 4) of the weaker trial
    may not prune it, the step-6 one does. Without it the median pruner stopped trials at their first
    evaluation, inside the learning-rate warmup, with no way to wait."""
    space = write_space(
        tmp_path,
        task={"name": "scripted_score", "train_length": 9, "eval_max_multiple": 2, "eval_samples": 16, "curriculum": False,
              "quality": {"choice": [0.2, 0.8]}},
        model={**TINY_SPACE["model"], "chunk_size": 2, "aggregator": {"name": "mlp", "mlp_ratio": 1}},
        objectives=[{"metric": "score", "direction": "maximize"}],
        driver={"trials": 4, "startup_trials": 1, "pruner": "median", "sampler": "random", "seed": 0,
                "pruner_warmup_steps": 4},
    )
    result = run_cli("--plugin", str(FIXTURES / "scripted_score.py"), "search", str(space), "--json", "--no-progress",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pruned = [t for t in optuna_trials(tmp_path / "psmsearch.db") if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["task.quality"] == 0.2 for t in pruned)
    assert all(t.user_attrs["metrics"]["score"] == pytest.approx(0.4) for t in pruned)  # its second evaluation
    assert all(t.user_attrs["reason"].startswith("pruned at step 6 ") for t in pruned), [t.user_attrs for t in pruned]


def test_a_trial_that_repeats_a_completed_ones_parameters_is_noted(tmp_path: Path) -> None:
    """TPE on a small space of choices drew trained configurations again (a walkthrough's 5 trials held 3
    distinct ones, each pair bit-identical): the search now says which, and how many distinct ones there are."""
    from psmsearch.search import TrialOutcome, repeated_trials_note
    from psmsearch.space import load_space

    space = write_space(tmp_path, model={**TINY_SPACE["model"], "chunk_size": {"choice": [2]},
                                         "aggregator": {"name": "mlp", "mlp_ratio": 1}},
                        driver={"trials": 2, "startup_trials": 1, "pruner": "none"})
    result = run_cli("search", str(space), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("note: 1 trial drew the parameters of an earlier completed trial again (trial 1 those of trial 0): a "
            "trial's training follows from its parameters, seed included, so a repeat adds no result; this space has "
            "1 distinct configuration, and driver.sampler: grid trains each once") in " ".join(result.stderr.split())

    outcome = lambda number, state, chunk: TrialOutcome(number, state, {}, {"model.chunk_size": chunk})  # noqa: E731
    loaded = load_space(space)
    assert repeated_trials_note([outcome(0, "failed", 2), outcome(1, "complete", 2), outcome(2, "pruned", 4)],
                                loaded) is None  # a failed trial's parameters may be drawn again
    note = repeated_trials_note([outcome(3, "complete", 2), outcome(0, "complete", 2), outcome(1, "pruned", 2)], loaded)
    assert note is not None and "(trial 1 those of trial 0, trial 3 those of trial 0)" in note


def test_a_trial_that_fails_before_its_run_exists_still_gets_a_failed_run(tmp_path: Path) -> None:
    """A Ray trial whose configuration could not be sampled on its worker left no MLflow run, while the
    search's last line sent the user to compare and MLflow, which showed an empty table."""
    from mlflow.tracking import MlflowClient

    from psmsearch.search import SearchOptions, execute_trial, open_tracking
    from psmsearch.space import load_space

    space = load_space(write_space(tmp_path), smoke_samples=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, parent = open_tracking(space, SearchOptions(trials=1, tracking_uri=uri), "ray", storage="here",
                                    fresh=lambda: True)

    def unsampleable() -> dict:
        raise KeyError("model.aggregator")

    seen: list[str] = []
    outcome = execute_trial(space, unsampleable, 3, {"model.chunk_size": 2}, tracker, parent, "ray", on_run=seen.append)
    assert outcome.state == "failed" and outcome.error.startswith("KeyError: 'model.aggregator'")
    assert seen == [outcome.run_id]  # the Optuna driver records a trial's run on the study through on_run
    run = MlflowClient(uri).get_run(outcome.run_id)
    assert run.info.status == "FAILED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["psmsearch.trial"] == "3" and run.data.tags["psmsearch.status"] == "failed"
    assert run.data.tags["psmsearch.error"] == outcome.error and run.data.params == {"search.model.chunk_size": "2"}


@pytest.mark.parametrize("by_user", [True, False])
def test_a_ray_trial_left_running_says_why_and_from_which_step(tmp_path: Path, by_user: bool) -> None:
    """Its run holds metrics up to its last evaluation: the closing tag names that step, and says the
    user stopped the search only where the user did (an error in the driver is not an interruption)."""
    from mlflow.tracking import MlflowClient

    from psmsearch.progress import SearchProgress
    from psmsearch.ray_bookkeeping import _Book
    from psmsearch.ray_trial import RUN_KEY, STEP_KEY
    from psmsearch.search import SearchOptions, open_tracking
    from psmsearch.space import load_space

    space = load_space(write_space(tmp_path), smoke_samples=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = SearchOptions(trials=2, tracking_uri=uri)
    tracker, parent = open_tracking(space, options, "ray", storage="here", fresh=lambda: True)
    assert tracker is not None and parent is not None
    evaluated = tracker.trial_run(parent, "tiny", 0, {}, {})
    silent = tracker.trial_run(parent, "tiny", 1, {}, {})
    book = _Book(space, options, tracker, parent, SearchProgress(space, 2, enabled=False, name="tiny"),
                 started={"a": 0, "b": 1}, last={"a": {RUN_KEY: evaluated, STEP_KEY: 6}, "b": {RUN_KEY: silent}})
    book.close_unfinished(by_user)
    client = MlflowClient(uri)
    errors = [client.get_run(run).data.tags["psmsearch.error"] for run in (evaluated, silent)]
    if by_user:
        assert errors == ["interrupted by the user after step 6; the values shown are that evaluation's",
                          "interrupted by the user before its first evaluation"]
    else:
        assert errors == ["search stopped after step 6; the values shown are that evaluation's", "search stopped"]
    assert {client.get_run(run).info.status for run in (evaluated, silent)} == {"KILLED"}


def test_ray_asha_waits_for_the_pruner_warmup_in_evaluations() -> None:
    """ASHA counts reports (one per evaluation), so the warmup in steps becomes the first evaluation at
    or after it; a searched eval_every counts at its shortest interval."""
    from psmsearch.ray_searchers import _grace_reports
    from psmsearch.space import space_from_data
    from psmsearch.yamlio import SourceMap

    def grace(warmup: int, eval_every: object) -> int:
        data = {**TINY_SPACE, "train": {**TINY_SPACE["train"], "eval_every": eval_every},
                "driver": {**TINY_SPACE["driver"], "pruner_warmup_steps": warmup}}
        return _grace_reports(space_from_data(data, SourceMap("space.yaml", {}), smoke_samples=1))

    assert [grace(0, 3), grace(3, 3), grace(4, 3), grace(7, 3)] == [1, 1, 2, 3]
    assert grace(4, {"choice": [3, 2]}) == 2 and grace(5, {"int": [2, 4]}) == 3


def test_a_pruner_warmup_past_training_is_warned_and_ray_still_starts() -> None:
    """Ray's ASHA asserts grace_period <= max_t: a warmup past the last evaluation crashed the Ray search."""
    from psmsearch.ray_searchers import _scheduler
    from psmsearch.space import space_from_data
    from psmsearch.yamlio import SourceMap

    data = {**TINY_SPACE, "driver": {**TINY_SPACE["driver"], "pruner": "median", "pruner_warmup_steps": 12}}
    space = space_from_data(data, SourceMap("space.yaml", {}), smoke_samples=1)
    assert space.warnings == ["space.yaml: driver.pruner_warmup_steps: 12 is not before train.steps 6, so no "
                              "evaluation can prune a trial: the median pruner is in effect off (pruner: none says so)"]
    scheduler = _scheduler(space)  # steps 6, eval_every 3: 3 reports; it raised AssertionError here
    assert scheduler._max_t == 3 and all(milestone >= 3 for milestone, _ in scheduler._brackets[0]._rungs)


def test_a_new_study_in_a_recreated_storage_gets_its_own_parent_run(tmp_path: Path) -> None:
    """Deleting the Optuna database and searching again is a new search: its trials must not join
    the old search's parent run (trial names would repeat and compare would mix the two)."""
    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    assert run_cli("search", str(space), "--no-progress", cwd=tmp_path).returncode == 0
    (tmp_path / "psmsearch.db").unlink()
    result = run_cli("search", str(space), "--no-progress", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    runs = mlflow_runs(tmp_path / "mlflow.db")
    parents = sorted((r for r in runs if r.data.tags.get("psmsearch.kind") == "search"), key=lambda r: r.info.start_time)
    assert len(parents) == 2 and parents[1].info.run_id == summary["parent_run"]
    assert parents[0].data.tags.get("psmsearch.superseded") == "true" and "psmsearch.superseded" not in parents[1].data.tags
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [r.data.tags["psmsearch.trial"] for r in children] == ["0"]
    compared = run_cli("compare", "--json", "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert [t["run_id"] for t in json.loads(compared.stdout)["trials"]] == [summary["trials"][0]["run_id"]]


@pytest.mark.parametrize("special", ["inf", "nan"])
def test_a_non_finite_objective_fails_the_trial_and_keeps_its_other_metrics(tmp_path: Path, special: str) -> None:
    space = write_space(
        tmp_path,
        task={"name": "scripted_score", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16, "curriculum": False,
              "special": special},
        model={**TINY_SPACE["model"], "chunk_size": 2, "aggregator": {"name": "mlp", "mlp_ratio": 1}},
        objectives=[{"metric": "score", "direction": "maximize"}],
        driver={"trials": 1, "startup_trials": 1, "pruner": "none"},
    )
    result = run_cli("--plugin", str(FIXTURES / "scripted_score.py"), "search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # its only trial failed: no trial completed
    [row] = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
    assert row["status"] == "failed" and f"objective 'score' is {special}; objectives must be finite numbers" in row["error"]
    [run] = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]
    assert run.info.status == "FAILED" and run.data.tags["psmsearch.status"] == "failed"
    assert {"acc_1x", "acc_2x", "state_bytes_64", "params"} <= set(run.data.metrics), "the measured metrics are kept"
    assert row["metrics"]["acc_1x"] == pytest.approx(run.data.metrics["acc_1x"])


def test_compare_shows_a_search_whose_trials_failed_on_their_objective(finished_search) -> None:
    """A trial whose objective was NaN is FAILED without that metric (MLflow stores no NaN). When no
    trial had it, compare refused the search with "--objective: no trial ... reported 'score'", an
    option nobody passed. The search's own objectives are not checked so: its failures are listed."""
    from click.testing import CliRunner

    from psmsearch.cli import main
    from psmsearch.tracking import Tracker

    work, _ = finished_search
    uri = f"sqlite:///{work / 'mlflow.db'}"  # an existing store: a new one takes seconds to create
    tracker = Tracker(uri, "all-failed")  # what a search writes: a parent run and a failed trial run under it
    parent = tracker.parent_run("all-failed", {}, {"objectives": [{"metric": "score", "direction": "maximize"}]})
    run = tracker.trial_run(parent, "all-failed", 0, {"search.model.chunk_size": 2}, {})
    tracker.log_metrics(run, {"train_loss": 0.5, "score": float("nan")})  # no length metric: no plot to draw
    tracker.set_tags(run, {"psmsearch.status": "failed", "psmsearch.error": "objective 'score' is nan"})
    tracker.finish(run, "FAILED")
    args = ["compare", "--tracking-uri", uri, "--experiment", "all-failed"]
    result = CliRunner().invoke(main, [*args, "--json", "--out", str(work / "plots-all-failed")])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output.strip().splitlines()[-1])["trials"]
    assert (row["status"], row["error"], row["objectives"]) == ("failed", "objective 'score' is nan", {"score": None})
    typo = CliRunner().invoke(main, [*args, "--objective", "scor:max"])
    assert typo.exit_code == 2 and "--objective: no trial of search 'all-failed' reported 'scor'" in typo.output, typo.output


def test_a_trial_run_its_trial_never_recorded_is_closed_on_resume(finished_search, tmp_path: Path) -> None:
    """A Ctrl-C or SIGKILL inside Tracker.trial_run, after MLflow created the run but before its id was
    stored on the Optuna trial, left a RUNNING run that --resume never closed. Resume now closes such
    runs as KILLED, but never the run of a trial still RUNNING (another process may share the study)."""
    from psmsearch.optuna_driver import run_optuna_search
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space
    from psmsearch.tracking import Tracker

    work, _ = finished_search
    uri = f"sqlite:///{work / 'mlflow.db'}"  # an existing store: a new one takes seconds to create
    storage = f"sqlite:///{tmp_path / 'psmsearch.db'}"
    space = load_space(write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"}), smoke_samples=1)
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    tracker = Tracker(uri, "orphan-runs")
    parent = tracker.parent_run("tiny", {"psmsearch.driver": "optuna"}, {}, storage=storage)
    interrupted = study.ask()  # the run exists; the interrupt came before on_run stored its id
    orphan = tracker.trial_run(parent, "tiny", interrupted.number, {"search.model.chunk_size": 2}, {})
    interrupted.set_user_attr("state", "interrupted")
    study.tell(interrupted, state=TrialState.FAIL)
    study.tell(study.ask(), 0.5)  # the budget of one trial is met: the resume trains nothing

    options = SearchOptions(trials=1, storage=storage, resume=True, tracking_uri=uri, experiment="orphan-runs", progress=False)
    run_optuna_search(space, options)
    closed = tracker.client.get_run(orphan)
    assert closed.info.status == "KILLED" and closed.data.tags["psmsearch.status"] == "interrupted"

    from psmsearch.optuna_driver import close_orphan_runs

    live = study.ask()  # another process's trial, between creating its run and recording it
    live_run = tracker.trial_run(parent, "tiny", live.number, {}, {})
    assert close_orphan_runs(study, tracker, parent) == 0
    assert tracker.client.get_run(live_run).info.status == "RUNNING"


def test_parallel_jobs_run_exactly_the_trials_asked_for(tmp_path: Path) -> None:
    """With --jobs 2 the last free slot used to start two trials at once: 3 asked, 4 run."""
    space = write_space(tmp_path, driver={"trials": 3, "startup_trials": 1, "pruner": "none"})
    result = run_cli("search", str(space), "--jobs", "2", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [t.state for t in optuna_trials(tmp_path / "psmsearch.db")] == [TrialState.COMPLETE] * 3
    assert len([r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]) == 3


def test_a_deleted_experiment_and_a_storage_password_are_reported_cleanly(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("gone"))
    space = write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    result = run_cli("search", str(space), "--experiment", "gone", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--experiment: the MLflow experiment 'gone'" in result.stderr and "is deleted; restore it" in result.stderr
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'psmsearch.db'}") == [], "no empty study needing --resume"

    result = run_cli("search", str(space), "--storage", "postgresql://user:hunter2@127.0.0.1:9/db", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot open the Optuna storage 'postgresql://user:***@127.0.0.1:9/db'" in result.stderr
    assert "hunter2" not in result.stderr


def test_a_study_created_after_the_exists_check_is_refused_not_joined(tmp_path: Path) -> None:
    """Two searches started at the same moment without --resume both saw no study, and both ran in it.

    The study another process creates between this one's check and its creation is the race's state:
    without --resume that is the "already exists" error, with --resume this process joins it.
    """
    from psmsearch.optuna_driver import _create_study_first
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    space = load_space(write_space(tmp_path, driver={"trials": 1, "startup_trials": 1, "pruner": "none"}))
    url = f"sqlite:///{tmp_path / 'race.db'}"
    storage = optuna.storages.RDBStorage(url)
    assert _create_study_first(space, SearchOptions(trials=1), storage, url, "s") is True
    with pytest.raises(ConfigError, match=r"^study 's' already exists in sqlite:///.*pass --resume to continue"):
        _create_study_first(space, SearchOptions(trials=1), storage, url, "s")
    assert _create_study_first(space, SearchOptions(trials=1, resume=True), storage, url, "s") is False
    assert optuna.get_all_study_names(storage) == ["s"]


GRID_DRIVER = {"trials": 1, "startup_trials": 1, "pruner": "none", "sampler": "grid"}
LOG_LR_TRAIN = {**TINY_SPACE["train"], "lr": {"float": [1.0e-3, 1.0e-2], "log": True}}


def test_a_space_the_grid_sampler_refuses_leaves_no_study_or_run_and_the_fixed_space_starts_afresh(
        finished_search, tmp_path: Path) -> None:
    """The grid was built after the study and the search's MLflow run were created: a float range under
    ``sampler: grid`` was refused (exit 2) but left an empty study and a RUNNING parent run, and the fixed
    space then failed with "study 'tiny' already exists ... pass --resume". It is refused before both now."""
    from click.testing import CliRunner

    from psmsearch.cli import main

    work, _ = finished_search
    storage = f"sqlite:///{tmp_path / 'psmsearch.db'}"
    optuna.create_study(study_name="another", storage=storage)  # a storage in use, which must gain no study
    # an existing MLflow store: a new one takes seconds to create
    common = ["--no-progress", "--storage", storage, "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
              "--experiment", "grid-refused"]
    bad = write_space(tmp_path, "bad.yaml", train=LOG_LR_TRAIN, driver=GRID_DRIVER)
    line = bad.read_text().splitlines().index("  lr:") + 1
    result = CliRunner().invoke(main, ["search", str(bad), *common])
    assert result.exit_code == 2, result.output
    assert f"error: {bad}:{line}: train.lr: sampler 'grid' needs choice dimensions only; this is a float range" \
        in result.output
    assert optuna.get_all_study_names(storage) == ["another"], "the refused search left a study behind"
    assert mlflow_runs(work / "mlflow.db", "grid-refused") == [], "the refused search left an MLflow run behind"

    fixed = write_space(tmp_path, "fixed.yaml", driver=GRID_DRIVER)
    result = CliRunner().invoke(main, ["search", str(fixed), *common])
    assert result.exit_code == 0, result.output
    assert [t.state for t in optuna_trials(tmp_path / "psmsearch.db")] == [TrialState.COMPLETE]
    runs = mlflow_runs(work / "mlflow.db", "grid-refused")
    assert sorted((r.data.tags["psmsearch.kind"], r.info.status) for r in runs) == [("search", "FINISHED"),
                                                                                     ("trial", "FINISHED")]


def test_the_optuna_driver_checks_the_sampler_before_it_creates_anything(tmp_path: Path) -> None:
    """``load_space`` refuses a grid the space cannot have; a space it never checked (built in code) is
    refused by the driver too, before its storage, study and MLflow store exist."""
    from psmsearch.optuna_driver import run_optuna_search
    from psmsearch.search import SearchOptions
    from psmsearch.space import load_space

    space = load_space(write_space(tmp_path, train=LOG_LR_TRAIN, driver={"trials": 1, "pruner": "none"}), smoke_samples=1)
    space.header.driver.sampler = "grid"  # after load_space's checks, as in a space built in code
    options = SearchOptions(trials=1, storage=f"sqlite:///{tmp_path / 'psmsearch.db'}",
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    with pytest.raises(ConfigError, match=r"space\.yaml:\d+: train\.lr: sampler 'grid' needs choice dimensions only"):
        run_optuna_search(space, options)
    assert not (tmp_path / "psmsearch.db").exists() and not (tmp_path / "mlflow.db").exists()


PLAIN_LIST_MODEL = {
    **TINY_SPACE["model"],
    "chunk_size": {"choice": [1, 2]},
    "encoder": ["embed"],  # declares no hyperparameters: search: all opens nothing
    "aggregator": [{"name": "mlp", "mlp_ratio": 1}, {"name": "attention", "layers": 1, "heads": 2, "mlp_ratio": 1}],
    "head": [{"name": "attention", "layers": 1, "heads": 2, "mlp_ratio": 1}],
}


def test_a_grid_search_over_plain_lists_of_fixed_components_runs_each_listed_combination_once(tmp_path: Path) -> None:
    """``aggregator: [...]`` is the short form of a choice with ``search: all``; grid refused it at its entry
    even where every entry fixes what its component declares. Such a list is now a grid dimension over
    the listed components: 6 trials asked for, the 4 points of chunk size x aggregator run, each once,
    with the hyperparameters their entries fix. An entry that leaves one open is still refused, at its line,
    before a study or a run exists."""
    open_model = {**PLAIN_LIST_MODEL, "aggregator": [PLAIN_LIST_MODEL["aggregator"][0], {"name": "attention", "layers": 1}]}
    bad = write_space(tmp_path, "bad.yaml", model=open_model, driver={**GRID_DRIVER, "trials": 6})
    line = bad.read_text().splitlines().index("  - name: attention") + 1
    result = run_cli("search", str(bad), "--no-progress", cwd=tmp_path)
    assert result.returncode == 2
    assert (f"error: {bad}:{line}: model.aggregator.1: sampler 'grid' needs fixed component hyperparameters, but a plain "
            "list of components searches every hyperparameter an entry does not fix: aggregator 'attention' leaves heads "
            "and mlp_ratio open") in result.stderr
    assert "write {name: attention, layers: 1, heads: 4, mlp_ratio: 2} to keep it in the grid" in result.stderr
    assert not (tmp_path / "psmsearch.db").exists() and not (tmp_path / "mlflow.db").exists()

    space = write_space(tmp_path, model=PLAIN_LIST_MODEL, driver={**GRID_DRIVER, "trials": 6})
    result = run_cli("search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = optuna_trials(tmp_path / "psmsearch.db")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted((t.params["model.chunk_size"], t.params["model.aggregator"]) for t in trials) == [
        (1, "attention"), (1, "mlp"), (2, "attention"), (2, "mlp")]
    assert all(set(t.params) == {"model.chunk_size", "model.aggregator"} for t in trials)
    children = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]
    assert len(children) == 4
    for run in children:
        params = run.data.params
        fixed = {"mlp": {"model.aggregator.mlp_ratio": "1"},
                 "attention": {"model.aggregator.layers": "1", "model.aggregator.heads": "2",
                               "model.aggregator.mlp_ratio": "1"}}[params["model.aggregator"]]
        assert {k: params.get(k) for k in fixed} == fixed
        assert params["model.encoder"] == "embed" and params["model.head.heads"] == "2"


def test_compare_finds_a_named_search_in_any_experiment_and_never_creates_a_store(tmp_path: Path) -> None:
    """Also: ``--search A --search B`` kept only B. Now both searches' trials are ranked together (one
    Pareto front), each row naming its search (a table column, a JSON field), each search found in its own
    experiment; the plots go to each search's parent run in a folder naming both. A search named twice,
    or searches with other objectives (without --objective), are refused."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from psmsearch.cli import main
    from psmsearch.tracking import Tracker

    result = run_cli("compare", cwd=tmp_path)
    assert result.returncode == 2 and "no MLflow database at" in result.stderr
    assert not (tmp_path / "mlflow.db").exists(), "compare only reads"
    driver = {"trials": 1, "startup_trials": 1, "pruner": "none"}
    first = write_space(tmp_path, name="a.yaml", driver={**driver, "study": "sa"}, tracking={"experiment": "e1"})
    second = write_space(tmp_path, name="b.yaml", driver={**driver, "study": "sb"}, tracking={"experiment": "e2"},
                         train={**TINY_SPACE["train"], "steps": 3})  # trained shorter: a setting held differently
    for space in (first, second):
        assert run_cli("search", str(space), "--no-progress", cwd=tmp_path).returncode == 0
    result = run_cli("compare", "--search", "sa", "--json", "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["experiment"] == "e1" and report["search"] == "sa" and len(report["trials"]) == 1
    assert [s["search"] for s in report["searches"]] == ["sa"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def compare(*args: str) -> Any:  # in this process: a second each, where a new process takes several
        return CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--out", str(tmp_path / "plots"), *args])

    result = compare("--search", "sa", "--search", "sb", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["experiment"] is None and report["search"] is None  # neither is one value here
    assert [(s["search"], s["experiment"]) for s in report["searches"]] == [("sa", "e1"), ("sb", "e2")]
    assert sorted((t["search"], t["name"]) for t in report["trials"]) == [("sa", "sa-trial-0"), ("sb", "sb-trial-0")]
    values = [t["objectives"]["acc_2x"] for t in report["trials"]]
    assert values == sorted(values, reverse=True) and report["trials"][0]["pareto"]
    assert report["fixed_differences"] == {"train.steps": {"sa": "6", "sb": "3"}}
    client = MlflowClient(tracking_uri=uri)
    for entry in report["searches"]:
        logged = {a.path for a in client.list_artifacts(entry["parent_run"], "compare_sa+sb")}
        assert "compare_sa+sb/objectives.png" in logged, logged

    table = compare("--search", "sa", "--search", "sb")
    assert table.exit_code == 0, table.output
    assert "search sa (experiment e1), search sb (experiment e2): ranked together" in table.stdout
    assert sorted(row[:2] for row in table_rows(table.stdout)) == [["sa", "sa-trial-0"], ["sb", "sb-trial-0"]]
    assert ("note: the searches held settings they do not search at different values, so their trials differ in "
            "more than their parameters: train.steps: sa 6, sb 3") in table.stderr

    missing = compare("--search", "nosuch")  # the option at fault is --search (it said --experiment)
    assert missing.exit_code == 2
    assert f"error: --search: no search 'nosuch' has been tracked at {uri}" in missing.stderr

    twice = compare("--search", "sa", "--search", "sb", "--search", "sa")
    assert twice.exit_code == 2
    assert "error: --search: search 'sa' is named twice; name each search once" in twice.stderr

    tracker = Tracker(uri, "e3")  # a search ranked on another metric
    tracker.parent_run("sc", {}, {"objectives": [{"metric": "params", "direction": "minimize"}]})
    mixed = compare("--search", "sa", "--search", "sc")
    assert mixed.exit_code == 2
    assert ("error: --objective: the searches were run with other objectives (sa: acc_2x:max; sc: params:min); pass "
            "--objective METRIC:max|min (repeatable) to rank them together on the same ones") in mixed.stderr
    overridden = compare("--search", "sa", "--search", "sc", "--objective", "acc_2x:max", "--json")
    assert overridden.exit_code == 0, overridden.output
    assert [t["search"] for t in json.loads(overridden.stdout)["trials"]] == ["sa"]  # sc has no trial


def test_tables_show_float_parameters_to_4_significant_digits(capsys: pytest.CaptureFixture[str]) -> None:
    """Float parameters were printed at full precision (init_gate=0.11557967901161792); they are now
    shown as metrics are, while integers and names stay as given (the JSON keeps every digit)."""
    from psmsearch.cli_search import print_rows
    from psmsearch.report import TrialRow
    from psmsearch.space import Objective

    params = {"search.model.encoder.gla.init_gate": "0.11557967901161792", "search.train.lr": "1.2345678e-05",
              "search.model.chunk_size": "16", "search.model.aggregator": "attention", "search.train.big": "123456.789"}
    row = TrialRow("tiny-trial-0", "tiny", "complete", params, {"acc_2x": 0.5})
    print_rows([row], [Objective(metric="acc_2x")], title="t")
    [[*_, shown]] = table_rows(capsys.readouterr().out)
    assert shown == ("model.aggregator=attention, model.chunk_size=16, model.encoder.gla.init_gate=0.1156, "
                     "train.big=123500, train.lr=1.235e-05")


def test_a_new_tracking_store_is_opened_without_mlflows_info_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`make demo` printed MLflow's 'INFO mlflow.store.db.utils: Creating initial MLflow database tables...'
    and 'Updating database tables' when it created mlflow.db. They are silenced below WARNING while a
    store is opened (MLflow's logger level is restored after), and their warnings still show."""
    import logging

    from psmsearch.tracking import SCHEMA_LOGGERS, Tracker, quiet_schema_setup

    level = logging.getLogger(SCHEMA_LOGGERS[0]).level
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "quiet")
    assert (tmp_path / "mlflow.db").exists()
    assert "database tables" not in capfd.readouterr().err
    assert logging.getLogger(SCHEMA_LOGGERS[0]).level == level
    with quiet_schema_setup():
        logging.getLogger(SCHEMA_LOGGERS[0]).warning("a real warning from the store")
    assert "a real warning from the store" in capfd.readouterr().err


def test_compare_plots_label_their_points_and_tell_coinciding_curves_apart() -> None:
    """objectives.png had no trial labels, and in memory_vs_n.png trials with identical memory drew
    exactly on top of each other, showing one line for several legend entries."""
    from matplotlib import pyplot as plt

    from psmsearch.report import MEMORY_METRIC, TrialRow, rank
    from psmsearch.report_plots import curves_figure, objectives_figure
    from psmsearch.space import Objective

    objectives = [Objective(metric="acc_2x"), Objective(metric="state_bytes_64", direction="minimize")]
    points = [(0.5, 128.0), (0.4, 256.0), (0.5, 128.0)]  # trials 0 and 2 coincide
    rows = rank([TrialRow(f"tiny-trial-{i}", "tiny", "complete", {}, {"acc_2x": acc, "state_bytes_64": memory,
                                                                      "state_bytes_128": 2 * memory})
                 for i, (acc, memory) in enumerate(points)], objectives)
    scatter = objectives_figure(rows, objectives)
    assert sorted(text.get_text() for text in scatter.axes[0].texts) == ["trial 1", "trials 0, 2"]
    curves = curves_figure(rows, MEMORY_METRIC, "tokens streamed n", "bytes", bytes_y=True).axes[0]
    assert [text.get_text() for text in curves.get_legend().get_texts()] == ["trials 0, 2", "trial 1"]
    assert len({(line.get_marker(), line.get_linestyle()) for line in curves.get_lines()}) == 2
    plt.close("all")


def test_ranking_breaks_ties_by_trial_number_whatever_the_input_order() -> None:
    from psmsearch.report import TrialRow, rank
    from psmsearch.space import Objective

    def row(name: str, acc: float, status: str = "complete") -> TrialRow:
        return TrialRow(name, "s", status, {}, {"acc": acc})

    objectives = [Objective(metric="acc", direction="maximize")]
    rows = [row("s-trial-10", 0.5), row("s-trial-2", 0.9, "failed"), row("s-trial-1", 0.5), row("s-trial-3", 0.7),
            row("s-trial-0", 0.2, "pruned")]
    for order in (rows, rows[::-1]):
        ranked = rank([TrialRow(**vars(r)) for r in order], objectives)
        assert [r.name for r in ranked] == ["s-trial-3", "s-trial-1", "s-trial-10", "s-trial-0", "s-trial-2"]


def test_piped_progress_is_one_line_per_started_and_per_ended_trial(tmp_path: Path) -> None:
    """Each line names the search, the study (``--study``): they named the space, which the table does not."""
    space = write_space(tmp_path)
    result = run_cli("search", str(space), "--resume", "--study", "tinier", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    [note] = [line for line in lines if line.startswith("--resume: no study 'tinier'")]
    assert len(note) > 80 and note.endswith("yet; starting it"), "a piped message is one line, not cut at 80 columns"
    logged = [line for line in lines if line.startswith("[tinier] ")]
    for number in range(3):
        assert logged.count(f"[tinier] trial {number} started") == 1, result.stderr
        assert sum(line.startswith(f"[tinier] trial {number} complete: acc_2x=") for line in logged) == 1, result.stderr
    assert len(logged) == 6, result.stderr
    assert "  [3/3  done 3  pruned 0  failed 0  running 0  best acc_2x=" in logged[-1], "counted once the study has it"


def test_progress_lines_count_the_pareto_front_in_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A multi-objective search's standing read "best 1 on the Pareto front"; it now counts trials."""
    from psmsearch.progress import SearchProgress
    from psmsearch.search import TrialOutcome
    from psmsearch.space import load_space

    objectives = [{"metric": "acc_2x", "direction": "maximize"}, {"metric": "state_bytes_64", "direction": "minimize"}]
    space = load_space(write_space(tmp_path, objectives=objectives), smoke_samples=1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    with SearchProgress(space, 3) as progress:  # not a terminal: one line per started and per ended trial
        progress.refresh(study)
        for values in ([0.5, 128.0], [0.4, 256.0], [0.6, 512.0]):  # the second is dominated by the first
            trial = study.ask()
            progress.started(trial.number)
            progress.finished(TrialOutcome(trial.number, "complete", dict(zip(["acc_2x", "state_bytes_64"], values)), {}))
            study.tell(trial, values)
            progress.refresh(study)
    ends = [line for line in capsys.readouterr().err.splitlines() if " complete: " in line]
    assert [line.rpartition("running 0  ")[2] for line in ends] == [
        "1 trial on the Pareto front]", "1 trial on the Pareto front]", "2 trials on the Pareto front]"]


@pytest.mark.parametrize("progress", [[], ["--no-progress"]], ids=["piped-progress", "no-progress"])
def test_a_failed_trials_error_is_printed_once(tmp_path: Path, progress: list[str]) -> None:
    task = {"name": "fail_task", "group": "Z5", "train_length": 8, "eval_max_multiple": 2, "eval_samples": 16}
    space = write_space(tmp_path, task=task, driver={"trials": 2, "pruner": "none"})
    result = run_cli("--plugin", str(FIXTURES / "failing_components.py"), "search", str(space), *progress, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # no trial completed
    output = result.stdout + result.stderr
    assert output.count("ValueError: the task's data source is broken") == 2, output
    for number in (0, 1):
        assert f"trial {number} failed: training and evaluation: ValueError" in result.stderr


def test_sqlite_urls_with_a_query_string_are_accepted(tmp_path: Path) -> None:
    """The query string was read as part of the path: 'x.db?a=/b/c' had a missing folder 'x.db?a=/b'."""
    from psmsearch.optuna_driver import check_storage_url

    for url in (f"sqlite:///{tmp_path}/x.db?timeout=30", f"sqlite:///{tmp_path}/x.db?a=/b/c"):
        check_storage_url(url, "--storage")


@pytest.mark.slow
def test_a_search_whose_encoders_span_state_kinds_logs_its_component_choices(tmp_path: Path) -> None:
    """With encoders of two state kinds, the aggregator and head of each kind are separate Optuna
    parameters. They were named ``model.aggregator[tokens]``, which MLflow refuses as a parameter
    name, so every trial with such a choice failed while logging its parameters."""
    space = write_space(tmp_path, model=MIXED_MODEL, driver={"trials": 4, "startup_trials": 1, "pruner": "none",
                                                              "sampler": "random", "seed": 1})
    result = run_cli("search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [t["status"] for t in summary["trials"]] == ["complete"] * 4, summary["trials"]
    runs = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "trial"]
    chosen = [r.data.params for r in runs if "search.model.aggregator-tokens" in r.data.params]
    assert chosen, "no trial drew a token-state encoder: pick another seed"
    for params in chosen:
        assert params["search.model.aggregator-tokens"] == params["model.aggregator"] in {"mlp", "attention"}
        assert params["model.head"] == "attention" and "search.model.head-tokens" not in params  # its only option
    assert {t.params.get("model.encoder") for t in optuna_trials(tmp_path / "psmsearch.db")} == {"embed", "gla"}


def test_a_trial_whose_parameters_mlflow_refuses_fails_naming_the_phase(finished_search, tmp_path: Path) -> None:
    """A refused parameter failed the trial with MLflow's bare message and left its run RUNNING with no
    parameters; now the error names the phase and the run is closed FAILED, as other failures are."""
    from psmsearch.search import execute_trial
    from psmsearch.space import load_space
    from psmsearch.tracking import Tracker

    work, _ = finished_search
    space = load_space(write_space(tmp_path), smoke_samples=1)
    tracker = Tracker(f"sqlite:///{work / 'mlflow.db'}", "refused-params")  # an existing store: fast
    parent = tracker.parent_run("tiny", {}, {})
    sampled = space.sample(optuna.trial.FixedTrial({"model.chunk_size": 2, "model.aggregator": "mlp"}))
    outcome = execute_trial(space, sampled, 0, {"model.odd[name]": 1}, tracker, parent, "optuna")
    assert outcome.state == "failed"
    assert outcome.error.startswith("logging its parameters to MLflow: MlflowException: "), outcome.error
    run = tracker.client.get_run(outcome.run_id)
    assert run.info.status == "FAILED" and run.data.tags["psmsearch.error"] == outcome.error


def test_compare_shows_one_row_per_trial_the_latest_run_of_its_name(finished_search) -> None:
    """Ray reruns an interrupted trial under its number after --resume: the trial then has a KILLED
    run and the rerun's, both named ``<search>-trial-N``. compare listed both (10 rows for 8 trials)."""
    import time

    from click.testing import CliRunner

    from psmsearch.cli import main
    from psmsearch.tracking import Tracker

    work, _ = finished_search
    uri = f"sqlite:///{work / 'mlflow.db'}"  # an existing store: a new one takes seconds to create
    tracker = Tracker(uri, "rerun")
    parent = tracker.parent_run("rerun", {}, {"objectives": [{"metric": "score", "direction": "maximize"}]})
    interrupted = tracker.trial_run(parent, "rerun", 4, {"search.model.chunk_size": 2}, {})
    tracker.set_tags(interrupted, {"psmsearch.status": "interrupted"})
    tracker.finish(interrupted, "KILLED")
    time.sleep(0.01)  # runs are ordered by their start time, in milliseconds
    rerun = tracker.trial_run(parent, "rerun", 4, {"search.model.chunk_size": 2}, {})
    tracker.log_metrics(rerun, {"score": 0.5})
    tracker.set_tags(rerun, {"psmsearch.status": "complete"})
    tracker.finish(rerun, "FINISHED")
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", uri, "--experiment", "rerun", "--json",
                                       "--out", str(work / "plots-rerun")])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output.strip().splitlines()[-1])["trials"]
    assert (row["name"], row["status"], row["run_id"]) == ("rerun-trial-4", "complete", rerun)


def test_a_trial_ended_before_the_study_counts_it_is_still_shown_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --jobs 2 both trials may end before the study counts the first: its end line read
    ``[1/6  done 1 ... running 0]`` while the other trial, neither counted nor running, was left out."""
    from psmsearch.progress import SearchProgress
    from psmsearch.search import TrialOutcome
    from psmsearch.space import load_space

    space = load_space(write_space(tmp_path), smoke_samples=1)
    study = optuna.create_study(direction="maximize")
    with SearchProgress(space, 6) as progress:  # not a terminal: one line per started and per ended trial
        progress.refresh(study)
        first, second = study.ask(), study.ask()
        for trial in (first, second):
            progress.started(trial.number)
        for trial, value in ((first, 0.5), (second, 0.6)):  # both threads end their trials ...
            progress.finished(TrialOutcome(trial.number, "complete", {"acc_2x": value}, {}))
        study.tell(first, 0.5)  # ... and the study's callback for the first runs before the second is told
        progress.refresh(study)
        study.tell(second, 0.6)
        progress.refresh(study)
    ends = [line for line in capsys.readouterr().err.splitlines() if " complete: " in line]
    assert [line.partition("  [")[2] for line in ends] == [
        "1/6  done 1  pruned 0  failed 0  running 1  best acc_2x=0.5 (trial 0)]",
        "2/6  done 2  pruned 0  failed 0  running 0  best acc_2x=0.6 (trial 1)]",
    ]


PLUGIN_FILE = FIXTURES / "plugin_aggregators.py"
"""A user's plugin file: ``my_mlp`` works, ``always_fails`` fails every trial (its ``forward`` raises)."""


def test_a_search_in_which_no_trial_completed_exits_1_and_still_prints_and_records_everything(tmp_path: Path) -> None:
    """A plugin aggregator that raises fails every trial. The search exited 0, so a script
    could not tell it from one that found something; it now exits 1 after its JSON (stdout holds it
    alone), with one stderr line saying how many trials failed and where to read why."""
    model = {**TINY_SPACE["model"], "aggregator": "always_fails"}
    space = write_space(tmp_path, model=model, driver={"trials": 2, "startup_trials": 1, "pruner": "none"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("--plugin", str(PLUGIN_FILE), "search", str(space), "--tracking-uri", uri, "--json",
                     "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert [t["status"] for t in summary["trials"]] == ["failed", "failed"]
    assert all("RuntimeError: my plugin's bug" in t["error"] for t in summary["trials"])
    assert result.stderr.count("RuntimeError: my plugin's bug") == 2  # each failure's line, once
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no trial of search 'tiny' completed (2 failed, of 2): this command's failures are above")
    assert f"`psmsearch compare --search tiny --tracking-uri {uri}` lists every trial with its error" in last
    assert [t.state for t in optuna_trials(tmp_path / "psmsearch.db")] == [TrialState.FAIL] * 2
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert sorted(r.info.status for r in runs if r.data.tags.get("psmsearch.kind") == "trial") == ["FAILED"] * 2
    [parent] = [r for r in runs if r.data.tags.get("psmsearch.kind") == "search"]
    assert parent.info.status == "FINISHED"  # the search itself ran to its end
    compared = run_cli("compare", "--search", "tiny", "--tracking-uri", uri, "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    for number in (0, 1):  # compare lists each trial's error under its table, as the message says
        assert f"tiny-trial-{number} failed: training and evaluation: RuntimeError: my plugin's bug (at " in compared.stdout


def test_a_search_in_which_some_trials_completed_exits_0(tmp_path: Path) -> None:
    """One trial of the grid fails, the other completes: the search has a result, so it exits 0."""
    model = {**TINY_SPACE["model"], "chunk_size": 2,
             "aggregator": {"choice": ["always_fails", {"name": "my_mlp", "mlp_ratio": 1}]}}
    space = write_space(tmp_path, model=model, driver={"trials": 2, "sampler": "grid", "pruner": "none"})
    result = run_cli("--plugin", str(PLUGIN_FILE), "search", str(space), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(row[1] for row in table_rows(result.stdout)) == ["complete", "failed"]
    assert re.search(r"^trial [01] failed: training and evaluation: RuntimeError: my plugin's bug \(at ",
                     result.stderr, re.MULTILINE), result.stderr
    assert "error:" not in result.stderr


def test_a_plugin_components_trial_records_its_plugin_as_given_and_train_says_which_to_pass(tmp_path: Path) -> None:
    """The plugin tag holds the plugin file's path, and trial_config.yaml records it (a comment header and
    the plugins field): without it, ``psmsearch train trial_config.yaml`` failed with a bare "unknown
    aggregator 'my_mlp'"; it now names the recorded plugin and the --plugin to pass. A component that a
    --set renamed has no record (no hint); one registered here from another file is a warning."""
    from mlflow.tracking import MlflowClient

    from psmsearch.registry import load_registry
    from psmsearch.trial import load_trial_config

    model = {**TINY_SPACE["model"], "chunk_size": 2, "aggregator": {"name": "my_mlp", "mlp_ratio": 1}}
    space = write_space(tmp_path, model=model, driver={"trials": 1, "startup_trials": 1, "pruner": "none"})
    result = run_cli("--plugin", str(PLUGIN_FILE), "search", str(space), "--json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [trial] = json.loads(result.stdout)["trials"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = client.get_run(trial["run_id"]).data.tags
    plugin = str(PLUGIN_FILE.resolve())
    assert tags["psmsearch.plugin.aggregator"] == plugin
    assert tags["psmsearch.plugin.head"] == "psmsearch.plugins.token_state"
    config = Path(client.download_artifacts(trial["run_id"], "trial_config.yaml", str(tmp_path)))
    text = config.read_text()
    assert text.startswith("# Trial 0 of search 'tiny', as it ran.\n")
    assert f"#   model.aggregator 'my_mlp': --plugin {plugin}\n" in text
    assert f"# Run it again with: psmsearch --plugin {plugin} train trial_config.yaml\n" in text
    digest = hashlib.sha256(PLUGIN_FILE.read_bytes()).hexdigest()
    recorded = {"model.aggregator": {"name": "my_mlp", "plugin": plugin, "sha256": digest}}
    assert yaml.safe_load(text)["plugins"] == recorded  # built-in components are not listed

    bare = run_cli("train", str(config), "--no-progress", cwd=tmp_path)
    assert bare.returncode == 2, bare.stderr
    assert (f"model.aggregator: unknown aggregator 'my_mlp'. This config's plugins field records that aggregator "
            f"'my_mlp' came from the plugin '{plugin}': run psmsearch --plugin {plugin} train {config}") in bare.stderr
    assert "Did you mean" not in bare.stderr  # a close registered name is not what the trial ran
    rerun = run_cli("--plugin", plugin, "train", str(config), "--json", "--no-progress", "--no-eval-log", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr == "" and "acc_2x" in json.loads(rerun.stdout)

    builtin = load_registry()  # no plugin: what `train` knows without --plugin
    with pytest.raises(ConfigError, match="unknown aggregator 'other'") as unknown:
        load_trial_config(config, ["model.aggregator.name=other"], registry=builtin)
    assert "plugins field" not in str(unknown.value), "the record is of my_mlp, not of the name --set gave"
    warnings: list[str] = []
    (tmp_path / "copy.py").write_text(PLUGIN_FILE.read_text())  # my_mlp from another file: perhaps another my_mlp
    load_trial_config(config, registry=load_registry(extra_plugins=[str(tmp_path / "copy.py")]), warn=warnings.append)
    assert warnings == [f"{config}:{text.splitlines().index('  model.aggregator:') + 1}: plugins.model.aggregator: the "
                        f"trial ran aggregator 'my_mlp' from the plugin '{plugin}'; here 'my_mlp' comes from "
                        f"'{tmp_path / 'copy.py'}', which may be another implementation"]
    edited = tmp_path / "edited_trial_config.yaml"  # as if the plugin file changed after the trial ran
    edited.write_text(text.replace(digest, "f" * 64))
    warnings.clear()
    load_trial_config(edited, registry=load_registry(extra_plugins=[plugin]), warn=warnings.append)
    assert warnings == [f"{edited}:{text.splitlines().index('  model.aggregator:') + 1}: plugins.model.aggregator: "
                        f"the plugin '{plugin}' changed since the trial ran (sha256 ffffffffffff... then, "
                        f"{digest[:12]}... now): aggregator 'my_mlp' runs as the plugin is now"]


def test_a_trial_records_the_digest_of_the_plugin_code_it_loaded(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest was taken when each trial's config was written: a plugin file edited during a long
    search was recorded as code the trial never ran, and train then found nothing changed. It is taken
    when the plugin is loaded, for a file and for a plugin named as a module (as Ray workers load a
    shipped file)."""
    from psmsearch.registry import load_registry
    from psmsearch.search import trial_config_text
    from psmsearch.trial import load_trial_config

    plugin = tmp_path / "my_plugin_mod.py"
    plugin.write_text(PLUGIN_FILE.read_text())
    loaded = hashlib.sha256(plugin.read_bytes()).hexdigest()
    registry = load_registry(extra_plugins=[str(plugin)])
    assert registry.plugin_digests == {str(plugin): loaded}
    trial = {"task": {"name": "group", "group": "Z5", "train_length": 4, "eval_max_multiple": 2, "eval_samples": 16},
             "model": {"kind": "psm", "d_model": 16, "chunk_size": 2, "aggregator": {"name": "my_mlp", "mlp_ratio": 1},
                       "head": {"name": "attention", "layers": 1, "heads": 2}}}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
    config = load_trial_config(tmp_path / "trial.yaml", registry=registry)
    plugin.write_text(plugin.read_text() + "\n# edited while the search runs\n")
    recorded = yaml.safe_load(trial_config_text(config, registry))["plugins"]["model.aggregator"]
    assert recorded == {"name": "my_mlp", "plugin": str(plugin), "sha256": loaded}
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_registry(extra_plugins=["my_plugin_mod"])
    assert by_module.plugin_digests == {"my_plugin_mod": hashlib.sha256(plugin.read_bytes()).hexdigest()}


def test_resume_refuses_a_changed_space_naming_each_field_and_allows_what_may_change(tmp_path: Path) -> None:
    """``--resume`` with another ``train.steps`` trained the study's later trials otherwise than its first
    ones, silently. The study records what defines the search; a resume that changes it is refused before
    anything runs (the MLflow parent run untouched), naming each field with its old and new value. The
    budget, parallelism, description, device and threads may change."""
    driver = {"trials": 1, "startup_trials": 1, "pruner": "none"}
    space = write_space(tmp_path, driver=driver)
    assert run_cli("search", str(space), "--no-progress", cwd=tmp_path).returncode == 0
    changed = write_space(tmp_path, "changed.yaml", driver=driver, train={**TINY_SPACE["train"], "steps": 12},
                          model={**TINY_SPACE["model"], "chunk_size": {"choice": [1, 2]}})
    result = run_cli("search", str(changed), "--resume", "--trials", "2", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = changed.read_text().splitlines().index("  chunk_size:") + 1
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(
        f"error: {changed}:{line}: model.chunk_size: study 'tiny' in sqlite:///{tmp_path / 'psmsearch.db'} was started "
        "with another search space: model.chunk_size was {choice: [1, 2, 4]}, now {choice: [1, 2]}; train.steps was "
        "6, now 12. "), error
    assert "start a new search with --study NAME" in error and "only the space's name and description, driver.trials" in error
    assert len(optuna_trials(tmp_path / "psmsearch.db")) == 1
    [parent] = [r for r in mlflow_runs(tmp_path / "mlflow.db") if r.data.tags.get("psmsearch.kind") == "search"]
    assert parent.info.status == "FINISHED"

    allowed = write_space(tmp_path, "allowed.yaml", description="more trials", device="cpu", threads=2,
                          driver={**driver, "trials": 2, "jobs": 2, "grace_period": 20})
    result = run_cli("search", str(allowed), "--resume", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [t.state for t in optuna_trials(tmp_path / "psmsearch.db")] == [TrialState.COMPLETE] * 2

"""Bad input is caught before any training: exit code 2, one message naming file, field, value, allowed.

Each case writes a search space derived from the tiny valid one, runs the real ``psmsearch``
command line in-process (click's runner), and checks the message. No case may train anything.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from click.testing import CliRunner

from psmsearch.cli import main
from searchhelpers import MIXED_MODEL, TINY_SPACE

Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(space: dict[str, Any]) -> None:
        node = space
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _drop(path: str) -> Edit:
    def edit(space: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = space
        for key in parents:
            node = node[key]
        del node[last]

    return edit


# (case id, edit of the valid space, field named in the message, fragments that must appear)
CASES: list[tuple[str, Edit, str, list[str]]] = [
    ("unknown aggregator", _set("model.aggregator", "atention"), "model.aggregator", ["unknown aggregator 'atention'", "Did you mean 'attention'?"]),
    ("unknown choice entry", _set("model.aggregator.choice.0", {"name": "mlpp"}), "model.aggregator.choice.0", ["unknown aggregator 'mlpp'", "Did you mean 'mlp'?"]),
    ("unknown encoder", _set("model.encoder", "embedd"), "model.encoder", ["unknown encoder 'embedd'", "Did you mean 'embed'?"]),
    ("unknown head", _set("model.head", "attn"), "model.head", ["unknown head 'attn'", "Registered heads:"]),
    ("wrong type d_model", _set("model.d_model", "big"), "model.d_model", ["'big'", "valid integer"]),
    ("chunk size zero", _set("model.chunk_size", 0), "model.chunk_size", ["0", "greater than or equal to 1"]),
    ("chunk size not an integer", _set("model.chunk_size", 2.5), "model.chunk_size", ["2.5", "integer"]),
    ("chunk size beyond the sequence", _set("model.chunk_size", 64), "model.chunk_size", ["64", "train_length"]),
    ("incompatible state kinds", _set("model.aggregator", "affine_diag"), "model", ["state_kind", "must share one state_kind"]),
    ("unknown objective metric", _set("objectives.0.metric", "acc_5x"), "objectives.0.metric", ["unknown metric 'acc_5x'", "acc_2x"]),
    ("objective direction typo", _set("objectives.0.direction", "maximise"), "objectives.0.direction", ["'maximise'", "'maximize' or 'minimize'"]),
    ("no objectives", _set("objectives", []), "objectives", ["at least 1 item"]),
    ("empty choice list", _set("model.chunk_size", {"choice": []}), "model.chunk_size", ["choice must be a non-empty list"]),
    ("choices equal to Optuna", _set("model.chunk_size", {"choice": [1, True]}), "model.chunk_size", ["choice values 1 and True are equal", "only the first could ever be sampled"]),
    ("NaN choice", _set("train.lr", {"choice": [float("nan"), 0.001]}), "train.lr", ["a choice is NaN, which equals nothing"]),
    ("int range reversed", _set("model.d_model", {"int": [64, 16]}), "model.d_model", ["low < high", "[64, 16]"]),
    ("int range of floats", _set("model.d_model", {"int": [16.5, 64]}), "model.d_model", ["int range must hold integers"]),
    ("log range from zero", _set("train.lr", {"float": [0.0, 0.1], "log": True}), "train.lr", ["log-scale range needs low > 0"]),
    ("range not numbers", _set("train.lr", {"float": ["a", "b"]}), "train.lr", ["range must be [low, high] numbers"]),
    ("unknown component hyperparameter", _set("model.head", {"name": "attention", "depth": 2}), "model.head.depth", ["has no hyperparameter 'depth'", "allowed: heads, layers, mlp_ratio"]),
    ("hyperparameter out of range", _set("model.head", {"name": "attention", "layers": 99}), "model.head.layers", ["99 is out of range", "int in [1, 6]"]),
    ("hyperparameter not a choice", _set("model.head", {"name": "attention", "heads": 3}), "model.head.heads", ["3 is not allowed", "one of 1, 2, 4, 8"]),
    ("hyperparameter choice given as a float", _set("model.head", {"name": "attention", "heads": 2.0}), "model.head.heads", ["2.0 is not allowed", "one of 1, 2, 4, 8"]),
    ("hyperparameter choice given as a bool", _set("model.head", {"name": "attention", "heads": True}), "model.head.heads", ["True is not allowed", "one of 1, 2, 4, 8"]),
    ("heads do not divide width", lambda s: (_set("model.d_model", 12)(s), _set("model.head", {"name": "attention", "heads": 8})(s)), "model", ["heads=8 does not divide d_model=12"]),
    ("unknown task", _set("task.name", "gruop"), "task.name", ["unknown task 'gruop'", "Did you mean 'group'?"]),
    ("task parameter not allowed", _set("task.group", "S9"), "task.group", ["'S9' is not allowed", "'S3'"]),
    ("unknown task parameter", _set("task.size", 3), "task.size", ["has no parameter 'size'"]),
    ("negative steps", _set("train.steps", -5), "train.steps", ["-5", "greater than or equal to 1"]),
    ("no training budget", _set("train", {"steps": None}), "train", ["needs a budget"]),
    ("lr out of range", _set("train.lr", -0.1), "train.lr", ["-0.1", "greater than 0"]),
    ("zero trials", _set("driver.trials", 0), "driver.trials", ["greater than or equal to 1"]),
    ("unknown driver", _set("driver.name", "slurm"), "driver.name", ["'slurm'", "'optuna' or 'ray'"]),
    ("unknown top-level key", _set("modle", {"d_model": 3}), "modle", ["unknown field 'modle'"]),
    ("unknown model kind", _set("model.kind", "rnn"), "model.kind", ["'rnn'", "'psm', 'gpt' or 'swa'"]),
    ("bad space name", _set("name", "my space"), "name", ["should match pattern"]),
    ("int step not an integer", _set("model.d_model", {"int": [16, 64], "step": 0.5}), "model.d_model.step", ["an int range's step must be an integer >= 1", "0.5"]),
    ("step with log scale", _set("train.lr", {"float": [0.001, 0.1], "log": True, "step": 1}), "train.lr.step", ["step and log cannot be combined in one float range"]),
    ("int step with log scale", _set("model.d_model", {"int": [16, 64], "log": True, "step": 8}), "model.d_model.step", ["step and log cannot be combined in one int range", "step: 8 with log: true"]),
    ("grid over a float range", lambda s: (_set("driver.sampler", "grid")(s), _set("train.lr", {"float": [0.001, 0.01], "log": True})(s)), "train.lr", ["sampler 'grid' needs choice dimensions only; this is a float range"]),
    ("grid over encoders of two state kinds", lambda s: (_set("driver.sampler", "grid")(s), _set("model", MIXED_MODEL)(s)), "model.encoder", ["sampler 'grid' needs encoders of a single state kind, and these have 2 (affine-diag: gla; tokens: embed)", "use sampler 'random' or 'tpe', or one grid search per state kind"]),
    ("grid over a plain list leaving a hyperparameter open", lambda s: (_set("driver.sampler", "grid")(s), _set("model.aggregator", ["mlp", {"name": "attention", "layers": 1, "heads": 2, "mlp_ratio": 1}])(s)), "model.aggregator.0", ["sampler 'grid' needs fixed component hyperparameters", "aggregator 'mlp' leaves mlp_ratio open (mlp_ratio: {int: [1, 8]})", "write {name: mlp, mlp_ratio: 2} to keep it in the grid"]),
    ("grid over a dimension in a component entry", lambda s: (_set("driver.sampler", "grid")(s), _set("model.aggregator.choice.0.mlp_ratio", {"choice": [1, 2]})(s)), "model.aggregator.choice.0.mlp_ratio", ["mlp_ratio is a dimension here, drawn only when aggregator 'mlp' is chosen", "fix it to one value"]),
    ("choice never sampleable", _set("model.aggregator", {"choice": ["mlp", "affine_scalar"]}), "model.aggregator.choice.1", ["'affine_scalar' has state_kind 'affine-scalar'", "never be sampled"]),
    ("duplicate component choice", _set("model.aggregator", {"choice": ["mlp", "mlp"]}), "model.aggregator", ["'mlp' is listed twice"]),
    ("missing name", _drop("name"), "name", ["Field required"]),
    ("infinite range bound", _set("train.lr", {"float": [0, float("inf")]}), "train.lr", ["finite bounds", "[0, inf]"]),
    ("range wider than a float", _set("train.lr", {"float": [-1e308, 1e308]}), "train.lr", ["finite bounds less than 1.8e308 apart"]),
    ("nan range bound", _set("train.lr", {"float": [float("nan"), 0.1]}), "train.lr", ["finite bounds", "[nan, 0.1]"]),
    ("infinite float step", _set("train.lr", {"float": [0.001, 0.1], "step": float("inf")}), "train.lr.step", ["finite number > 0", "inf"]),
    ("two dimension kinds", _set("model.d_model", {"choice": [16, 32], "int": [16, 32]}), "model.d_model", ["has both choice and int", "exactly one of choice, int, float"]),
    ("unknown distribution", _set("model.d_model", {"uniform": [16, 32]}), "model.d_model", ["{'uniform': [16, 32]} is neither a value for this field nor a search dimension", "unknown key 'uniform'", "exactly one of choice, int, float", "log and step"]),
    ("range options without a kind", _set("train.lr", {"log": True}), "train.lr", ["no choice, int or float key"]),
    ("misspelled range option", _set("model.d_model", {"int": [16, 32], "stepp": 8}), "model.d_model.stepp", ["unknown key 'stepp' in this int dimension", "Did you mean 'step'?", "Allowed: int, log, step"]),
    ("extra range option", _set("model.d_model", {"int": [16, 32], "extra": 1}), "model.d_model.extra", ["unknown key 'extra'", "Allowed: int, log, step"]),
    ("malformed hyperparameter dimension", _set("model.head", {"name": "attention", "layers": {"uniform": [1, 2]}}), "model.head.layers", ["unknown key 'uniform'", "exactly one of choice, int, float"]),
    ("malformed task dimension", _set("task.group", {"uniform": ["S3", "S5"]}), "task.group", ["unknown key 'uniform'", "exactly one of choice, int, float"]),
    ("component choice with two kinds", _set("model.aggregator", {"choice": ["mlp"], "int": [1, 2]}), "model.aggregator", ["has both choice and int"]),
    ("unknown driver field", _set("driver.trails", 2), "driver.trails", ["unknown field 'trails'; allowed: address,", "startup_trials, storage, study, trials.", "Did you mean 'trials'?"]),
    ("unknown tracking field", _set("tracking", {"experimnt": "x"}), "tracking.experimnt", ["unknown field 'experimnt'; allowed: enabled, experiment, tracking_uri."]),
    ("unknown objective field", _set("objectives.0.directon", "max"), "objectives.0.directon", ["unknown field 'directon'; allowed: direction, metric."]),
    ("top-level typo lists every field", _set("nmae", "x"), "nmae", ["allowed: description, device, driver, metrics, model, name, objectives, seed, task, threads, tracking, train.", "Did you mean 'name'?"]),
    ("objective listed twice", _set("objectives", [{"metric": "acc_2x", "direction": "maximize"}, {"metric": "acc_2x", "direction": "minimize"}]), "objectives.1.metric", ["'acc_2x' is already objective 0", "Pareto front"]),
]


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=True)


def _assert_clean_error(result: Any, fragments: list[str]) -> str:
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} missing from: {output}"
    return output


def test_the_table_holds_at_least_25_distinct_cases() -> None:
    assert len({case[0] for case in CASES}) >= 25


@pytest.mark.parametrize("case, edit, field, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_search_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, edit: Edit, field: str, fragments: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    space = copy.deepcopy(TINY_SPACE)
    edit(space)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    output = _assert_clean_error(_run(["search", str(path), "--no-progress"]), [*fragments, str(path), field])
    assert output.count("error:") == 1
    assert not (tmp_path / "psmsearch.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_malformed_yaml_reports_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  d_model: [16\n  chunk_size: 2\n")
    _assert_clean_error(_run(["search", str(path)]), [f"{path}:4", "malformed YAML"])


def test_error_points_at_the_line_of_the_bad_field(tmp_path: Path) -> None:
    space = copy.deepcopy(TINY_SPACE)
    space["model"]["aggregator"] = "atention"
    path = tmp_path / "bad.yaml"
    text = yaml.safe_dump(space, sort_keys=False)
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "atention" in row)
    _assert_clean_error(_run(["search", str(path)]), [f"{path}:{line}: model.aggregator"])


@pytest.mark.parametrize(("key", "value", "field"), [
    ("aggregator", "atention", "model.aggregator"),
    ("group", "S9", "task.group"),  # a task's own parameter check once gave only the file
])
def test_error_points_at_the_line_of_the_bad_field_of_each_section(tmp_path: Path, key: str, value: str, field: str) -> None:
    space = copy.deepcopy(TINY_SPACE)
    section = field.partition(".")[0]
    space[section][key] = value
    path = tmp_path / "bad.yaml"
    text = yaml.safe_dump(space, sort_keys=False)
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip() == f"{key}: {value}")
    _assert_clean_error(_run(["search", str(path)]), [f"{path}:{line}: {field}: "])


@pytest.mark.parametrize(("dimension", "message"), [
    ("{int: [16, 64], log: true, step: 8}", "step and log cannot be combined in one int range (here step: 8 with log: "
                                            "true): Optuna draws a log-scale range without steps; keep one of them"),
    ("{int: [16, 64], step: 0}", "an int range's step must be an integer >= 1 (and not used with log), got 0"),
    ("{int: [16, 64], step: 2.5}", "an int range's step must be an integer >= 1 (and not used with log), got 2.5"),
], ids=["step with log", "step 0", "step 2.5"])
def test_an_int_steps_message_says_whether_log_or_the_step_is_at_fault(tmp_path: Path, dimension: str, message: str) -> None:
    """``step: 8`` with ``log: true`` said "step must be an integer >= 1 (and not used with log), got 8",
    which read as if 8 were a bad step; the pair now has its own message, a bad step keeps its own."""
    text = yaml.safe_dump(TINY_SPACE, sort_keys=False).replace("  d_model: 16\n", f"  d_model: {dimension}\n")
    path = tmp_path / "step.yaml"
    path.write_text(text)
    line = text.splitlines().index(f"  d_model: {dimension}") + 1
    output = _assert_clean_error(_run(["search", str(path), "--no-progress"]), [f"{path}:{line}: model.d_model.step: {message}"])
    assert output.count("error:") == 1


def test_a_key_given_twice_is_an_error_at_its_second_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML keeps the last of two equal keys: d_model 16 then 64 silently searched d_model 64."""
    monkeypatch.chdir(tmp_path)
    text = yaml.safe_dump(TINY_SPACE, sort_keys=False).replace("  d_model: 16\n", "  d_model: 16\n  d_model: 64\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    first = text.splitlines().index("  d_model: 16") + 1
    output = _assert_clean_error(_run(["search", str(path), "--no-progress"]),
                                 [f"{path}:{first + 1}: model.d_model: duplicate key 'd_model' (first at line {first})"])
    assert output.count("error:") == 1
    assert not (tmp_path / "psmsearch.db").exists()


def test_keys_overriding_a_yaml_merge_are_not_duplicates(tmp_path: Path) -> None:
    from psmsearch.yamlio import parse_yaml

    data, _ = parse_yaml("base: &base {layers: 1, heads: 2}\nhead: {<<: *base, heads: 4}\n", "merge.yaml")
    assert data["head"] == {"layers": 1, "heads": 4}


def test_an_objective_against_its_metrics_direction_is_warned_before_anything_runs(tmp_path: Path) -> None:
    """acc_2x minimized or params maximized is allowed (it may be meant) but said, with its line."""
    space = copy.deepcopy(TINY_SPACE)
    space["objectives"] = [{"metric": "acc_2x", "direction": "minimize"}, {"metric": "params", "direction": "maximize"}]
    path = tmp_path / "contrary.yaml"
    text = yaml.safe_dump(space, sort_keys=False)
    path.write_text(text)
    lines = [i for i, row in enumerate(text.splitlines(), 1) if "direction:" in row]
    (tmp_path / "a-file").write_text("")
    unreachable = f"sqlite:///{tmp_path / 'a-file' / 'y.db'}"  # stops the search right after loading the space
    output = _assert_clean_error(_run(["search", str(path), "--storage", unreachable]), ["the folder of the SQLite file, is not a folder"])
    assert f"warning: {path}:{lines[0]}: objectives.0.direction: 'acc_2x' is set to minimize, but higher is better" in output
    assert f"warning: {path}:{lines[1]}: objectives.1.direction: 'params' is set to maximize, but lower is better" in output
    natural = tmp_path / "natural.yaml"
    natural.write_text(yaml.safe_dump(TINY_SPACE, sort_keys=False))
    assert "warning:" not in _run(["search", str(natural), "--storage", unreachable]).output


def test_a_test_set_objective_is_warned_before_anything_runs(tmp_path: Path) -> None:
    """Selecting on test_... metrics makes the test split a validation split again, and nothing prunes."""
    space = copy.deepcopy(TINY_SPACE)
    space["objectives"] = [{"metric": "test_acc_2x", "direction": "maximize"}]
    path = tmp_path / "test-objective.yaml"
    text = yaml.safe_dump(space, sort_keys=False)
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "metric: test_acc_2x" in row)
    (tmp_path / "a-file").write_text("")
    unreachable = f"sqlite:///{tmp_path / 'a-file' / 'y.db'}"  # stops the search right after loading the space
    output = _assert_clean_error(_run(["search", str(path), "--storage", unreachable]), ["the folder of the SQLite file, is not a folder"])
    assert (f"warning: {path}:{line}: objectives.0.metric: 'test_acc_2x' is a test-set metric, computed once after "
            "training") in output
    assert "optimise 'acc_2x' and report 'test_acc_2x' instead" in output


def test_chunk_sizes_that_train_no_aggregator_are_warned_before_anything_runs(tmp_path: Path) -> None:
    """At train_length 9, c = 8 leaves 2 chunks: no prefix needs the aggregator, so those trials
    compared aggregators that were never called (a walkthrough's bit-identical results)."""
    space = copy.deepcopy(TINY_SPACE)
    space["model"]["chunk_size"] = {"choice": [1, 5, 2, 8]}
    path = tmp_path / "wide-chunks.yaml"
    text = yaml.safe_dump(space, sort_keys=False)
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "chunk_size" in row)
    (tmp_path / "a-file").write_text("")
    unreachable = f"sqlite:///{tmp_path / 'a-file' / 'y.db'}"  # stops the search right after loading the space
    output = " ".join(_run(["search", str(path), "--storage", unreachable]).output.split())
    assert (f"warning: {path}:{line}: model.chunk_size: chunk sizes 5, 8 leave fewer than 3 chunks in a training "
            "sequence of 9 tokens (task.train_length), so the aggregator is never called in training") in output
    assert "chunk sizes up to 4 give 3 chunks or more" in output
    space["model"]["chunk_size"] = {"int": [2, 8], "step": 3}  # draws 2, 5, 8 only
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    output = " ".join(_run(["search", str(path), "--storage", unreachable]).output.split())
    assert "model.chunk_size: chunk sizes 5, 8 leave fewer than 3 chunks" in output


def test_missing_file(tmp_path: Path) -> None:
    _assert_clean_error(_run(["search", str(tmp_path / "nope.yaml")]), ["no such file", "nope.yaml"])


def test_space_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    _assert_clean_error(_run(["search", str(path)]), ["a search space is a mapping", "list"])


def test_unknown_cli_option(tmp_path: Path) -> None:
    _assert_clean_error(_run(["search", "x.yaml", "--trails", "3"]), ["No such option '--trails'. Did you mean '--trials'?"])


def test_cli_value_out_of_range(tmp_path: Path) -> None:
    _assert_clean_error(_run(["search", "x.yaml", "--trials", "0"]), ["Invalid value for '--trials'", "0 is not in the range x>=1"])


def test_unreachable_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    (tmp_path / "a-file").write_text("")
    url = f"sqlite:///{tmp_path / 'a-file' / 'y.db'}"
    _assert_clean_error(_run(["search", str(path), "--storage", url]), ["the folder of the SQLite file, is not a folder", "--storage", url])


def test_yaml_objects_are_never_constructed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    _assert_clean_error(_run(["search", str(path)]), ["malformed YAML", "python/object/apply"])
    assert not (tmp_path / "pwned").exists()


def test_a_search_space_given_to_train_and_a_trial_config_given_to_search_are_named_as_such() -> None:
    """Swapped files failed on their first field: ``train`` on a ``{choice: ...}`` (a type error),
    ``search`` with "name: Field required"; each now says what the file is and which command takes it."""
    from clihelpers import run_cli

    repo = Path(__file__).resolve().parents[1]
    space, trial = repo / "search_spaces" / "quick.yaml", repo / "examples" / "configs" / "group_tpsm.yaml"
    result = run_cli("train", str(space))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"this is a search space (it has objectives, driver), not a trial config: run it with `psmsearch search {space}`" \
        in result.stderr
    result = run_cli("search", str(trial))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"this is a trial config (no name or objectives), not a search space: run it with `psmsearch train {trial}`" \
        in result.stderr

"""Trial configs and ``psmsearch train``: validation messages, overrides, JSON output, example configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from clihelpers import table_rows
from psmsearch.cli_train import format_metric, train
from psmsearch.errors import ConfigError, UnknownComponentError
from psmsearch.trial import TrialConfig, load_trial_config, metric_directions, run_trial

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"

TINY = {
    "task": {"name": "group", "group": "Z5", "train_length": 6, "eval_max_multiple": 2, "eval_samples": 16},
    "model": {
        "kind": "psm", "d_model": 16, "chunk_size": 2,
        "aggregator": {"name": "attention", "layers": 1, "heads": 2}, "head": {"name": "attention", "layers": 1, "heads": 2},
    },
    "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "eval_every": 3},
    "metrics": {"memory_lengths": [64], "latency_lengths": [64], "latency_tokens": 2},
}


def write(tmp_path: Path, data: object, name: str = "trial.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_prints_a_table_or_with_json_one_object_alone_with_overrides(tmp_path: Path) -> None:
    """``--json`` makes stdout one JSON object and nothing else (it used to follow the table), as with
    ``search --json``; without it, the same metrics as a table."""
    path = write(tmp_path, TINY)
    args = [str(path), "--set", "model.chunk_size=1", "--set", "task.group=S3", "--no-progress", "--no-eval-log"]
    result = CliRunner().invoke(train, [*args, "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"acc_1x", "acc_2x", "final_acc_2x", "train_loss", "params", "state_bytes_64", "latency_ms_64"} <= set(metrics)
    assert metrics["train_steps"] == 6
    assert metrics["state_bytes_64"] == metrics["expected_state_bytes_64"]
    table = CliRunner().invoke(train, args)
    assert table.exit_code == 0, table.output
    assert "acc_1x" in table.stdout and "state_bytes_64" in table.stdout and "{" not in table.stdout
    shown = {row[0]: row[1] for row in table_rows(table.stdout)}
    assert shown["params"] == f"{int(metrics['params']):,}" and "e+" not in table.stdout
    assert shown["acc_1x"] == format_metric("acc_1x", metrics["acc_1x"]), "the same run, the same figures"


@pytest.mark.parametrize(("name", "value", "shown"), [
    ("state_bytes_1k", 11776.0, "11,776"), ("peak_state_bytes_64k", 1.5e6, "1,500,000"), ("params", 105984.0, "105,984"),
    ("num_states_1k", 19.0, "19"), ("train_steps", 20000.0, "20,000"), ("acc_4x", 0.990478, "0.9905"),
    ("train_tokens_per_s", 12345.6, "12,350"), ("latency_ms_1k", 0.8129143, "0.8129"), ("train_loss", float("nan"), "nan"),
])
def test_metrics_are_shown_as_counts_or_to_4_significant_digits(name: str, value: float, shown: str) -> None:
    assert format_metric(name, value) == shown


def test_run_trial_is_a_pure_function_of_the_config(tmp_path: Path) -> None:
    config = TrialConfig.from_dict({**TINY, "metrics": {"enabled": False}})
    steps: list[int] = []
    first = run_trial(config, lambda step, m: steps.append(step))
    second = run_trial(config)
    assert steps == [3, 6]
    drop = {"train_seconds", "train_tokens_per_s"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}
    assert set(metric_directions(config)) - {"train_tokens_per_s", "params"} <= set(first)


def test_bad_value_names_file_field_value_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, {**TINY, "task": {**TINY["task"], "group": "S9"}})
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    message = str(info.value)
    assert str(path) in message and "task.group" in message and "'S9'" in message and "'S5'" in message


def test_a_refused_value_says_what_the_field_is_for_and_names_every_other_refused_field(tmp_path: Path) -> None:
    """``grad_clip: 0`` said only "greater than 0" (not how to turn clipping off), and further errors
    were a count ("and 1 more error") without the fields."""
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError) as info:
        load_trial_config(path, ["train.grad_clip=0"])
    assert str(info.value).endswith("train.grad_clip: 0 is not allowed: Input should be greater than 0 "
                                    "(grad_clip: max global gradient norm; null turns clipping off)"), str(info.value)
    with pytest.raises(ConfigError) as info:
        load_trial_config(path, ["train.grad_clip=0", "train.lr=-1"])
    assert str(info.value).endswith("(and 1 more: train.grad_clip)"), str(info.value)


def test_unknown_field_lists_allowed_fields(tmp_path: Path) -> None:
    path = write(tmp_path, {**TINY, "train": {**TINY["train"], "stpes": 3}})
    with pytest.raises(ConfigError, match=r"train\.stpes.*unknown field 'stpes'; allowed: .*steps"):
        load_trial_config(path)


def test_schema_error_names_file_line_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, {**TINY, "model": {**TINY["model"], "chunk_size": 0}})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "chunk_size" in text)
    with pytest.raises(ConfigError, match=rf"trial\.yaml:{line}: model\.chunk_size: 0 is not allowed"):
        load_trial_config(path)


def test_an_overridden_value_is_blamed_on_its_set(tmp_path: Path) -> None:
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"^--set model\.chunk_size: 0 is not allowed"):
        load_trial_config(path, ["model.chunk_size=0"])


def test_a_model_field_the_kind_never_reads_is_a_warning_at_its_line_or_set(tmp_path: Path) -> None:
    """``n_heads: 8`` under ``kind: psm`` (or ``chunk_size`` under ``gpt``) validated and then did nothing.
    A warning, not an error: ``--set model.kind=gpt`` on a PSM config leaves the PSM's fields behind."""
    path = write(tmp_path, {**TINY, "model": {**TINY["model"], "kind": "psm", "n_heads": 8, "window": 64}})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "n_heads" in text)
    warnings: list[str] = []
    assert load_trial_config(path, warn=warnings.append).model.kind == "psm"
    assert len(warnings) == 1, warnings  # window: 64 is the default, as in every trial_config.yaml
    assert re.fullmatch(rf".*trial\.yaml:{line}: model\.n_heads: model\.kind psm never reads it \(read by: gpt, "
                        r"swa\); it changes nothing \(a PSM's attention heads are its components' hyperparameters, "
                        r"e\.g\. aggregator: \{name: attention, heads: 4\}\)", warnings[0]), warnings[0]
    warnings.clear()
    gpt = write(tmp_path, {**TINY, "model": {"kind": "gpt", "d_model": 16, "n_heads": 2}})
    assert load_trial_config(gpt, ["model.chunk_size=4"], warn=warnings.append).model.n_heads == 2
    assert warnings == ["--set model.chunk_size: model.kind gpt never reads it (read by: psm); it changes nothing"]


@pytest.mark.parametrize("kind", [{"choice": ["psm", "gpt"]}, ["psm"]])
def test_a_model_kind_that_is_not_a_name_is_a_located_error(tmp_path: Path, kind: object) -> None:
    path = write(tmp_path, {**TINY, "model": {**TINY["model"], "kind": kind}})
    with pytest.raises(ConfigError, match=r"trial\.yaml:\d+: model\.kind: .* is not allowed"):
        load_trial_config(path, warn=lambda message: None)


def test_a_trials_resolved_config_runs_as_written_without_warnings(tmp_path: Path) -> None:
    """trial_config.yaml (the artifact of every search trial) held every model field, n_heads under psm too."""
    for model in (TINY["model"], {"kind": "gpt", "d_model": 16, "n_heads": 2}):
        config = load_trial_config(write(tmp_path, {**TINY, "model": model}))
        path = tmp_path / "resolved.yaml"
        path.write_text(yaml.safe_dump(config.resolved(), sort_keys=False))
        warnings: list[str] = []
        assert load_trial_config(path, warn=warnings.append) == config
        assert warnings == []
        assert set(config.resolved()["model"]) <= {"kind", "d_model", "n_layers", "mlp_ratio", "dropout", "n_heads",
                                                   "window", "chunk_size", "encoder", "aggregator", "head"}
    assert "chunk_size" not in config.resolved()["model"] and "n_heads" in config.resolved()["model"]


@pytest.mark.parametrize(("section", "key", "value", "field", "line_key"), [
    ("task", "group", "S9", "task.group", "group"),
    ("model", "aggregator", {"name": "attention", "layers": 99}, "model.aggregator.layers", "layers"),
    ("model", "aggregator", {"name": "attention", "depth": 2}, "model.aggregator.depth", "depth"),
])
def test_registry_checked_fields_name_their_line(tmp_path: Path, section: str, key: str, value: object,
                                                field: str, line_key: str) -> None:
    path = write(tmp_path, {**TINY, section: {**TINY[section], key: value}})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f"{line_key}:"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: {re.escape(field)}: "):
        load_trial_config(path)


def test_a_bad_component_hyperparameter_from_set_is_blamed_on_its_set(tmp_path: Path) -> None:
    """--set model.aggregator.layers=99 was reported at the file's model.aggregator line."""
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"^--set model\.aggregator\.layers: .*99 is out of range"):
        load_trial_config(path, ["model.aggregator.layers=99"])
    with pytest.raises(ConfigError, match=r"^--set model\.aggregator: model\.aggregator\.depth: "):
        load_trial_config(path, ["model.aggregator={name: attention, depth: 2}"])


def test_a_hyperparameter_under_params_is_named_and_located_as_written(tmp_path: Path) -> None:
    """A trial_config.yaml writes components as ``{name, params: {...}}``: an out-of-range value there was
    reported as ``model.aggregator.layers`` at the ``aggregator:`` line, and a ``--set
    model.aggregator.params.layers=99`` was blamed on the file, not the --set."""
    nested = {**TINY, "model": {**TINY["model"], "aggregator": {"name": "attention", "params": {"layers": 99, "heads": 2}}}}
    path = write(tmp_path, nested)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("layers:"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line}: model\.aggregator\.params\.layers: .*99 is out of range"):
        load_trial_config(path)
    nested["model"]["aggregator"]["params"]["layers"] = 1
    path = write(tmp_path, nested)
    with pytest.raises(ConfigError, match=r"^--set model\.aggregator\.params\.layers: .*99 is out of range"):
        load_trial_config(path, ["model.aggregator.params.layers=99"])
    # a flat key set beside params is that key's error, at its --set (not renamed into params, not the file's)
    with pytest.raises(ConfigError, match=r"^--set model\.aggregator\.layers: unknown field 'layers'; allowed: name, params"):
        load_trial_config(path, ["model.aggregator.layers=99"])


def test_components_of_different_state_kinds_are_a_config_error_not_a_crash(tmp_path: Path) -> None:
    """The error's field is ``model`` (no one component), which the recorded-plugin hint read as a
    component field and crashed on with an IndexError (exit 1, a traceback)."""
    mixed = {**TINY, "model": {**TINY["model"], "encoder": "gla", "aggregator": "mlp"}}
    with pytest.raises(ConfigError, match=r"model: incompatible components: encoder 'gla' has state_kind 'affine-diag'"):
        load_trial_config(write(tmp_path, mixed))
    result = CliRunner().invoke(train, [str(write(tmp_path, TINY)), "--set", "model.encoder=gla"])
    assert isinstance(result.exception, ConfigError), result.exception  # the CLI's main turns it into exit 2
    assert "model: incompatible components: encoder 'gla'" in str(result.exception)


def test_a_bad_task_parameter_from_set_is_blamed_on_its_set(tmp_path: Path) -> None:
    """--set task.pth=x was reported as the YAML file's error."""
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"^--set task\.pth: task 'group' has no parameter 'pth'; allowed: "):
        load_trial_config(path, ["task.pth=x"])
    result = CliRunner().invoke(train, [str(EXAMPLES / "lm_tpsm.yaml"), "--set", "task.path=/no/such/text.txt"])
    assert isinstance(result.exception, ConfigError)  # a task's environment check had no source at all
    assert str(result.exception).startswith("--set task.path: text file '/no/such/text.txt' not found")  # the field once
    assert result.exception.field == "task.path"


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys; a trial config silently trained the second value."""
    path = tmp_path / "trial.yaml"
    text = yaml.safe_dump(TINY, sort_keys=False).replace("  d_model: 16\n", "  d_model: 16\n  d_model: 64\n")
    path.write_text(text)
    first = text.splitlines().index("  d_model: 16") + 1
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{first + 1}: model\.d_model: duplicate key 'd_model' \(first at line {first}\)"):
        load_trial_config(path)
    with pytest.raises(ConfigError, match=r"^--set model\.aggregator: name: duplicate key 'name'"):
        load_trial_config(write(tmp_path, TINY), ["model.aggregator={name: mlp, name: attention}"])


def test_unknown_task_suggests_close_match(tmp_path: Path) -> None:
    with pytest.raises(UnknownComponentError, match=r"task\.name.*unknown task 'gruop'. Did you mean 'group'") as info:
        load_trial_config(write(tmp_path, {**TINY, "task": {"name": "gruop"}}))
    assert isinstance(info.value, ConfigError)


def test_model_components_are_validated(tmp_path: Path) -> None:
    bad = {**TINY, "model": {**TINY["model"], "aggregator": {"name": "attention", "layers": 99}}}
    with pytest.raises(ConfigError, match=r"model\.aggregator.*layers"):
        load_trial_config(write(tmp_path, bad))
    gpt = {**TINY, "model": {"kind": "gpt", "d_model": 16, "n_heads": 3}}
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        load_trial_config(write(tmp_path, gpt))


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"--set.*'model.chunk_size'.*dotted.key=value"):
        load_trial_config(path, ["model.chunk_size"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_trial_config(tmp_path / "missing.yaml")
    result = CliRunner().invoke(train, [str(path), "--set", "=3"])
    assert isinstance(result.exception, ConfigError)


def test_non_finite_rates_and_empty_lengths_are_refused_by_name(tmp_path: Path) -> None:
    """nan failed every bound ("should be <= 1"); a memory length of 0 was accepted."""
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"train\.lr: nan is not allowed: Input should be a finite number"):
        load_trial_config(path, ["train.lr=.nan"])
    with pytest.raises(ConfigError, match=r"metrics\.memory_lengths\.0: 0 is not allowed.*greater than or equal to 1"):
        load_trial_config(path, ["metrics.memory_lengths=[0]"])
    with pytest.raises(ConfigError, match=r"metrics\.latency_lengths\.1: -4 is not allowed"):
        load_trial_config(path, ["metrics.latency_lengths=[8, -4]"])


def test_override_expands_short_component_form(tmp_path: Path) -> None:
    data = {**TINY, "model": {**TINY["model"], "aggregator": "mlp"}}
    config = load_trial_config(write(tmp_path, data), ["model.aggregator.mlp_ratio=3"])
    assert config.model.aggregator.name == "mlp" and config.model.aggregator.params == {"mlp_ratio": 3}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path: Path) -> None:
    config = load_trial_config(path)
    assert config.train.steps


def test_there_are_example_configs_for_group_gpt_and_lm() -> None:
    kinds = {(c.task.name, c.model.kind) for c in map(load_trial_config, EXAMPLES.glob("*.yaml"))}
    assert {("group", "psm"), ("group", "gpt"), ("lm", "psm")} <= kinds


def test_checkpoint_is_written_when_training_ends_and_resumed_from(tmp_path: Path) -> None:
    """--checkpoint without train.checkpoint_every once wrote nothing; resuming with more steps continues."""
    path, checkpoint = write(tmp_path, {**TINY, "metrics": {"enabled": False}}), tmp_path / "end.pt"
    first = CliRunner().invoke(train, [str(path), "--checkpoint", str(checkpoint), "--json", "--no-progress", "--no-eval-log"])
    assert first.exit_code == 0, first.output
    assert checkpoint.is_file()
    import torch

    assert torch.load(checkpoint, weights_only=True)["step"] == 6
    more = CliRunner().invoke(train, [str(path), "--set", "train.steps=9", "--checkpoint", str(checkpoint), "--resume",
                                      "--json", "--no-progress", "--no-eval-log"])
    assert more.exit_code == 0, more.output
    assert f"resuming from step 6 ({checkpoint})" in more.stderr  # it said nothing
    assert json.loads(more.output.strip().splitlines()[-1])["train_steps"] == 9
    assert torch.load(checkpoint, weights_only=True)["step"] == 9


def test_checkpoint_mistakes_are_clear_errors(tmp_path: Path) -> None:
    path, checkpoint = write(tmp_path, {**TINY, "metrics": {"enabled": False}}), tmp_path / "end.pt"
    runner = CliRunner()
    result = runner.invoke(train, [str(path), "--resume", "--no-progress"])
    assert result.exit_code == 2 and "--resume needs --checkpoint PATH" in result.output
    assert runner.invoke(train, [str(path), "--checkpoint", str(checkpoint), "--no-progress", "--no-eval-log"]).exit_code == 0
    result = runner.invoke(train, [str(path), "--set", "model.d_model=32", "--checkpoint", str(checkpoint), "--resume",
                                   "--no-progress"])
    assert isinstance(result.exception, ConfigError)
    assert "was written by a different trial: model.d_model: 16 in the checkpoint, 32 now" in str(result.exception)
    assert "resuming" not in result.stderr  # it announced "resuming from step 6" before refusing the file
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    result = runner.invoke(train, [str(path), "--checkpoint", str(damaged), "--resume", "--no-progress"])
    assert isinstance(result.exception, ConfigError) and "cannot read" in str(result.exception)


def test_betas_outside_0_1_are_a_config_error_naming_the_field(tmp_path: Path) -> None:
    """train.betas=[1.5, 0.9] reached AdamW and ended in a torch traceback (exit 1)."""
    path = write(tmp_path, TINY)
    for betas in ("[1.5, 0.9]", "[0.9, 1.0]", "[-0.1, 0.9]"):
        with pytest.raises(ConfigError, match=r"^--set train\.betas: .* each beta must satisfy 0 <= b < 1"):
            load_trial_config(path, [f"train.betas={betas}"])
    assert load_trial_config(path, ["train.betas=[0.0, 0.999]"]).train.betas == (0.0, 0.999)


def test_resume_refuses_a_different_trial_naming_the_fields_and_allows_a_longer_budget(tmp_path: Path) -> None:
    """--resume checked only the model's shapes: another task, seed or lr continued silently."""
    path, checkpoint = write(tmp_path, {**TINY, "metrics": {"enabled": False}}), tmp_path / "end.pt"
    runner = CliRunner()
    assert runner.invoke(train, [str(path), "--checkpoint", str(checkpoint), "--no-progress", "--no-eval-log"]).exit_code == 0
    written = checkpoint.read_bytes()
    result = runner.invoke(train, [str(path), "--set", "train.lr=0.001", "--set", "seed=1", "--set", "task.group=S3",
                                   "--checkpoint", str(checkpoint), "--resume", "--no-progress"])
    assert isinstance(result.exception, ConfigError) and result.exception.field == "--checkpoint"
    message = str(result.exception)
    for difference in ("seed: 0 in the checkpoint, 1 now", "task.group: 'Z5' in the checkpoint, 'S3' now",
                       "train.lr: 0.003 in the checkpoint, 0.001 now"):
        assert difference in message
    assert checkpoint.read_bytes() == written, "a refused resume leaves the checkpoint alone"
    result = runner.invoke(train, [str(path), "--set", "train.steps=8", "--set", "train.eval_every=4",
                                   "--set", "train.checkpoint_every=4", "--set", "metrics.enabled=true",
                                   "--set", "threads=2", "--checkpoint", str(checkpoint), "--resume",
                                   "--no-progress", "--no-eval-log", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["train_steps"] == 8


STREAM_FAILING_AGGREGATOR = '''
import torch
from psmsearch import Aggregator, hookimpl

class StreamFail(Aggregator):
    name = "streamfail"
    state_kind = "tokens"
    associative = False

    def __init__(self, context, **hparams):
        super().__init__(context, **hparams)
        k, d = context.encoder.state_shape
        self.initial = torch.nn.Parameter(torch.zeros(k, d))

    def forward(self, older, newer):
        if not torch.is_grad_enabled() and older.shape[0] == 1:  # one sequence without gradients: streaming
            raise RuntimeError("streaming not supported")
        return newer + older

    def initial_state(self, batch_shape):
        return self.initial.expand(*batch_shape, *self.initial.shape)

@hookimpl
def register_aggregators(register):
    register(StreamFail)
'''


def test_a_failing_plugin_prints_what_was_measured_and_one_line(tmp_path: Path) -> None:
    """A plugin that raised inside ``train`` gave a 110-line traceback in place of the metrics it had
    measured; now the metrics are printed, then one line with the phase and the plugin's line, exit 1."""
    from clihelpers import run_cli

    (tmp_path / "streamfail.py").write_text(STREAM_FAILING_AGGREGATOR)
    config = {**TINY, "model": {**TINY["model"], "aggregator": "streamfail"}, "train": {**TINY["train"], "steps": 2}}
    path = write(tmp_path, config)
    result = run_cli("--plugin", str(tmp_path / "streamfail.py"), "train", str(path), "--json", "--no-progress",
                     "--no-eval-log", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trial failed in measuring streaming inference: RuntimeError: streaming not supported"
                           f" (at {tmp_path / 'streamfail.py'}:"), last
    assert last.endswith("in forward) (--traceback shows the full traceback)"), last
    measured = json.loads(result.stdout)  # --json: the object alone on stdout
    assert measured["train_steps"] == 2 and {"acc_1x", "test_acc_1x", "train_loss"} <= set(measured)
    as_table = run_cli("--plugin", str(tmp_path / "streamfail.py"), "train", str(path), "--no-progress",
                       "--no-eval-log", cwd=tmp_path)
    assert as_table.returncode == 1, as_table.stderr
    assert "trial.yaml: group / psm: the trial failed; what it measured before the failure:" in as_table.stdout
    assert "train_steps" in as_table.stdout and "{" not in as_table.stdout


FAILING_CONSTRUCTORS = '''
from psmsearch import hookimpl
from psmsearch.plugins.token_state import MLPAggregator

class BuildFails(MLPAggregator):
    name = "buildfails"

    def __init__(self, context, **hparams):
        super().__init__(context, **hparams)
        raise RuntimeError("cannot build")

class RejectsItsArguments(MLPAggregator):
    name = "rejects"

    def __init__(self, context, **hparams):
        super().__init__(context, **hparams)
        raise ValueError("mlp_ratio 4 needs d_model >= 64")

@hookimpl
def register_aggregators(register):
    register(BuildFails)
    register(RejectsItsArguments)
'''


def test_a_component_whose_constructor_fails_is_a_trial_failure_naming_its_plugin_line(tmp_path: Path) -> None:
    """It was a configuration error (exit 2) naming neither the component's plugin line nor a phase, and
    ``--traceback`` did nothing; a search over ``[buildfails, mlp]`` was refused as a whole."""
    from clihelpers import run_cli

    plugin = tmp_path / "constructors.py"
    plugin.write_text(FAILING_CONSTRUCTORS)
    config = write(tmp_path, {**TINY, "model": {**TINY["model"], "aggregator": "buildfails"}})
    result = run_cli("--plugin", str(plugin), "train", str(config), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trial failed in building the model: RuntimeError: cannot build (at {plugin}:10 in __init__)"), last
    traced = run_cli("--plugin", str(plugin), "train", str(config), "--no-progress", "--traceback", cwd=tmp_path)
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr, traced.stderr


def test_validation_reports_a_rejected_argument_and_leaves_other_constructor_failures_to_the_trial(
        tmp_path: Path, fresh_registry) -> None:
    from psmsearch.composer import validate_model_config
    from psmsearch.config import ModelConfig

    plugin = tmp_path / "constructors.py"
    plugin.write_text(FAILING_CONSTRUCTORS)
    fresh_registry.use_plugins([str(plugin)])
    validate_model_config(ModelConfig(d_model=16, chunk_size=2, aggregator="buildfails"))  # the trial reports it
    with pytest.raises(ConfigError, match=r"model.aggregator: mlp_ratio 4 needs d_model >= 64$"):
        validate_model_config(ModelConfig(d_model=16, chunk_size=2, aggregator="rejects"))


def test_a_chunk_size_that_leaves_under_3_chunks_warns_that_the_aggregator_is_never_trained(tmp_path: Path) -> None:
    """With 1 or 2 chunks per training sequence no prefix needs agg (p_1 is x_0 itself): the aggregator's
    combining parameters got no gradient, silently, and trials differing only in it trained the same function."""
    path = write(tmp_path, TINY)
    warnings: list[str] = []
    load_trial_config(path, ["model.chunk_size=3"], warn=warnings.append)
    assert warnings == ["--set model.chunk_size: chunk size 3 leaves fewer than 3 chunks in a training sequence of 6 "
                        "tokens (task.train_length), so the aggregator is never called in training (it first combines "
                        "chunks 0 and 1, for the prefix of chunk 2): what agg computes gets no gradient (only its "
                        "initial_state, the prefix of chunk 0, is read), and trials that differ only in the aggregator "
                        "train the same function; chunk sizes up to 2 give 3 chunks or more"]
    warnings.clear()
    load_trial_config(path, warn=warnings.append)  # chunk_size 2: three chunks
    assert warnings == []


@pytest.mark.parametrize("length", range(1, 14))
def test_the_unused_aggregator_rule_matches_the_calls_a_layer_makes(length: int) -> None:
    """Against an independent count: the aggregator calls of a real layer's training pass."""
    import torch

    from psmsearch.composer import PSMLayer
    from psmsearch.config import ModelConfig
    from psmsearch.trial import unused_aggregator_message

    for chunk_size in range(1, length + 1):
        layer = PSMLayer.from_config(ModelConfig(d_model=8, chunk_size=chunk_size, encoder="embed", aggregator="mlp",
                                                 head={"name": "attention", "heads": 2}))
        calls = []
        layer.aggregator.register_forward_hook(lambda module, args, out: calls.append(1))
        layer(torch.randn(1, length, 8), scan_mode="tree")
        warned = unused_aggregator_message([chunk_size], length, "train_length") is not None
        assert warned == (not calls), (length, chunk_size, len(calls))


def test_a_flat_set_on_a_component_written_with_params_points_under_params(tmp_path: Path) -> None:
    """A trial's recorded config writes {name, params: {...}}; ``--set model.aggregator.heads=1`` then said only
    "unknown field 'heads'; allowed: name, params"."""
    nested = {**TINY, "model": {**TINY["model"], "aggregator": {"name": "attention", "params": {"layers": 1, "heads": 2}}}}
    path = write(tmp_path, nested)
    with pytest.raises(ConfigError, match=r"^--set model\.aggregator\.heads: unknown field 'heads'; allowed: name, "
                                          r"params\. Its hyperparameters go under params: model\.aggregator\.params\.heads"):
        load_trial_config(path, ["model.aggregator.heads=1"])
    assert load_trial_config(path, ["model.aggregator.params.heads=1"]).model.aggregator.params["heads"] == 1
    with pytest.raises(ConfigError, match=r"unknown field 'nmae'; allowed: name, params\. Did you mean 'name'\?$"):
        load_trial_config(path, ["model.aggregator.nmae=mlp"])  # a typo of name gets no word of params

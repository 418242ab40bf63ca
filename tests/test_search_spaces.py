"""Every shipped search space is valid and smoke-samples into valid trials, and sampling is conditional."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from psmsearch.errors import ConfigError
from psmsearch.registry import get_registry
from psmsearch.space import kind_suffix, load_space, smoke_sample
from searchhelpers import TINY_SPACE

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_the_shipped_spaces_are_all_here() -> None:
    assert {p.name for p in SPACES} >= {"quick.yaml", "s5_gpu.yaml", "mqar.yaml", "lm_chunk_size.yaml", "wikitext103.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_space_validates_and_smoke_samples(path: Path) -> None:
    space = load_space(path, smoke_samples=2)
    configs = smoke_sample(space, 16)
    assert len(configs) == 16
    assert space.warnings == []  # every shipped objective goes its metric's natural way


def test_yaml_1_2_floats_are_floats_in_a_range(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-3 as the string '1e-3': a range written so was refused as not numbers."""
    import yaml

    text = yaml.safe_dump(TINY_SPACE, sort_keys=False).replace(
        "train:\n", "train:\n  lr: {float: [1e-3, 1E-2], log: true}\n  weight_decay: {choice: [2e-4, 5E-1, 1.5e-1]}\n")
    path = tmp_path / "space.yaml"
    path.write_text(text)
    space = load_space(path, smoke_samples=2)
    lr, decay = space.dimensions()[-2:]
    assert (lr.path, lr.low, lr.high, lr.log) == ("train.lr", 0.001, 0.01, True)
    assert decay.choices == [0.0002, 0.5, 0.15] and all(type(c) is float for c in decay.choices)


def test_the_project_loader_leaves_pyyaml_alone() -> None:
    """The YAML 1.2 floats are a loader subclass's: ``yaml.safe_load`` (other libraries' too) is unchanged."""
    import yaml

    from psmsearch.yamlio import parse_yaml

    text = "a: 1e-3\nb: 1.0e-3\nc: '1e-3'\nd: 1e3x\ne: 7\nf: .inf\ng: -2e-4\nh: +1E5\n"
    assert parse_yaml(text, "x.yaml")[0] == {"a": 0.001, "b": 0.001, "c": "1e-3", "d": "1e3x", "e": 7, "f": float("inf"),
                                             "g": -0.0002, "h": 100000.0}
    assert yaml.safe_load(text)["a"] == "1e-3"


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_sampled_components_are_always_compatible(path: Path) -> None:
    registry = get_registry()
    space = load_space(path, smoke_samples=1)
    for config in smoke_sample(space, 24):
        model = config["model"]
        if model.get("kind", "psm") != "psm":
            assert not {"encoder", "aggregator", "head", "chunk_size"} & set(model), "a baseline gets no PSM fields"
            continue
        kinds = {registry.get(kind, model[kind]["name"]).state_kind for kind in ("encoder", "aggregator", "head")}
        assert len(kinds) == 1, model


def test_component_hyperparameters_are_conditional() -> None:
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "mqar.yaml", smoke_samples=1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        config = space.sample(trial)
        aggregator = config["model"]["aggregator"]
        layers_param = [k for k in trial.params if k.endswith("attention.layers")]
        assert bool(layers_param) == (aggregator["name"] == "attention"), (aggregator, trial.params)
        seen.add(aggregator["name"])
        study.tell(trial, 0.0)
    assert len(seen) >= 3


def test_fixed_trial_rebuilds_the_same_configuration() -> None:
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "s5_gpu.yaml", smoke_samples=1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    sampled = space.sample(trial)
    assert space.sample(optuna.trial.FixedTrial(trial.params)) == sampled


def test_quick_space_has_a_complete_grid() -> None:
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml", smoke_samples=1)
    assert space.grid() == {"model.chunk_size": [1, 2, 4], "model.aggregator": ["attention", "mlp"]}
    assert space.warnings == []  # every chunk size leaves 3 chunks or more: each trains its aggregator
    assert space.header.driver.trials == 6


@pytest.mark.parametrize("seed", [0, 7])
def test_a_resumed_grid_search_runs_every_point_once(tmp_path: Path, seed: int) -> None:
    """``make demo``'s quick grid, interrupted after four trials and resumed as the driver resumes it (a
    new sampler, the interrupted trial enqueued again). The resumed sampler was reseeded, which reshuffles
    the grid the trials' recorded indices refer to: points ran twice, others never. And the re-queued
    trial, finishing with one point left, had no index for Optuna to read (KeyError: 'grid_id')."""
    from optuna.trial import TrialState

    from psmsearch.optuna_driver import INTERRUPTED, _requeue_interrupted, make_sampler

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml", smoke_samples=1)
    space.header.driver.seed = seed
    storage = f"sqlite:///{tmp_path / 'grid.db'}"

    def objective(trial: optuna.Trial) -> float:
        space.sample(trial)
        return 0.0

    study = optuna.create_study(storage=storage, study_name="quick", sampler=make_sampler(space))
    study.optimize(objective, n_trials=4)
    interrupted = study.ask()
    space.sample(interrupted)
    interrupted.set_user_attr("state", INTERRUPTED)  # as the driver marks a trial the stop cut short
    study.tell(interrupted, state=TrialState.FAIL)

    resumed = optuna.load_study(study_name="quick", storage=storage, sampler=make_sampler(space, len(study.trials)))
    assert _requeue_interrupted(resumed, None) == 1
    resumed.optimize(objective, n_trials=2)  # the budget left: 6 trials, 4 counted
    points = sorted((t.params["model.chunk_size"], t.params["model.aggregator"])
                    for t in resumed.trials if t.state == TrialState.COMPLETE)
    assert points == sorted((c, a) for c in (1, 2, 4) for a in ("attention", "mlp")), points


def test_grid_refuses_continuous_dimensions() -> None:
    from psmsearch.errors import ConfigError

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "mqar.yaml", smoke_samples=1)
    with pytest.raises(ConfigError, match=r"mqar.yaml:\d+: train.lr: sampler 'grid' needs choice dimensions only"):
        space.grid()


def test_model_fields_are_sampled_only_for_the_kinds_that_read_them(tmp_path: Path) -> None:
    """A GPT trial once sampled (and logged) a chunk size and an encoder it ignores: duplicate trials."""
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "s5_gpu.yaml", smoke_samples=1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    kinds = set()
    for _ in range(20):
        trial = study.ask()
        model = space.sample(trial)["model"]
        kinds.add(model["kind"])
        if model["kind"] == "gpt":
            assert set(model) == {"kind", "d_model", "n_layers"}
            assert not any(name in trial.params for name in ("model.chunk_size", "model.encoder", "model.head"))
        else:
            assert {"chunk_size", "encoder", "aggregator", "head"} <= set(model) and "model.chunk_size" in trial.params
        study.tell(trial, 0.0)
    assert kinds == {"psm", "gpt"}


def test_a_searched_field_no_model_kind_reads_is_an_error(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml").read_text())
    data["model"]["n_heads"] = {"choice": [2, 4]}   # read by gpt and swa only, and the kind is psm
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"model\.n_heads: searched, but model.kind psm never reads it \(read by: gpt, swa\)"):
        load_space(path)


@pytest.mark.parametrize(("kind", "expected"), [
    ("psm", r"model\.n_heads: set, but model.kind psm never reads it \(read by: gpt, swa\); drop it \(a PSM's "
            r"attention heads are its components' hyperparameters"),
    ({"choice": ["psm", "gpt"]}, None),  # gpt trials read it
])
def test_a_fixed_field_no_model_kind_reads_is_an_error(tmp_path: Path, kind: object, expected: str | None) -> None:
    """``n_heads: 8`` under ``kind: psm`` validated and then changed nothing."""
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml").read_text())
    data["model"]["kind"] = kind
    data["model"]["n_heads"] = 8
    data["driver"]["sampler"] = "random"  # a grid cannot search the kind (only psm trials have components)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if expected is None:
        load_space(path)
    else:
        with pytest.raises(ConfigError, match=expected):
            load_space(path)


def test_every_model_field_belongs_to_some_kind() -> None:
    """Sampling drops the fields a kind does not read: a new ModelConfig field must be classified."""
    from psmsearch.config import MODEL_FIELDS, ModelConfig

    assert MODEL_FIELDS == set(ModelConfig.model_fields)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("chunk_sise", 16, r"unknown field 'chunk_sise'"),              # a misspelled fixed field is not dropped
    ("kind", ["psm"], r"model\.kind"),                              # an odd kind is a config error, not a crash
])
def test_malformed_model_fields_are_config_errors(tmp_path: Path, key: str, value: object, message: str) -> None:
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml").read_text())
    data["model"][key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=message):
        load_space(path)


def _space_with(tmp_path: Path, **model: object) -> Path:
    """TINY_SPACE with these ``model`` fields, written to ``space.yaml``."""
    import yaml

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPACE, "model": {**TINY_SPACE["model"], **model}}, sort_keys=False))
    return path


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(text))


@pytest.mark.parametrize(("model", "field", "line", "message"), [
    ({"aggregator": {"choice": [{"name": "mlp", "mlp_ratio": {"float": [1.0, 4.0]}}, "attention"]}},
     "model.aggregator.choice.0.mlp_ratio", "mlp_ratio:", "mlp_ratio is an int hyperparameter; use {int: [lo, hi]}, not a float range"),
    ({"aggregator": {"name": "attention", "heads": {"float": [1, 8]}}},
     "model.aggregator.heads", "heads:", "heads is a categorical hyperparameter; use {choice: [...]} among 1, 2, 4, 8, not a float range"),
    ({"encoder": "linear_attention", "aggregator": "affine_scalar", "head": {"name": "linear_readout_scalar", "norm": {"int": [0, 1]}}},
     "model.head.norm", "norm:", "norm is a bool hyperparameter; use {choice: [false, true]}, not an int range"),
], ids=["float-range-on-int", "float-range-on-categorical", "int-range-on-bool"])
def test_a_range_of_the_wrong_kind_is_refused_at_the_dimensions_line(
        tmp_path: Path, model: dict, field: str, line: str, message: str) -> None:
    """A float range on an int hyperparameter passed (its bounds are whole numbers) and its first sampled
    value failed at another line: ``model.aggregator.mlp_ratio: ... 2.937... is not an integer``."""
    path = _space_with(tmp_path, **model)
    with pytest.raises(ConfigError) as refused:
        load_space(path, smoke_samples=1)
    assert str(refused.value) == f"{path}:{_line_of(path, line)}: {field}: {message}"


def test_an_int_range_on_a_float_hyperparameter_is_allowed(tmp_path: Path) -> None:
    path = _space_with(tmp_path, encoder={"name": "gla", "gate_temperature": {"int": [1, 8]}}, aggregator="affine_diag",
                       head="linear_readout_diag")
    assert all(isinstance(c["model"]["encoder"]["gate_temperature"], int) for c in smoke_sample(load_space(path), 4))


def test_an_unknown_hyperparameter_suggests_the_close_one(tmp_path: Path) -> None:
    path = _space_with(tmp_path, aggregator={"name": "attention", "layer": 1, "heads": 2})
    with pytest.raises(ConfigError, match=r"model\.aggregator\.layer: aggregator 'attention' has no hyperparameter "
                                          r"'layer'; allowed: heads, layers, mlp_ratio\. Did you mean 'layers'\?$"):
        load_space(path, smoke_samples=1)


@pytest.mark.parametrize(("model", "shown"), [
    ({"chunk_size": {"choice": [4, "8"]}}, r"model\.chunk_size: choice value '8' is a str; model\.chunk_size takes int values"),
    ({"d_model": {"choice": [16, True]}}, r"model\.d_model: choice value True is a bool; model\.d_model takes int values"),
    ({"n_layers": {"choice": [1, 2.5]}}, r"model\.n_layers: choice value 2\.5 is a float; model\.n_layers takes int values"),
    ({"dropout": {"choice": [0.0, "0.1"]}}, r"model\.dropout: choice value '0\.1' is a str; model\.dropout takes float values"),
])
def test_a_choice_value_of_the_wrong_type_for_a_model_field_is_refused_at_its_line(
        tmp_path: Path, model: dict, shown: str) -> None:
    """The trial validator coerced, so ``chunk_size: {choice: [4, "8"]}`` validated and Optuna stored
    the distribution ``(4, '8')``; such a choice is now refused as one for a component's hyperparameter is."""
    path = _space_with(tmp_path, **model)
    field = next(iter(model))
    with pytest.raises(ConfigError, match=rf"space\.yaml:{_line_of(path, field + ':')}: {shown}"):
        load_space(path)


def test_a_float_field_takes_int_choices(tmp_path: Path) -> None:
    space = load_space(_space_with(tmp_path, dropout={"choice": [0, 0.1]}), smoke_samples=1)
    assert {d.path: d.choices for d in space.dimensions()}["model.dropout"] == [0, 0.1]


@pytest.mark.parametrize(("state_kind", "suffix"), [
    ("tokens", "-tokens"), ("affine-scalar", "-affine-scalar"), ("my kind/v2[x]", "-my_kind_v2_x_"), ("a.b_c", "-a.b_c"),
])
def test_a_state_kind_becomes_a_parameter_suffix_mlflow_and_ray_accept(state_kind: str, suffix: str) -> None:
    """Spaces, slashes (Ray splits keys on them) and brackets (MLflow refuses them) become underscores."""
    assert kind_suffix(state_kind) == suffix


def test_a_plain_list_of_components_searches_each_ones_own_hyperparameters(tmp_path: Path) -> None:
    """DESIGN.md §3's ``aggregator: [attention, mlp]`` was refused ("a component is a name or a mapping");
    it is the short form of a choice with ``search: all``, a mapping entry fixing what it names."""
    import optuna
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml").read_text())
    data["driver"]["sampler"] = "random"
    data["model"]["aggregator"] = ["mlp", {"name": "attention", "layers": 1}]
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(data, sort_keys=False))
    data["model"]["aggregator"] = {"choice": [{"name": "mlp", "search": "all"},
                                             {"name": "attention", "layers": 1, "search": "all"}]}
    long = tmp_path / "long.yaml"
    long.write_text(yaml.safe_dump(data, sort_keys=False))
    space = load_space(short)
    assert space.dimension_record() == load_space(long).dimension_record()
    assert "model.aggregator.mlp.mlp_ratio" in space.dimension_record()
    assert "model.aggregator.attention.layers" not in space.dimension_record()  # fixed by its entry
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        aggregator = space.sample(trial)["model"]["aggregator"]
        seen.add(aggregator["name"])
        searched = {k.rsplit(".", 1)[1] for k in trial.params if k.startswith("model.aggregator.")}
        assert searched == ({"mlp_ratio"} if aggregator["name"] == "mlp" else {"heads", "mlp_ratio"})
        study.tell(trial, 0.0)
    assert seen == {"mlp", "attention"}


MLP_FIXED = {"name": "mlp", "mlp_ratio": 1}
ATTENTION_FIXED = {"name": "attention", "layers": 1, "heads": 2, "mlp_ratio": 1}
GLA_FIXED = {"name": "gla", "heads": 2, "key_dim": 8, "value_dim": 8, "feature_map": "identity", "output_gate": False,
             "gate_rank": 4, "gate_temperature": 16.0}


@pytest.mark.parametrize(("model", "components"), [
    ({"encoder": ["embed", {"name": "pool", "state_tokens": 2, "heads": 2}], "aggregator": [MLP_FIXED, ATTENTION_FIXED],
      "head": [ATTENTION_FIXED]},
     {"model.encoder": ["embed", "pool"], "model.aggregator": ["mlp", "attention"]}),
    # components that declare no hyperparameters (embed, affine_diag) leave nothing to search either
    ({"encoder": ["embed"], "aggregator": [MLP_FIXED, ATTENTION_FIXED], "head": ATTENTION_FIXED},
     {"model.aggregator": ["mlp", "attention"]}),
    ({"encoder": [GLA_FIXED], "aggregator": ["affine_diag"], "head": [{"name": "linear_readout_diag", "norm": True,
                                                                        "gate_before_norm": False}]},
     {}),
], ids=["tokens", "no-hyperparameters", "affine-diag"])
def test_a_grid_over_plain_lists_of_fixed_components_is_exactly_the_listed_combinations(
        tmp_path: Path, model: dict, components: dict) -> None:
    """A plain list stands for ``search: all`` on each entry, and grid refused it at its entry even where
    every entry fixes all its component declares (or it declares none), a finite grid. The grid is now
    the listed components crossed with the other choices, and a grid search draws each point once,
    each component with the values its entry fixes and nothing else."""
    import itertools

    path = _space_with(tmp_path, **model)
    text = path.read_text().replace("  pruner: none\n", "  pruner: none\n  sampler: grid\n")
    path.write_text(text)
    space = load_space(path, smoke_samples=2)
    grid = {"model.chunk_size": [1, 2, 4], **components}
    assert space.grid() == grid
    points = []

    def objective(trial: optuna.Trial) -> float:
        config = space.sample(trial)
        assert set(trial.params) == set(grid), "a grid trial drew a parameter outside the grid"
        points.append(tuple(trial.params[name] for name in grid))
        for kind in ("encoder", "aggregator", "head"):
            listed = model[kind] if isinstance(model[kind], list) else [model[kind]]
            entry = next(e for e in listed if (e if isinstance(e, str) else e["name"]) == config["model"][kind]["name"])
            assert config["model"][kind] == ({"name": entry} if isinstance(entry, str) else entry)
        return 0.0

    study = optuna.create_study(sampler=optuna.samplers.GridSampler(space.grid(), seed=0))
    expected = sorted(itertools.product(*grid.values()))
    study.optimize(objective, n_trials=2 * len(expected))  # the grid stops the study once every point ran
    assert sorted(points) == expected


@pytest.mark.parametrize(("aggregator", "field", "line", "message"), [
    (["mlp", "attention"], "model.aggregator.0", "- mlp",
     "sampler 'grid' needs fixed component hyperparameters, but a plain list of components searches every "
     "hyperparameter an entry does not fix: aggregator 'mlp' leaves mlp_ratio open (mlp_ratio: {int: [1, 8]}); "
     "write {name: mlp, mlp_ratio: 2} to keep it in the grid (its declared default filled in), or use sampler "
     "random or tpe to search it"),
    ([MLP_FIXED, {"name": "attention", "layers": 1}], "model.aggregator.1", "- name: attention",
     "aggregator 'attention' leaves heads and mlp_ratio open (heads: {choice: [1, 2, 4, 8]}, mlp_ratio: {int: [1, 8]}); "
     "write {name: attention, layers: 1, heads: 4, mlp_ratio: 2} to keep it in the grid (their declared defaults "
     "filled in), or use sampler random or tpe to search them"),
    ({"choice": [{"name": "mlp", "search": "all"}, "attention"]}, "model.aggregator.choice.0", "- name: mlp",
     "but search: all searches every hyperparameter the entry does not fix: aggregator 'mlp' leaves mlp_ratio open "
     "(mlp_ratio: {int: [1, 8]}); write {name: mlp, mlp_ratio: 2} (without search: all) to keep it in the grid"),
    ([{"name": "mlp", "mlp_ratio": {"choice": [1, 2]}}, ATTENTION_FIXED], "model.aggregator.0.mlp_ratio", "mlp_ratio:",
     "sampler 'grid' needs fixed component hyperparameters; mlp_ratio is a dimension here, drawn only when aggregator "
     "'mlp' is chosen (a conditional parameter, which a grid cannot hold): fix it to one value"),
], ids=["list-entry-by-name", "list-entry-partly-fixed", "search-all", "dimension-in-entry"])
def test_a_grid_refuses_a_component_entry_that_leaves_a_hyperparameter_open(
        tmp_path: Path, aggregator: object, field: str, line: str, message: str) -> None:
    """The grid holds one list of parameters for every trial; a hyperparameter searched only when its
    component is chosen cannot be in it. The error names the file, the entry's line and path, what is
    open and the entry to write instead."""
    import re

    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml").read_text())
    data["model"]["aggregator"] = aggregator
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    assert str(caught.value).startswith(f"{path}:{_line_of(path, line)}: {field}: sampler 'grid' needs fixed component "
                                        "hyperparameters")
    assert message in str(caught.value)
    data["model"]["aggregator"] = []
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape("model.aggregator: an empty list of components; name at least one")):
        load_space(path)


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])
def test_the_other_samplers_search_what_a_plain_list_leaves_open(tmp_path: Path, sampler: str) -> None:
    """Only the grid needs the entries fixed: the other samplers take the list as the short form of
    ``search: all`` and draw each component's open hyperparameters, and none where an entry fixes all."""
    from psmsearch.optuna_driver import make_sampler

    for aggregator, searched in (([{"name": "mlp", "mlp_ratio": 1}, "attention"],
                                  {"mlp": set(), "attention": {"layers", "heads", "mlp_ratio"}}),
                                 ([MLP_FIXED, ATTENTION_FIXED], {"mlp": set(), "attention": set()})):
        path = _space_with(tmp_path, aggregator=aggregator)
        path.write_text(path.read_text().replace("  pruner: none\n", f"  pruner: none\n  sampler: {sampler}\n"))
        space = load_space(path, smoke_samples=2)
        assert space.header.driver.sampler == sampler
        study = optuna.create_study(sampler=make_sampler(space))
        seen = set()
        for _ in range(16):
            trial = study.ask()
            name = space.sample(trial)["model"]["aggregator"]["name"]
            seen.add(name)
            assert {k.rsplit(".", 1)[1] for k in trial.params if k.startswith("model.aggregator.")} == searched[name]
            study.tell(trial, 0.0)
        assert seen == {"mlp", "attention"}

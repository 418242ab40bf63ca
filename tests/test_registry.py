"""Plugin loading: built-ins as ordinary plugins, local paths, env var, failures isolated."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from psmsearch.errors import UnknownComponentError

FIXTURES = Path(__file__).parent / "fixtures"


def test_builtins_load_through_the_default_plugin_list(fresh_registry) -> None:
    registry = fresh_registry.load_registry()
    assert registry.failures == []
    assert "psmsearch.plugins.token_state" in registry.plugins
    for kind, name in [("encoder", "embed"), ("encoder", "pool"), ("aggregator", "attention"), ("aggregator", "mlp"), ("head", "attention")]:
        info = registry.get(kind, name)
        assert info.plugin == "psmsearch.plugins.token_state"
        assert info.state_kind == "tokens"


def test_unknown_name_suggests_close_matches(fresh_registry) -> None:
    registry = fresh_registry.load_registry()
    with pytest.raises(UnknownComponentError, match=r"unknown aggregator 'atention'\. Did you mean 'attention'\?"):
        registry.get("aggregator", "atention")


def test_a_hyperparameter_error_survives_pickling_and_copying() -> None:
    """Components raise it; Ray workers and multiprocessing pickle what they raise (the name was lost)."""
    import copy
    import pickle

    from psmsearch.errors import HyperParameterError

    err = HyperParameterError("aggregator 'x' hyperparameter 'layers': 9 is out of range", "layers")
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert type(again) is HyperParameterError and str(again) == str(err) and again.name == "layers"


@pytest.mark.parametrize(("typed", "suggested"), [
    ("atention", ["attention", "linear_attention"]),
    ("gal", ["gla"]),
    ("linear", ["linear_attention", "linear_readout_dense", "linear_readout_diag"]),
    ("mamba3", ["mamba", "mamba2"]),
    ("typohook", []),  # was 'pool': a loose ratio suggested unrelated names
])
def test_suggestions_are_typos_or_abbreviations_of_registered_names(fresh_registry, typed: str,
                                                                    suggested: list[str]) -> None:
    from psmsearch.errors import close_matches

    registry = fresh_registry.load_registry()
    names = sorted({name for kind in ("encoder", "aggregator", "head") for name in registry.names(kind)})
    assert close_matches(typed, names, 3) == suggested


@pytest.mark.parametrize(
    "fixture, expected",
    [
        ("broken_import.py", "ModuleNotFoundError: No module named 'psmsearch_this_module_does_not_exist'"),
        ("broken_hook.py", "RuntimeError: the plugin's own bug"),
        ("not_a_component.py", f"is not a subclass of psmsearch.Aggregator (at {FIXTURES / 'not_a_component.py'}:8)"),
        ("missing_file.py", "no such plugin file or folder"),
    ],
)
def test_a_broken_plugin_is_reported_and_the_rest_still_load(fresh_registry, fixture: str, expected: str) -> None:
    path = FIXTURES / fixture
    registry = fresh_registry.load_registry(extra_plugins=[str(path), str(FIXTURES / "broken_components.py")])
    failures = [f for f in registry.failures if fixture in f.plugin]
    assert len(failures) == 1, registry.failures
    assert expected in failures[0].error
    # everything else loaded: the built-ins and the other local plugin
    assert registry.get("aggregator", "attention").plugin == "psmsearch.plugins.token_state"
    assert registry.get("aggregator", "zz_nan").plugin.endswith("broken_components.py")


def test_a_name_registered_twice_is_an_error_naming_both_plugins(fresh_registry) -> None:
    registry = fresh_registry.load_registry(extra_plugins=[str(FIXTURES / "duplicate_name.py")])
    (failure,) = registry.failures
    assert "aggregator 'attention' is registered twice" in failure.error
    assert re.search(r"by plugin 'psmsearch\.plugins\.token_state' \(at .*token_state\.py:\d+\) and by plugin "
                     r"'.*duplicate_name\.py' \(at .*duplicate_name\.py:\d+\)", failure.error), failure.error
    assert registry.get("aggregator", "attention").plugin == "psmsearch.plugins.token_state"


def test_env_var_loads_modules_and_paths(fresh_registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv(fresh_registry.ENV_VAR, f"broken_components, {FIXTURES / 'duplicate_name.py'}")
    registry = fresh_registry.load_registry()
    assert registry.get("head", "zz_peeking").plugin == "broken_components"
    assert any("duplicate_name.py" in f.plugin for f in registry.failures)


def test_use_plugins_exports_absolute_paths_for_child_processes(fresh_registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)
    registry = fresh_registry.use_plugins(["broken_components.py"])
    assert registry.get("aggregator", "zz_wrong_shape")
    import os

    assert os.environ[fresh_registry.ENV_VAR] == str(FIXTURES / "broken_components.py")


def test_a_package_folder_shadowed_by_a_loaded_module_is_reported(fresh_registry, tmp_path: Path) -> None:
    for index in (1, 2):
        package = tmp_path / f"p{index}" / "plugins"
        package.mkdir(parents=True)
        package.joinpath("__init__.py").write_text(
            "from psmsearch import hookimpl\n"
            "from psmsearch.plugins.token_state import MLPAggregator\n"
            f"class Agg(MLPAggregator):\n    name = 'agg_{index}'\n"
            "@hookimpl\ndef register_aggregators(register):\n    register(Agg)\n"
        )
    registry = fresh_registry.load_registry(extra_plugins=[str(tmp_path / "p1" / "plugins"), str(tmp_path / "p2" / "plugins")])
    assert registry.get("aggregator", "agg_1")
    (failure,) = registry.failures
    assert str(tmp_path / "p2" / "plugins") in failure.plugin
    assert "already loaded from" in failure.error and "rename the folder" in failure.error


def test_each_bad_declaration_is_named_and_the_plugins_other_classes_still_load(fresh_registry) -> None:
    """A missing trailing comma once raised a TypeError out of the hook and took the plugin's other
    classes with it; bad bounds only surfaced as a sampler traceback in the middle of a search."""
    path = str(FIXTURES / "declaration_mistakes.py")
    registry = fresh_registry.load_registry(extra_plugins=[path])
    failures = [f.error for f in registry.failures if f.plugin == path]
    assert all(re.search(rf" \(at {re.escape(path)}:\d+\)$", error) for error in failures), failures
    errors = sorted(error.rsplit(" (at ", 1)[0] for error in failures)
    expected = [
        "aggregator 'declared_twice': hyperparameter 'ratio' is declared twice",
        "aggregator 'default_out_of_range': hyperparameter 'ratio': default 16 is out of range; expected int in [1, 8]",
        "aggregator 'log_from_zero': hyperparameter 'eps': log=True needs low > 0, got low=0.0",
        "aggregator 'low_above_high': hyperparameter 'width': low=4 is greater than high=1",
        "aggregator 'no_trailing_comma': hyperparameters must be a sequence of psmsearch.HyperParameter, got a "
        "single HyperParameter (a one-element tuple needs a trailing comma: (HyperParameter(...),))",
        "aggregator 'reserved_context': hyperparameter 'context' has a reserved name (a component is built as "
        "cls(context, **hyperparameters)), so it could never be set; rename it",
        "aggregator 'reserved_name': hyperparameter 'params' has a reserved name (a config nests them under params), "
        "so it could never be set; rename it",
        "aggregator 'unknown_type': hyperparameter 'eps': type 'double' is not one of int, float, categorical, bool",
        "task 'no_evaluate' does not define evaluate(model, device, batch_size), which every task must (see the "
        "docstring of psmsearch.tasks.Task)",
        "task 'seed_option': option 'seed' has a reserved name (a task is built as Task(seed=..., **params), with "
        "the trial's seed), so it could never be set; rename it",
        "task 'seeded_task': hyperparameter 'seed' has a reserved name (a task is built as Task(seed=..., "
        "**params), with the trial's seed), so it could never be set; rename it",
    ]
    assert errors == expected, registry.failures
    assert registry.get("aggregator", "good_sum").plugin == path
    assert "attention" in registry.names("aggregator")


def test_hooks_that_would_do_nothing_are_reported(fresh_registry) -> None:
    mistakes, empty = str(FIXTURES / "hook_mistakes.py"), str(FIXTURES / "no_hooks.py")
    registry = fresh_registry.load_registry(extra_plugins=[mistakes, empty])
    by_plugin = {(f.plugin, f.error) for f in registry.failures}
    assert (mistakes, "register_aggregator (line 6) is not a psmsearch hook; did you mean 'register_aggregators'? (hooks: "
            "register_aggregators, register_encoders, register_heads, register_tasks)") in by_plugin
    assert (mistakes, "register_heads is not marked with @psmsearch.hookimpl, so it is never called (put "
            f"@psmsearch.hookimpl on the line above its def) (at {mistakes}:11)") in by_plugin
    assert any(plugin == empty and error.startswith("defines no psmsearch hook, so it registers nothing")
               for plugin, error in by_plugin), registry.failures
    assert len(registry.failures) == 3, registry.failures


def test_hooks_with_other_arguments_are_named_with_the_signature_to_use(fresh_registry) -> None:
    extra, without = FIXTURES / "hook_extra_argument.py", FIXTURES / "hook_without_register.py"
    registry = fresh_registry.load_registry(extra_plugins=[str(extra), str(without)])
    errors = {f.plugin: f.error for f in registry.failures}
    assert "Argument(s) {'extra'} are declared in the hookimpl" in errors[str(extra)]
    assert errors[str(extra)].endswith(f"a hook takes one argument: define it as register_aggregators(register) (at {extra}:6)")
    assert errors[str(without)] == ("register_heads() takes no register argument, so it cannot register anything: "
                                    f"define it as register_heads(register) (at {without}:6)")  # the decorator's line
    assert "attention" in registry.names("aggregator"), "the built-ins still load"


def test_an_import_failure_names_the_plugins_own_line(fresh_registry) -> None:
    path = FIXTURES / "raises_deep.py"
    registry = fresh_registry.load_registry(extra_plugins=[str(path)])
    (failure,) = registry.failures
    line = next(number for number, text in enumerate(path.read_text().splitlines(), 1) if "missing_key" in text)
    assert failure.error == f"KeyError: 'missing_key' (at {path}:{line})"
    assert "Traceback" in failure.detail


def test_a_declaration_missing_choices_or_a_bound_is_named_at_its_line(fresh_registry) -> None:
    """``HyperParameter("mode", "categorical", 1)`` or a float without ``high`` raised while the module was
    imported: the error named neither component nor line, and the plugin's good aggregator was lost."""
    path = FIXTURES / "bad_categorical.py"
    registry = fresh_registry.load_registry(extra_plugins=[str(path)])
    lines = path.read_text().splitlines()
    line_of = {name: next(n for n, text in enumerate(lines, 1) if f'HyperParameter("{name}"' in text)
               for name in ("mode", "ratio")}
    assert sorted(f.error for f in registry.failures) == [
        "aggregator 'no_choices': hyperparameter 'mode': a categorical parameter needs choices=(...), the values "
        f"it may take (at {path}:{line_of['mode']})",
        "aggregator 'no_high': hyperparameter 'ratio': high missing: float parameters need low= and high=, the "
        f"range a search samples from (at {path}:{line_of['ratio']})",
    ]
    assert registry.get("aggregator", "fine_sum").plugin == str(path)


def test_a_component_without_a_required_method_fails_to_register(fresh_registry, tmp_path: Path) -> None:
    """An aggregator without ``initial_state`` registered, listed and built, then failed every trial of a
    search; now the plugin's load reports it, located at the class, and its other components load."""
    plugin = tmp_path / "no_initial.py"
    plugin.write_text(
        "from psmsearch import Aggregator, Head, hookimpl\n"
        "class NoInitial(Aggregator):\n"
        "    name = 'no_initial'\n"
        "    state_kind = 'tokens'\n"
        "    def forward(self, older, newer):\n"
        "        return newer\n"
        "class NoForward(Head):\n"
        "    name = 'no_forward'\n"
        "    state_kind = 'tokens'\n"
        "class Fine(NoInitial):\n"
        "    name = 'fine'\n"
        "    def initial_state(self, batch_shape):\n"
        "        return None\n"
        "@hookimpl\n"
        "def register_aggregators(register):\n"
        "    register(NoInitial)\n"
        "    register(Fine)\n"
        "@hookimpl\n"
        "def register_heads(register):\n"
        "    register(NoForward)\n"
    )
    registry = fresh_registry.load_registry(extra_plugins=[str(plugin)])
    assert sorted(f.error for f in registry.failures) == [
        "aggregator 'no_initial' does not define initial_state(batch_shape), which every aggregator must (see the "
        f"docstring of psmsearch.Aggregator) (at {plugin}:2)",
        "head 'no_forward' does not define forward(prefix, f), which every head must (see the docstring of "
        f"psmsearch.Head) (at {plugin}:7)",
    ]
    assert registry.get("aggregator", "fine").plugin == str(plugin)


def test_a_categorical_choice_matches_without_bool_or_float_coercion() -> None:
    """``True == 1`` and ``4.0 == 4`` in Python, but a component built with them breaks; ``1`` for ``1.0`` is fine."""
    from psmsearch.components import HyperParameter

    heads = HyperParameter("heads", "categorical", 4, choices=(1, 2, 4))
    assert heads.validate(4) == 4 and type(heads.validate(4)) is int
    for wrong in (True, 4.0, 1.0):
        with pytest.raises(ValueError, match="is not allowed; expected"):
            heads.validate(wrong)
    ratio = HyperParameter("ratio", "categorical", 0.5, choices=(0.5, 1.0))
    assert ratio.validate(1) == 1.0 and type(ratio.validate(1)) is float
    flag = HyperParameter("mode", "categorical", False, choices=(False, "auto"))
    assert flag.validate(False) is False
    with pytest.raises(ValueError):
        flag.validate(0)


def test_env_var_records_absolute_paths_and_hints_at_commas(fresh_registry, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """Relative paths were recorded as typed while --plugin recorded them absolute; ``a.py:b.py``
    (PATH style) gets a hint, while a path holding a colon still loads."""
    monkeypatch.chdir(FIXTURES)
    monkeypatch.setenv(fresh_registry.ENV_VAR, "broken_components.py, duplicate_name.py")
    registry = fresh_registry.load_registry()
    assert registry.get("aggregator", "zz_wrong_shape").plugin == str(FIXTURES / "broken_components.py")
    assert any(f.plugin == str(FIXTURES / "duplicate_name.py") for f in registry.failures)
    monkeypatch.setenv(fresh_registry.ENV_VAR, f"broken_components.py{os.pathsep}duplicate_name.py")
    failure = next(f for f in fresh_registry.load_registry().failures if "no such plugin" in f.error)
    assert "; plugins are separated by commas: " in failure.error and "duplicate_name.py" in failure.error
    timestamped = tmp_path / "run-2026-11-29T17:38"
    timestamped.mkdir()
    (timestamped / "plug.py").write_text((FIXTURES / "broken_components.py").read_text())
    monkeypatch.setenv(fresh_registry.ENV_VAR, str(timestamped / "plug.py"))
    assert fresh_registry.load_registry().get("aggregator", "zz_wrong_shape").plugin == str(timestamped / "plug.py")


def test_an_unknown_component_error_says_how_plugins_are_loaded_and_survives_pickling(fresh_registry) -> None:
    import pickle

    with pytest.raises(UnknownComponentError) as caught:
        fresh_registry.load_registry().get("aggregator", "mixmlp")
    message = str(caught.value)
    assert "Did you mean 'mlp'?" in message and "A plugin's aggregators are registered once it is loaded: psmsearch --plugin PATH COMMAND" in message
    again = pickle.loads(pickle.dumps(caught.value))
    assert type(again) is UnknownComponentError and str(again) == message and again.name == "mixmlp"
    from psmsearch.trial import UnknownTaskError

    task_error = UnknownTaskError("grop", ["copy", "group", "lm"], "trial.yaml")  # other constructor arguments
    again = pickle.loads(pickle.dumps(task_error))
    assert type(again) is UnknownTaskError and str(again) == str(task_error) and again.source == "trial.yaml"
    assert str(again).startswith("trial.yaml: task.name: unknown task 'grop'. Did you mean 'group'?")


def test_a_plugin_file_importing_its_sibling_says_how_to_make_a_package(fresh_registry, tmp_path: Path) -> None:
    """``from gate_helpers import ...`` beside a single-file plugin failed with a bare ModuleNotFoundError;
    a plugin file is loaded (and shipped to Ray) alone, so the message says to make the folder a package."""
    (tmp_path / "gate_helpers.py").write_text("SCALE = 2\n")
    plugin = tmp_path / "uses_sibling.py"
    plugin.write_text("from psmsearch import hookimpl\nfrom gate_helpers import SCALE\n")
    registry = fresh_registry.load_registry(extra_plugins=[str(plugin)])
    (failure,) = [f for f in registry.failures if f.plugin == str(plugin)]
    assert failure.error.startswith(f"ModuleNotFoundError: No module named 'gate_helpers' (at {plugin}:2): "
                                    "gate_helpers.py sits beside the plugin, but a plugin file is loaded alone"), failure.error
    assert f"make the folder {tmp_path} a package" in failure.error
    (tmp_path / "gate_helpers.py").unlink()
    registry = fresh_registry.load_registry(extra_plugins=[str(plugin)])
    (failure,) = [f for f in registry.failures if f.plugin == str(plugin)]
    assert "sits beside" not in failure.error, "no sibling: the plain error"


NO_STATE_KIND = '''
import torch
from psmsearch import Aggregator, hookimpl

class NoKind(Aggregator):
    name = "no_kind"
    def forward(self, older, newer):
        return older + newer
    def initial_state(self, batch_shape):
        return torch.zeros(*batch_shape, 1)

@hookimpl
def register_aggregators(register):
    register(NoKind)
'''


def test_a_component_without_a_state_kind_is_a_failure_not_a_component(fresh_registry, tmp_path: Path) -> None:
    """DESIGN.md §3: every component declares a state_kind; without one the composer could not tell
    what it combines with, so it is reported at its class and never registered."""
    plugin = tmp_path / "no_kind.py"
    plugin.write_text(NO_STATE_KIND)
    registry = fresh_registry.load_registry(extra_plugins=[str(plugin)])
    assert "no_kind" not in registry.names("aggregator")
    (failure,) = registry.failures
    assert failure.plugin == str(plugin)
    assert failure.error == f"aggregator 'no_kind' declares no state_kind (at {plugin}:5)"

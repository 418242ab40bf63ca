"""The ``plugins`` and ``check`` commands, run for real in a subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import yaml

from clihelpers import run_cli, table_rows

FIXTURES = Path(__file__).parent / "fixtures"


def test_plugins_json_lists_components_with_their_metadata() -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["failures"] == []
    rows = listing["components"]
    by_key = {(r["kind"], r["name"]): r for r in rows}
    attention = by_key[("aggregator", "attention")]
    assert attention["plugin"] == "psmsearch.plugins.token_state"
    assert attention["state_kind"] == "tokens"
    assert attention["associative"] is False
    layers = next(p for p in attention["hyperparameters"] if p["name"] == "layers")
    assert layers == {"name": "layers", "type": "int", "default": 2, "range": [1, 6], "log": False, "help": "transformer layers"}
    assert by_key[("encoder", "embed")]["associative"] is None
    assert {"name", "kind", "plugin", "state_kind", "associative", "hyperparameters", "options"} <= set(attention)
    assert by_key[("task", "lm")]["options"] == {"path": "../shared/data/tinyshakespeare.txt", "dataset": None}


def test_plugins_json_reports_a_broken_plugin_under_failures() -> None:
    result = run_cli("--plugin", str(FIXTURES / "broken_hook.py"), "plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    [failure] = listing["failures"]
    assert failure["plugin"].endswith("broken_hook.py")
    assert "RuntimeError: the plugin's own bug" in failure["error"] + failure["detail"]
    assert ("aggregator", "attention") in {(r["kind"], r["name"]) for r in listing["components"]}


def test_plugins_table_lists_task_options() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lm_row = next(row for row in table_rows(result.stdout) if row[:2] == ["task", "lm"])
    assert "path=../shared/data/tinyshakespeare.txt (option)" in lm_row[5] and "dataset=None (option)" in lm_row[5]


def test_plugins_table_reports_a_broken_plugin_and_lists_the_rest() -> None:
    result = run_cli("--plugin", str(FIXTURES / "broken_hook.py"), "plugins")
    assert result.returncode == 0
    assert "broken_hook.py" in result.stderr and "RuntimeError: the plugin's own bug" in result.stderr
    assert "attention" in result.stdout and "pool" in result.stdout


def test_check_all_passes_for_the_builtins() -> None:
    result = run_cli("check", "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("passed, 0 failed")


def test_check_fails_with_evidence_and_exit_1() -> None:
    result = run_cli("--plugin", str(FIXTURES / "broken_components.py"), "check", "zz_peeking", "aggregator:mlp")
    assert result.returncode == 1
    assert "FAIL  head:zz_peeking" in result.stdout and "causal_within_chunk" in result.stdout
    assert "PASS  aggregator:mlp" in result.stdout


def test_check_traceback_prints_the_traceback_of_a_check_that_raised() -> None:
    args = ("--plugin", str(FIXTURES / "broken_components.py"), "check", "zz_cat_mismatch")
    plain = run_cli(*args)
    assert plain.returncode == 1 and "raised RuntimeError: Sizes of tensors must match" in plain.stdout
    assert "broken_components.py:" in plain.stdout and "Traceback" not in plain.stdout
    traced = run_cli(*args, "--traceback")
    assert traced.returncode == 1
    assert "Traceback (most recent call last)" in traced.stdout and "in forward" in traced.stdout, traced.stdout


def test_check_partner_chooses_the_components_a_component_runs_beside() -> None:
    """``check`` took each partner as the first registered of the state kind (for a diagonal head, always
    gla); ``--partner KIND:NAME`` chooses it, and one of another state kind fails the build by name."""
    from click.testing import CliRunner

    from psmsearch.cli import main

    chosen = CliRunner().invoke(main, ["check", "linear_readout_diag", "--partner", "encoder:mamba"])
    assert chosen.exit_code == 0, chosen.output
    assert "build: with encoder 'mamba', aggregator 'affine_diag'" in chosen.output
    mismatched = CliRunner().invoke(main, ["check", "head:attention", "--partner", "encoder:gla"])
    assert mismatched.exit_code == 1
    assert ("FAIL  head:attention               build: ContractViolation: --partner encoder:gla has state_kind "
            "'affine-diag', and the component under test 'tokens'; a partner must share it") in mismatched.output
    for spec, message in (("enc:gla", "expected KIND:NAME with KIND one of encoder, aggregator, head"),
                          ("encoder:glx", "unknown encoder 'glx'. Did you mean 'gla'?")):
        refused = CliRunner().invoke(main, ["check", "attention", "--partner", spec])
        assert refused.exit_code == 2 and message in refused.output, refused.output


PEEKING_HEAD = """
import torch
from psmsearch import HyperParameter, hookimpl
from psmsearch.plugins.token_state import AttentionHead


class PeekingHead(AttentionHead):
    name = "zz_peeking_at_one"
    hyperparameters = AttentionHead.hyperparameters + (HyperParameter("peek", "int", 0, low=0, high=1),)

    def forward(self, prefix, f):
        y = super().forward(prefix, f)
        if self.hparams["peek"]:  # reads the next token: non-causal, at a value a search draws
            y = y + torch.cat([f[..., 1:, :], torch.zeros_like(f[..., :1, :])], dim=-2)
        return y


@hookimpl
def register_heads(register):
    register(PeekingHead)
"""


def test_check_set_checks_a_component_at_another_hyperparameter_value(tmp_path) -> None:
    """The suite built a component at its defaults only: a head causal at peek=0 and not at peek=1 (which
    `search: all` draws) passed. ``--set NAME=VALUE`` checks it there."""
    from click.testing import CliRunner

    from psmsearch.cli import main
    from psmsearch.registry import load_registry
    from psmsearch.testing import check_component

    plugin = tmp_path / "peeking.py"
    plugin.write_text(PEEKING_HEAD)
    registry = load_registry(extra_plugins=[str(plugin)])
    head = registry.get("head", "zz_peeking_at_one")
    assert all(r.passed for r in check_component(head, registry))
    failed = {r.check: r for r in check_component(head, registry, hyperparameters={"peek": 1}) if not r.passed}
    assert "changing chunk token 1 changed outputs at positions < 1" in failed["causal_within_chunk"].message
    at_four = CliRunner().invoke(main, ["check", "aggregator:attention", "--set", "heads=4", "--set", "layers=2"])
    assert at_four.exit_code == 0, at_four.output
    assert "build: with encoder 'embed', head 'attention'; at heads=4, layers=2" in at_four.output
    out_of_range = CliRunner().invoke(main, ["check", "aggregator:attention", "--set", "layers=9"])
    assert out_of_range.exit_code == 2
    assert "hyperparameter 'layers': 9 is out of range; expected int in [1, 6]" in out_of_range.output
    two = CliRunner().invoke(main, ["check", "attention", "--set", "heads=2"])  # an aggregator and a head
    assert two.exit_code == 2 and "--set takes one component to check, and 2 are named" in two.output
    broken = run_cli("--plugin", str(FIXTURES / "broken_import.py"), "check", "my_missing_agg", "--set", "ratio=2")
    assert broken.returncode == 1, broken.stdout + broken.stderr  # the plugin's failure, not a usage error
    assert "FAIL  plugin" in broken.stdout and "load: ModuleNotFoundError" in broken.stdout


def test_check_fails_when_a_plugin_did_not_load() -> None:
    """The component meant to be checked may be the one missing, or a built-in of the same name may stand
    in for it: a plugin author's CI must not go green either way."""
    result = run_cli("--plugin", str(FIXTURES / "raises_deep.py"), "check", "aggregator:mlp")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  plugin" in result.stdout and "raises_deep.py load: KeyError: 'missing_key' (at " in result.stdout
    assert "PASS  aggregator:mlp" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("passed, 1 failed")


def test_plugins_table_piped_is_not_cut_at_80_columns() -> None:
    result = run_cli("plugins", env={"COLUMNS": ""})
    assert result.returncode == 0, result.stderr
    assert "psmsearch.plugins.token_state" in result.stdout and "…" not in result.stdout


def test_plugins_table_piped_wraps_inside_cells_instead_of_running_hundreds_of_columns_wide() -> None:
    result = run_cli("plugins", env={"COLUMNS": ""})
    assert result.returncode == 0, result.stderr
    width = max(len(line) for line in result.stdout.splitlines())
    assert width <= 160, f"a {width}-column table (each cell's longest word fits in about 142)"
    pool = next(row for row in table_rows(result.stdout) if row[:2] == ["encoder", "pool"])
    assert "state_tokens=" in pool[5]


@pytest.mark.parametrize("columns", [80, 20])
def test_plugins_table_at_a_narrow_width_folds_long_words_instead_of_cutting_them(columns: int) -> None:
    """At a fixed width (a terminal, or COLUMNS) too narrow for the longest words, rich cut them with an
    ellipsis ("psmsearch…"); they now fold onto the next line of their cell. Too narrow for about 8
    characters a column (20), the table is wider than asked rather than losing cells (they were empty)."""
    result = run_cli("plugins", "--json")
    components = json.loads(result.stdout)["components"]
    result = run_cli("plugins", env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    if columns == 20:  # folded words continue on lines whose first cell is not empty: read each column whole
        cells = [[c.strip() for c in line.strip().strip("│").split("│")] for line in result.stdout.splitlines()
                 if line.startswith("│")]
        column_text = ["".join(row[i] for row in cells) for i in range(4)]
        for c in components:
            for i, value in enumerate((c["kind"], c["name"], c["plugin"], c["state_kind"] or "-")):
                assert value in column_text[i], (value, column_text[i][:200])
        return
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    shown = [[cell.replace(" ", "") for cell in row[:4]] for row in table_rows(result.stdout)]
    assert shown == [[c["kind"], c["name"], c["plugin"], c["state_kind"] or "-"] for c in components]


def test_check_unknown_name_exits_2_with_a_suggestion_and_no_traceback() -> None:
    result = run_cli("check", "atention")
    assert result.returncode == 2
    assert "unknown component 'atention'. Did you mean 'attention'" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugin_given_after_the_command_says_where_it_goes() -> None:
    result = run_cli("search", "space.yaml", "--plugin", "my_agg.py")
    assert result.returncode == 2
    assert ("No such option '--plugin'. --plugin is an option of psmsearch itself and goes before the command: "
            "psmsearch --plugin PATH search ...") in result.stderr


def test_unknown_cli_option_exits_2() -> None:
    result = run_cli("plugins", "--jsn")
    assert result.returncode == 2
    assert "No such option '--jsn'. Did you mean '--json'?" in result.stderr


@pytest.mark.parametrize("name", ["my_aggregator", "aggregator:my_aggregator"])
def test_check_of_a_missing_name_fails_on_the_plugin_that_failed_to_load(name: str) -> None:
    """The plugin was loaded and failed: "unknown component ... pass --plugin PATH" pointed the wrong
    way. Its failure and the missing name are failed checks (exit 1), as with ``check --all``."""
    result = run_cli("--plugin", str(FIXTURES / "raises_deep.py"), "check", name, "aggregator:mlp")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  plugin" in result.stdout and "raises_deep.py load: KeyError: 'missing_key'" in result.stdout
    assert re.search(rf"FAIL  component '{name}' +registered: not registered; it may be defined by the plugin "
                     r"that failed to load \(.*raises_deep\.py\)", result.stdout)
    assert "PASS  aggregator:mlp" in result.stdout and "unknown component" not in result.stderr


def test_check_names_the_kinds_it_takes() -> None:
    result = run_cli("check", "task:group")
    assert result.returncode == 2 and "tasks have no contract suite" in result.stderr
    result = run_cli("check", "widget:x")
    assert result.returncode == 2
    assert "unknown component kind 'widget'. Registered component kinds: aggregator, encoder, head" in result.stderr
    assert "task" not in result.stderr.split("Registered component kinds:")[1]


def test_check_of_a_task_name_says_it_is_a_task() -> None:
    """A bare task name read as an unknown component, although ``plugins`` lists it."""
    from click.testing import CliRunner

    from psmsearch.cli import main

    result = CliRunner().invoke(main, ["check", "group"])
    assert result.exit_code == 2
    assert "'group' is a task; tasks have no contract suite; check takes components of the kinds" in result.output


@pytest.mark.parametrize("command", [["search", "space.yaml"], ["train", "trial.yaml"]])
@pytest.mark.parametrize("plugin", ["duplicate_name.py", "missing_plugin.py"])
def test_search_and_train_refuse_to_run_with_a_plugin_that_failed_to_load(tmp_path: Path, command: list[str], plugin: str) -> None:
    """A duplicate of a built-in name would otherwise train the built-in under the plugin's name; a
    missing file would otherwise surface as an unknown component far from its cause."""
    from searchhelpers import TINY_SPACE, write_space

    write_space(tmp_path)
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump({k: TINY_SPACE[k] for k in ("task", "train")}))
    result = run_cli("--plugin", str(FIXTURES / plugin), *command, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "1 plugin failed to load" in result.stderr and plugin in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "psmsearch.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_folder_without_init_is_named_as_not_a_package(tmp_path: Path) -> None:
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "agg.py").write_text("x = 1\n")
    result = run_cli("--plugin", str(folder), "plugins", cwd=tmp_path)
    assert f"the folder {folder} is not a package: it has no __init__.py" in result.stderr


def _readme_command_table() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## What is in the box", 1)[1]
    return section.split("\n## ", 1)[0]


def test_readme_command_table_matches_every_commands_options() -> None:
    """Each command's row names exactly the options its --help lists (a flag pair by either name)."""
    from psmsearch.cli import main

    table = _readme_command_table()
    for name, command in main.commands.items():
        row = next((line for line in table.splitlines() if line.startswith(f"| `psmsearch {name}")), None)
        assert row is not None, f"README's command table has no row for `psmsearch {name}`"
        cell = row.split(" | ")[0]  # the usage; `\|` inside it has no spaces around
        names = set()
        for param in command.params:
            if isinstance(param, click.Option):
                opts = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
                names.update(opts)
                assert any(re.search(rf"{re.escape(o)}(?![\w-])", cell) for o in opts), f"{name}: README lacks {opts[0]}"
        stale = set(re.findall(r"--[a-z][a-z-]*", cell)) - names
        assert not stale, f"{name}: README names options that `psmsearch {name} --help` does not: {stale}"
    for param in main.params:
        if isinstance(param, click.Option):
            assert param.opts[-1] in table, f"README's command table lacks the global {param.opts[-1]}"


def test_a_missing_name_beside_a_failed_plugin_still_gets_a_suggestion() -> None:
    from psmsearch.cli import _not_registered
    from psmsearch.registry import load_registry

    registry = load_registry(extra_plugins=[str(FIXTURES / "broken_import.py")])
    assert registry.failures
    result = _not_registered("aggregator:atention", registry)
    assert not result.passed and result.message.endswith("broken_import.py). Did you mean 'attention'?")

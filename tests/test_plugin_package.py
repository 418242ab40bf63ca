"""A third-party plugin package, installed from a temporary directory, is listed, checked and used."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clihelpers import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "plugin_package"

USE_IN_A_MODEL = """
import torch
from psmsearch.config import ModelConfig
from psmsearch.model import build_model
torch.manual_seed(0)
model = build_model(ModelConfig(d_model=16, chunk_size=3, aggregator='gated', head={'name': 'attention', 'heads': 2}), 7).eval()
tokens = torch.randint(0, 7, (2, 11))
with torch.no_grad():
    parallel = model(tokens)
stream = model.stream(2)
streamed = torch.stack([stream.step(tokens[:, t]) for t in range(11)], 1)
print((parallel - streamed).abs().max().item())
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package copied to a temp dir and pip-installed into a separate target folder."""
    root = tmp_path_factory.mktemp("thirdparty")
    source = root / "psmsearch-gated"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        timeout=300,
    )
    return target


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_installed_package_is_listed_by_its_entry_point(site: Path) -> None:
    result = run_cli("plugins", "--json", env=_env(site))
    assert result.returncode == 0, result.stderr
    gated = next(r for r in json.loads(result.stdout)["components"] if r["name"] == "gated")
    assert gated["plugin"] == "gated"
    assert gated["kind"] == "aggregator" and gated["associative"] is False
    assert gated["hyperparameters"][0]["name"] == "gate_bias"


def test_installed_package_passes_the_contract_suite(site: Path) -> None:
    result = run_cli("check", "gated", env=_env(site))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  aggregator:gated" in result.stdout and "FAIL" not in result.stdout


def test_installed_package_is_used_in_a_model(site: Path) -> None:
    env = {**os.environ, **_env(site)}
    result = subprocess.run([sys.executable, "-c", USE_IN_A_MODEL], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) < 1e-4


def test_without_the_package_the_name_is_unknown() -> None:
    result = run_cli("check", "gated")
    assert result.returncode == 2
    assert "unknown component 'gated'" in result.stderr


BROKEN_PACKAGE = {
    "pyproject.toml": """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "psmsearch-broken"
version = "0.1.0"

[project.entry-points.psmsearch]
broken = "psmsearch_broken_import"
duplicate = "psmsearch_duplicate"
psmsearch_also_named = "psmsearch_also_named"

[tool.setuptools]
py-modules = ["psmsearch_broken_import", "psmsearch_duplicate", "psmsearch_also_named"]
""",
    "psmsearch_broken_import.py": 'raise RuntimeError("this package is broken on purpose")\n',
    # trylast: pluggy lists such hooks first, which once let the package take `attention` from the built-ins
    "psmsearch_duplicate.py": (Path(__file__).parent / "fixtures" / "duplicate_name.py").read_text().replace(
        "@hookimpl\n", "@hookimpl(trylast=True)\n"),
    # an entry point named as its module, so that `--plugin psmsearch_also_named` loads it under the same label
    "psmsearch_also_named.py": 'raise RuntimeError("this module is broken on purpose")\n',
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An installed package with two entry points: one fails at import, one registers ``attention`` again."""
    root = tmp_path_factory.mktemp("broken")
    source = root / "psmsearch-broken"
    source.mkdir()
    for name, text in BROKEN_PACKAGE.items():
        (source / name).write_text(text)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        timeout=300,
    )
    return target


def test_an_installed_packages_failures_are_listed_as_installed(broken_site: Path) -> None:
    result = run_cli("plugins", "--json", env=_env(broken_site))
    assert result.returncode == 0, result.stderr
    failures = {f["plugin"]: f for f in json.loads(result.stdout)["failures"]}
    assert set(failures) == {"broken", "duplicate", "psmsearch_also_named"}
    assert all(f["source"] == "installed" for f in failures.values())
    assert "RuntimeError: this package is broken on purpose" in failures["broken"]["error"]
    assert "aggregator 'attention' is registered twice" in failures["duplicate"]["error"]


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_broken_installed_package_does_not_stop_search_or_train(broken_site: Path, tmp_path: Path, command: str) -> None:
    """DESIGN.md §5: one broken plugin never takes the tool down. An installed package loads in every
    run; its failures were refusals (exit 2) for every search and training run until it was uninstalled.
    Now each is a warning, and `attention`, which the package registered a second time, stays the built-in."""
    from searchhelpers import TINY_SPACE, write_space

    write_space(tmp_path, driver={**TINY_SPACE["driver"], "trials": 2})
    trial = {k: TINY_SPACE[k] for k in ("task", "train")}
    trial["model"] = {**TINY_SPACE["model"], "chunk_size": 2, "aggregator": {"name": "attention", "layers": 1, "heads": 2}}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
    args = ["search", "space.yaml", "--json", "--no-progress"] if command == "search" else ["train", "trial.yaml", "--json"]
    result = run_cli(*args, env=_env(broken_site), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: plugin ")]
    assert len(warnings) == 3, result.stderr
    assert any("'broken' (installed package): RuntimeError: this package is broken on purpose" in w for w in warnings)
    assert any("'duplicate' (installed package): aggregator 'attention' is registered twice" in w
               and "keeping the one from 'psmsearch.plugins." in w for w in warnings)
    assert "Traceback" not in result.stderr
    output = json.loads(result.stdout)
    if command == "train":
        assert output["acc_2x"] >= 0.0
    else:
        assert [t["status"] for t in output["trials"]] == ["complete", "complete"], output


@pytest.mark.parametrize("kind", ["aggregator", "task"])
def test_a_component_a_broken_installed_package_would_provide_is_unknown_naming_the_package(
        broken_site: Path, tmp_path: Path, kind: str) -> None:
    from searchhelpers import TINY_SPACE

    trial = {k: TINY_SPACE[k] for k in ("task", "train")}
    trial["model"] = {**TINY_SPACE["model"], "chunk_size": 2, "aggregator": "brokenagg"}
    if kind == "task":
        trial["model"]["aggregator"] = "mlp"
        trial["task"] = {"name": "brokenagg"}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
    result = run_cli("train", "trial.yaml", env=_env(broken_site), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"unknown {kind} 'brokenagg'" in result.stderr
    hint = re.search(r"or an installed package's entry point\. These plugins failed to load or register something, "
                     r"and 'brokenagg' may be one of theirs: (.*) \(`psmsearch plugins` says why\)\.$", result.stderr.strip())
    assert hint and sorted(hint.group(1).split(", ")) == ["'broken'", "'duplicate'", "'psmsearch_also_named'"], result.stderr


def test_a_named_plugin_that_is_also_installed_still_stops_the_run(broken_site: Path, tmp_path: Path) -> None:
    """``--plugin M`` where an installed entry point is also called M: the named load took the entry
    point's source, so the broken plugin the user named was only a warning and training went on."""
    from searchhelpers import TINY_SPACE

    trial = {k: TINY_SPACE[k] for k in ("task", "train")}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
    result = run_cli("--plugin", "psmsearch_also_named", "train", "trial.yaml", env=_env(broken_site), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: 1 plugin failed to load, so training would run without its components" in result.stderr
    assert "plugin 'psmsearch_also_named': RuntimeError: this module is broken on purpose" in result.stderr


RECORD_A_TRIAL = """
from psmsearch.registry import get_registry
from psmsearch.search import trial_config_text
from psmsearch.trial import TrialConfig
config = TrialConfig.from_dict({
    "task": {"name": "group", "group": "Z5", "train_length": 6, "eval_max_multiple": 2, "eval_samples": 16},
    "model": {"d_model": 16, "chunk_size": 2, "aggregator": "gated", "head": {"name": "attention", "heads": 2}},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2},
    "metrics": {"memory_lengths": [8], "latency_lengths": [8], "latency_tokens": 2},
})
print(trial_config_text(config, get_registry()))
"""


def test_a_trial_records_the_installed_package_its_component_came_from(site: Path, tmp_path: Path) -> None:
    """An installed plugin was recorded by its entry point's name alone: without the package, ``train``
    said "install the package that provides it" without naming it. The record now names the package and
    version, and the digest of its code (an editable install edited since is then warned about)."""
    env = {**os.environ, **_env(site)}
    result = subprocess.run([sys.executable, "-c", RECORD_A_TRIAL], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    recorded = yaml.safe_load(result.stdout)["plugins"]["model.aggregator"]
    assert recorded["name"] == "gated" and recorded["plugin"] == "gated"
    assert recorded["distribution"] == "psmsearch-gated==0.1.0" and len(recorded["sha256"]) == 64
    assert "#   model.aggregator 'gated': the installed package psmsearch-gated==0.1.0 (entry point 'gated')" in \
        result.stdout
    config = tmp_path / "trial_config.yaml"
    config.write_text(result.stdout)
    without = run_cli("train", str(config), cwd=tmp_path)
    assert without.returncode == 2
    assert ("came from the installed package psmsearch-gated==0.1.0 (entry point 'gated'): install it (pip install "
            "psmsearch-gated==0.1.0)") in " ".join(without.stderr.split())


@pytest.fixture(scope="module")
def fork_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second package whose entry point is also called ``gated`` (another module, another distribution)."""
    root = tmp_path_factory.mktemp("fork")
    source = root / "psmsearch-gated-fork"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    (source / "src" / "psmsearch_gated").rename(source / "src" / "psmsearch_gated_fork")
    pyproject = source / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('name = "psmsearch-gated"', 'name = "psmsearch-gated-fork"')
                         .replace('gated = "psmsearch_gated"', 'gated = "psmsearch_gated_fork"'))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        timeout=300,
    )
    return target


def test_two_installed_packages_with_one_entry_point_name_both_load(site: Path, fork_site: Path) -> None:
    """Both were labelled by the entry point's name, so pluggy refused the second ("Plugin name already
    registered: gated=<module ...>") and dropped all it held. Each is now labelled by its distribution;
    the component name they share is then reported as registered twice, naming both."""
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(fork_site), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    gated = [r for r in listing["components"] if r["name"] == "gated"]
    assert len(gated) == 1 and gated[0]["plugin"] in ("psmsearch-gated:gated", "psmsearch-gated-fork:gated")
    errors = [f["error"] for f in listing["failures"]]
    assert any("aggregator 'gated' is registered twice: by plugin 'psmsearch-gated" in e and
               "and by plugin 'psmsearch-gated" in e for e in errors), errors
    assert not any("already registered" in e for e in errors), errors
